"""A scaling law measured here: MNIST-1D's CNN at several widths, fitted on the smaller ones, forecast for a larger.

Each width ``w`` is the MNIST-1D reference CNN with ``w`` channels in its three convolutions
(``crossent_harness.experiments.models.MNIST1DConv``), trained by the harness's own training loop
(``crossent_harness.experiments.train.train``: cross-entropy, Adam lr 1e-2 cosine-annealed to 0 over
``--epochs`` epochs of batches of 100) on the 4000 MNIST-1D training signals, once per seed; its loss
is the test cross-entropy (nats, 1000 test signals) early-stopped as Kaplan et al. 2020 measure
``L(N)``, the lowest of the evaluations every ``--every`` steps (the final loss is recorded beside it: past
its best step a run overfits the 4000 signals and its test loss climbs again). Every run, one per
width and seed, is a point of the fit. The runs of ``--widths`` go to ``OUT/runs.csv``, the run of ``--held-out`` to
``OUT/held_out.csv``; then ``L(N) = L_inf + (N0 / N) ** alpha`` in the parameter count ``N`` is fitted
to the first (:func:`crossent.scaling.fit_power_law`, bootstrap intervals) and its forecast for the
held-out width is printed beside the measured loss, as a markdown table. The same fit from the command
line::

    crossent scaling fit OUT/runs.csv --x params --y loss --forecast PARAMS_OF_THE_HELD_OUT_RUN

About five CPU minutes with one thread:

    OMP_NUM_THREADS=1 python benchmarks/scaling_demo.py --out results/scaling
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from crossent.losses import get
from crossent.scaling import fit_power_law
from crossent_harness.experiments import datasets, metrics
from crossent_harness.experiments.models import MNIST1DConv
from crossent_harness.experiments.train import Prepared, TrainConfig, predict, train

FIELDS = ("width", "seed", "params", "loss", "final_loss", "acc", "steps", "seconds")


def run_once(data, width: int, cfg: TrainConfig, seed: int, every: int) -> dict:
    """One training run: its early-stopped and final test cross-entropy, its final test accuracy."""
    torch.manual_seed(seed)
    model = MNIST1DConv(data.input_shape[0], data.num_classes, channels=width)
    t0 = time.time()
    done, best = [0], [math.inf]

    def checkpoint(steps: int) -> None:  # the test loss every `every` steps: the run's early-stopped loss
        done[0] += steps
        if done[0] % every == 0:
            best[0] = min(best[0], metrics.nll(predict(model, data.x_test).double(), data.y_test))

    train(model, data.x_train, data.y_train, Prepared(loss=get("ce")), cfg, seed=seed, on_step=checkpoint)
    test = predict(model, data.x_test).double()
    return {"width": width, "seed": seed, "params": sum(p.numel() for p in model.parameters()), "loss": best[0],
            "final_loss": metrics.nll(test, data.y_test), "acc": metrics.accuracy(test, data.y_test),
            "steps": done[0], "seconds": round(time.time() - t0, 1)}


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: (float(v) if k in ("loss", "final_loss", "acc", "seconds") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def by_width(runs: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in runs:
        out.setdefault(r["width"], []).append(r)
    return out


def mean_sd(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean().item():.4f} ± {t.std().item():.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="8,11,16,23,32", help="channel counts of the fitted runs")
    parser.add_argument("--held-out", type=int, default=64, help="channel count of the forecast run")
    parser.add_argument("--epochs", type=int, default=25, help="epochs of 40 steps, the learning rate cosine-annealed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs per width, seeds 0 .. SEEDS-1 (each run a point of the fit)")
    parser.add_argument("--every", type=int, default=100, help="steps between test evaluations")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/scaling"))
    parser.add_argument("--fit-only", action="store_true", help="fit the CSVs of an earlier run, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fit_only:
        runs, held = read(args.out / "runs.csv"), read(args.out / "held_out.csv")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        data = datasets.load("mnist1d")
        cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=100, epochs=args.epochs, schedule="cosine")
        runs, held = [], []
        for width in [int(w) for w in args.widths.split(",")]:
            for seed in range(args.seeds):
                runs.append(run_once(data, width, cfg, seed, args.every))
                print(runs[-1], flush=True)
                write(args.out / "runs.csv", runs)
        for seed in range(args.seeds):
            held.append(run_once(data, args.held_out, cfg, seed, args.every))
            print(held[-1], flush=True)
            write(args.out / "held_out.csv", held)

    # every run is a point: the bootstrap then resamples runs, and the seeds' spread enters the intervals
    fit = fit_power_law([r["params"] for r in runs], [r["loss"] for r in runs], bootstrap=args.bootstrap,
                        generator=torch.Generator().manual_seed(0))
    print(fit.format())
    print("\n| width | params | test CE, early-stopped (mean ± sd of seeds) | fit [95% interval] | final test CE | "
          "final test accuracy |")
    print("|---:|---:|---:|---:|---:|---:|")
    groups = by_width(runs)
    for width, group in [*groups.items(), *by_width(held).items()]:
        params = group[0]["params"]
        low, high = fit.predict_interval(float(params))
        fitted = f"{float(fit.predict(float(params))):.4f} [{low.item():.4f}, {high.item():.4f}]"
        label = str(width) if width in groups else f"**{width} (held out)**"
        print(f"| {label} | {params} | {mean_sd([r['loss'] for r in group])} | {fitted} | "
              f"{mean_sd([r['final_loss'] for r in group])} | {mean_sd([r['acc'] for r in group])} |")


if __name__ == "__main__":
    main()
