"""Multi-label training with label imbalance: static BCE, focal, and dynamic class weights (Yilmaz et al. 2021),
each evaluated with the 0.5 threshold and with per-class thresholds searched on a validation split.

The task is scikit-learn's ``make_multilabel_classification`` (offline, bag-of-words features; fixed
generator seed), made long-tailed by keeping an example with probability ``min_{c in labels} r_c``,
``r_c = imbalance^(-c / (C - 1))`` for the classes ordered from most to least frequent. The kept
examples are split 60/20/20 into train / threshold-validation / test, so the three splits share the
imbalance. MLP with one hidden layer, Adam, a fixed number of epochs; the seeds change the
initialisation and the batch order, not the data. Prints a Markdown table of test macro-F1 (mean +-
std over the seeds) and the tail classes' mean F1.

    OMP_NUM_THREADS=1 python benchmarks/bench_multilabel.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent as xe  # noqa: E402
from crossent.weighting import DynamicClassWeights  # noqa: E402
from crossent_harness.experiments.metrics import best_f1_thresholds, f1_per_class  # noqa: E402
from crossent_harness.experiments.models import mlp  # noqa: E402
from crossent_harness.experiments.train import predict  # noqa: E402


def make_task(n_samples: int, num_classes: int, imbalance: float, seed: int = 0):
    """Long-tailed multi-label data: ``(splits, class counts of the training split)``."""
    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(
        n_samples=n_samples, n_features=40, n_classes=num_classes, n_labels=2, length=50,
        allow_unlabeled=True, random_state=seed,
    )  # fmt: skip
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).bool()
    y = y[:, torch.argsort(y.sum(0), descending=True, stable=True)]
    rate = imbalance ** (-torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1))
    keep_prob = torch.where(y, rate, torch.ones_like(rate)).min(1).values
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(len(y), generator=g, dtype=torch.float64) < keep_prob
    x, y = torch.log1p(x[keep]), y[keep].float()
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    mean, std = x[:a].mean(0), x[:a].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    splits = {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}
    return splits, y[:a].sum(0).long()


def bce(logits, targets):
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def focal(logits, targets):
    # the official code's multi-label focal loss: alpha = 1 (no positive/negative weighting), gamma = 2
    return xe.losses.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0)


METHODS = {
    "BCE": (bce, False),
    "focal (gamma 2)": (focal, False),
    "BCE + dynamic weights": (bce, True),
    "focal + dynamic weights": (focal, True),
}


def run(method: str, splits, num_classes: int, seed: int, args) -> dict:
    elementwise, dynamic = METHODS[method]
    torch.manual_seed(seed)
    x, y = splits["train"]
    model = mlp(x.shape[1], [args.hidden], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    weighting = DynamicClassWeights(num_classes, smoothing=args.smoothing) if dynamic else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(args.batch_size):
            losses = elementwise(model(x[idx]), y[idx])
            loss = weighting(losses) if weighting is not None else losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    if weighting is not None:
        weighting.eval()
    val_scores = torch.sigmoid(predict(model, splits["val"][0]).double())
    thresholds, _ = best_f1_thresholds(val_scores, splits["val"][1])
    test_scores = torch.sigmoid(predict(model, splits["test"][0]).double())
    y_test = splits["test"][1]
    out = {}
    tail = slice(num_classes // 2, None)
    for name, t in (("0.5", 0.5), ("searched", thresholds)):
        f1 = f1_per_class(test_scores >= torch.as_tensor(t, dtype=torch.float64), y_test)
        out[f"macro_f1@{name}"] = f1.mean().item()
        out[f"tail_f1@{name}"] = f1[tail].mean().item()
    return out


def _cell(values) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=120000, help="generated before the long-tail subsampling")
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--smoothing", type=float, default=0.05)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    splits, counts = make_task(args.samples, args.classes, args.imbalance)
    sizes = {k: len(v[1]) for k, v in splits.items()}
    print(f"splits {sizes}; training positives per class {counts.tolist()}", flush=True)
    lines = [
        "| method | macro-F1 %, threshold 0.5 | macro-F1 %, searched thresholds "
        "| tail F1 %, 0.5 | tail F1 %, searched |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in args.methods.split(","):
        results = [run(method, splits, args.classes, seed, args) for seed in range(args.seeds)]
        cols = ["macro_f1@0.5", "macro_f1@searched", "tail_f1@0.5", "tail_f1@searched"]
        lines.append(f"| {method} | " + " | ".join(_cell([r[c] for r in results]) for c in cols) + " |")
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    table = "\n".join(lines)
    print(f"\nn = {args.seeds} seeds; tail = the {args.classes - args.classes // 2} rarest classes\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
