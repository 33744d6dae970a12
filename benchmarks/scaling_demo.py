"""A scaling law measured here: MNIST-1D's CNN at several widths, fitted on the smaller ones, forecast for a larger.

Each width ``w`` is the MNIST-1D reference CNN with ``w`` channels in its three convolutions
(``crossent_harness.experiments.models.MNIST1DConv``), trained by the harness's own training loop
(``crossent_harness.experiments.train.train``: cross-entropy, Adam lr 1e-2 cosine-annealed to 0 over
``--epochs`` epochs of batches of 100) on the 4000 MNIST-1D training signals, once per seed; its loss
is the test cross-entropy (nats, 1000 test signals) early-stopped as Kaplan et al. 2020 measure
``L(N)``, the lowest of the evaluations every ``--every`` steps, averaged over the seeds (the final
loss is recorded beside it: past its best step a run overfits the 4000 signals and its test loss
climbs again). The runs of ``--widths`` go to ``OUT/runs.csv``, the run of ``--held-out`` to
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

FIELDS = ("width", "params", "loss", "loss_sd", "final_loss", "acc", "seeds", "steps", "seconds")


def run_once(data, width: int, cfg: TrainConfig, seed: int, every: int) -> dict:
    """One training run: its early-stopped and final test cross-entropy, its final test accuracy."""
    torch.manual_seed(seed)
    model = MNIST1DConv(data.input_shape[0], data.num_classes, channels=width)
    done, best = [0], [math.inf]

    def checkpoint(steps: int) -> None:  # the test loss every `every` steps: the run's early-stopped loss
        done[0] += steps
        if done[0] % every == 0:
            best[0] = min(best[0], metrics.nll(predict(model, data.x_test).double(), data.y_test))

    train(model, data.x_train, data.y_train, Prepared(loss=get("ce")), cfg, seed=seed, on_step=checkpoint)
    test = predict(model, data.x_test).double()
    return {"params": sum(p.numel() for p in model.parameters()), "loss": best[0],
            "final_loss": metrics.nll(test, data.y_test), "acc": metrics.accuracy(test, data.y_test)}


def run_width(data, width: int, cfg: TrainConfig, seeds: list[int], every: int) -> dict:
    """The runs of one width over ``seeds``: the mean of each figure, and the spread of the loss."""
    t0 = time.time()
    runs = [run_once(data, width, cfg, seed, every) for seed in seeds]
    losses = torch.tensor([r["loss"] for r in runs], dtype=torch.float64)
    return {
        "width": width,
        "params": runs[0]["params"],
        "loss": losses.mean().item(),
        "loss_sd": losses.std().item() if len(runs) > 1 else 0.0,
        "final_loss": sum(r["final_loss"] for r in runs) / len(runs),
        "acc": sum(r["acc"] for r in runs) / len(runs),
        "seeds": len(runs),
        "steps": cfg.total_steps(len(data.y_train)),
        "seconds": round(time.time() - t0, 1),
    }


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: (float(v) if k in ("loss", "loss_sd", "final_loss", "acc", "seconds") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="8,11,16,23,32", help="channel counts of the fitted runs")
    parser.add_argument("--held-out", type=int, default=64, help="channel count of the forecast run")
    parser.add_argument("--epochs", type=int, default=25, help="epochs of 40 steps, the learning rate cosine-annealed")
    parser.add_argument("--seeds", type=int, default=3, help="runs per width, seeds 0 .. SEEDS-1 (their mean is fitted)")
    parser.add_argument("--every", type=int, default=100, help="steps between test evaluations")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/scaling"))
    parser.add_argument("--fit-only", action="store_true", help="fit the CSVs of an earlier run, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fit_only:
        rows, (held,) = read(args.out / "runs.csv"), read(args.out / "held_out.csv")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        data = datasets.load("mnist1d")
        cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=100, epochs=args.epochs, schedule="cosine")
        rows = []
        for width in [int(w) for w in args.widths.split(",")]:
            rows.append(run_width(data, width, cfg, list(range(args.seeds)), args.every))
            print(rows[-1], flush=True)
            write(args.out / "runs.csv", rows)
        held = run_width(data, args.held_out, cfg, list(range(args.seeds)), args.every)
        print(held, flush=True)
        write(args.out / "held_out.csv", [held])

    params = [r["params"] for r in rows]
    fit = fit_power_law(params, [r["loss"] for r in rows], bootstrap=args.bootstrap,
                        generator=torch.Generator().manual_seed(0))
    print(fit.format())
    print("\n| width | params | test CE (early-stopped, mean ± sd) | fit [interval] | final test CE | final test acc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in [*rows, held]:
        low, high = fit.predict_interval(float(r["params"]))
        fitted = f"{float(fit.predict(float(r['params']))):.4f} [{low.item():.4f}, {high.item():.4f}]"
        label = f"{r['width']} (held out)" if r is held else str(r["width"])
        print(f"| {label} | {r['params']} | {r['loss']:.4f} ± {r['loss_sd']:.4f} | {fitted} | {r['final_loss']:.4f} | "
              f"{r['acc']:.3f} |")


if __name__ == "__main__":
    main()
