"""Test-set metrics from logits: accuracy, balanced accuracy, NLL, ECE and reliability bins.

ECE follows the calibration literature (Guo et al. 2017; the focal-loss calibration study): confidence
``max_k p_k`` is binned into ``n_bins`` equal-width bins ``(k/n, (k+1)/n]`` and
``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose argmax is the label.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    0.6666666666666666
    """
    return (logits.argmax(-1) == labels).double().mean().item()


def balanced_accuracy(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in ``labels`` of the per-class recall.

    >>> balanced_accuracy(torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0, 0, 0, 1]))
    0.5
    """
    num_classes = num_classes or logits.shape[-1]
    pred = logits.argmax(-1)
    total = torch.bincount(labels, minlength=num_classes).double()
    hit = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    return (hit[present] / total[present]).mean().item()


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood ``-log softmax(z)_y`` (in float64)."""
    return F.cross_entropy(logits.double(), labels).item()


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (``None`` for an empty bin: it has no mean,
    and JSON has no NaN), plus ``edges``."""
    probs = torch.softmax(logits.double(), -1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin k holds (edges[k], edges[k+1]]; the clamp puts a confidence of exactly 0 in the first bin
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    safe = count.clamp_min(1)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    counts = count.long().tolist()
    return {
        "edges": edges.tolist(),
        "count": counts,
        "confidence": [v if n else None for v, n in zip((conf_sum / safe).tolist(), counts)],
        "accuracy": [v if n else None for v, n in zip((acc_sum / safe).tolist(), counts)],
    }


def ece(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (a fraction, not %).

    >>> z = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]))
    >>> round(ece(z, torch.tensor([0, 1, 0, 0]), n_bins=10), 4)  # (2|0.5-0.9| + 2|1.0-0.6|) / 4
    0.4
    """
    bins = reliability_bins(logits, labels, n_bins)
    n = sum(bins["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)


def all_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    """``acc``, ``bacc``, ``nll``, ``ece`` of one set of logits."""
    logits = logits.detach()
    return {
        "acc": accuracy(logits, labels),
        "bacc": balanced_accuracy(logits, labels),
        "nll": nll(logits, labels),
        "ece": ece(logits, labels, n_bins),
    }
