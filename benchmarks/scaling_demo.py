"""A scaling law measured here: MNIST-1D's CNN at several widths, fitted on the smaller ones, forecast for a larger.

Each width ``w`` is the MNIST-1D reference CNN with ``w`` channels in its three convolutions
(``crossent_harness.experiments.models.MNIST1DConv``), trained by the harness's own training loop
(``crossent_harness.experiments.train.train``: cross-entropy, Adam lr 1e-2, batch 100, ``--steps``
steps, seed 0) on the 4000 MNIST-1D training signals; its loss is the test cross-entropy (nats, 1000
test signals) early-stopped as Kaplan et al. 2020 measure ``L(N)``: the lowest of the evaluations every
``--every`` steps (the final one is recorded beside it: past its best step a run overfits the 4000
signals and its test loss climbs again). The runs of ``--widths`` go to ``OUT/runs.csv``, the run of ``--held-out`` to
``OUT/held_out.csv``; then ``L(N) = L_inf + (N0 / N) ** alpha`` in the parameter count ``N`` is fitted
to the first (:func:`crossent.scaling.fit_power_law`, bootstrap intervals) and its forecast for the
held-out width is printed beside the measured loss, as a markdown table. The same fit from the command
line::

    crossent scaling fit OUT/runs.csv --x params --y loss --forecast PARAMS_OF_THE_HELD_OUT_RUN

About three CPU minutes with one thread:

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

FIELDS = ("width", "params", "loss", "best_step", "final_loss", "train_loss", "acc", "steps", "seed", "seconds")


def run_width(data, width: int, cfg: TrainConfig, seed: int, every: int) -> dict:
    torch.manual_seed(seed)
    model = MNIST1DConv(data.input_shape[0], data.num_classes, channels=width)
    t0 = time.time()
    done, best = [0], [math.inf, 0]

    def checkpoint(steps: int) -> None:  # the test loss every `every` steps: the run's early-stopped loss
        done[0] += steps
        if done[0] % every == 0:
            loss = metrics.nll(predict(model, data.x_test).double(), data.y_test)
            if loss < best[0]:
                best[:] = [loss, done[0]]

    train(model, data.x_train, data.y_train, Prepared(loss=get("ce")), cfg, seed=seed, on_step=checkpoint)
    test, train_logits = predict(model, data.x_test).double(), predict(model, data.x_train).double()
    return {
        "width": width,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": best[0],
        "best_step": best[1],
        "final_loss": metrics.nll(test, data.y_test),
        "train_loss": metrics.nll(train_logits, data.y_train),
        "acc": metrics.accuracy(test, data.y_test),
        "steps": cfg.steps,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
    }


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: (float(v) if k in ("loss", "final_loss", "train_loss", "acc", "seconds") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="8,11,16,23,32", help="channel counts of the fitted runs")
    parser.add_argument("--held-out", type=int, default=64, help="channel count of the forecast run")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
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
        cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=100, steps=args.steps)
        rows = []
        for width in [int(w) for w in args.widths.split(",")]:
            rows.append(run_width(data, width, cfg, args.seed, args.every))
            print(rows[-1], flush=True)
            write(args.out / "runs.csv", rows)
        held = run_width(data, args.held_out, cfg, args.seed, args.every)
        print(held, flush=True)
        write(args.out / "held_out.csv", [held])

    params = [r["params"] for r in rows]
    fit = fit_power_law(params, [r["loss"] for r in rows], bootstrap=args.bootstrap,
                        generator=torch.Generator().manual_seed(args.seed))
    print(fit.format())
    print("\n| width | params | test CE (early-stopped, step) | fit [interval] | final test CE | final test acc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in [*rows, held]:
        low, high = fit.predict_interval(float(r["params"]))
        fitted = f"{float(fit.predict(float(r['params']))):.4f} [{low.item():.4f}, {high.item():.4f}]"
        label = f"{r['width']} (held out)" if r is held else str(r["width"])
        print(f"| {label} | {r['params']} | {r['loss']:.4f} ({r['best_step']}) | {fitted} | {r['final_loss']:.4f} | "
              f"{r['acc']:.3f} |")


if __name__ == "__main__":
    main()
