"""Test-set metrics from logits: accuracy, balanced accuracy, NLL, ECE and reliability bins; for
multi-label scores, macro-F1 and the per-class thresholds that maximise it.

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


# -- multi-label ---------------------------------------------------------------------------------------
def _multilabel_inputs(scores: Tensor, labels: Tensor, who: str) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{who}: scores and labels must be tensors")
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"{who}: scores and labels must both be [N, C], got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"{who}: scores must be real numbers, got {scores.dtype}")
    if torch.isnan(scores).any():
        row, col = (torch.isnan(scores).nonzero()[0]).tolist()
        raise ValueError(f"{who}: scores[{row}, {col}] is NaN")
    if labels.dtype != torch.bool:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"{who}: labels must hold 0/1 or booleans")
        labels = labels != 0
    return scores.detach(), labels


def f1_per_class(pred: Tensor, labels: Tensor) -> Tensor:
    """``[C]`` F1 of each column of boolean predictions ``[N, C]``: ``2 TP / (2 TP + FP + FN)``, and 0
    where that is ``0 / 0`` (no positive and none predicted; scikit-learn's ``zero_division=0``).

    >>> f1_per_class(torch.tensor([[1, 0], [1, 0], [0, 0]]).bool(), torch.tensor([[1, 0], [0, 0], [1, 0]]))
    tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    pred, labels = pred.bool(), labels.bool()
    tp = (pred & labels).sum(0).double()
    denominator = pred.sum(0).double() + labels.sum(0).double()  # 2 TP + FP + FN
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))


def macro_f1(scores: Tensor, labels: Tensor, thresholds=0.5) -> float:
    """Mean over the classes of the F1 of ``scores >= thresholds`` (a number, or ``[C]`` per class).

    ``scores`` are ``[N, C]`` probabilities for the default 0.5; any monotone score works with
    thresholds found on it (:func:`best_f1_thresholds`). ``labels``: ``[N, C]`` 0/1.

    >>> macro_f1(torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]]), torch.tensor([[1, 0], [0, 1], [0, 1]]))
    0.6666666666666666
    """
    scores, labels = _multilabel_inputs(scores, labels, "macro_f1")
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    if thresholds.dim() > 1 or thresholds.numel() not in (1, scores.shape[1]):
        raise ValueError(f"macro_f1: thresholds must be a number or [{scores.shape[1]}], got {tuple(thresholds.shape)}")
    return f1_per_class(scores.double() >= thresholds, labels).mean().item()


def best_f1_thresholds(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-class thresholds that maximise each class's F1, hence the macro-F1 (Yilmaz et al. 2021).

    The prediction for class ``c`` is ``scores[:, c] >= t_c``. Only the ``N + 1`` distinct cuts of the
    sorted scores can change it, and with the scores of a class sorted in decreasing order the cut
    after the ``k``-th score predicts ``k`` positives with ``TP_k`` = the cumulative count of positive
    labels, so ``F1_k = 2 TP_k / (k + P)`` (``P`` positives in all): one sort, ``O(N log N)``, then
    one linear pass per class. Only cuts between distinct scores count (tied scores are all in or all
    out). Among equal best F1 the lowest threshold is taken (the official code's ``argmax`` over
    scikit-learn's increasing thresholds).

    A class with no positive label cannot have a positive F1; its threshold is ``+inf`` (predict
    none: F1 0 with no false positive). Thresholds are score values, so fit them on held-out data
    and apply them to scores of the same kind.

    Returns ``(thresholds, f1)``, both ``[C]`` float64: the threshold and the F1 it reaches on these data.

    >>> scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.4], [0.1, 0.4]])
    >>> labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    >>> thresholds, f1 = best_f1_thresholds(scores, labels)
    >>> thresholds, f1
    (tensor([0.6000, 0.4000], dtype=torch.float64), tensor([1.0000, 0.8000], dtype=torch.float64))
    >>> macro_f1(scores, labels, thresholds)
    0.9

    Reference: Yilmaz et al., *Multi-Label Sentiment Analysis on 100 Languages with Dynamic
    Weighting for Label Imbalance*, IEEE TNNLS 2021 (official code: ``predictor.py``, class-specific
    thresholds from ``sklearn.metrics.precision_recall_curve``).
    """
    scores, labels = _multilabel_inputs(scores, labels, "best_f1_thresholds")
    n, c = scores.shape
    thresholds = torch.full((c,), float("inf"), dtype=torch.float64)
    best = torch.zeros(c, dtype=torch.float64)
    if n == 0:
        return thresholds, best
    ordered, order = torch.sort(scores.double(), dim=0, descending=True, stable=True)
    tp = torch.gather(labels, 0, order).double().cumsum(0)  # [N, C]: TP of the cut after row k
    positives = tp[-1]
    predicted = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)  # k
    f1 = 2 * tp / (predicted + positives)
    # a cut inside a run of tied scores is not a threshold: keep the last row of each run
    at_boundary = torch.ones_like(ordered, dtype=torch.bool)
    at_boundary[:-1] = ordered[:-1] > ordered[1:]
    f1 = torch.where(at_boundary, f1, torch.full_like(f1, -1.0))
    # the last maximum in decreasing score order is the lowest threshold among equal F1
    k = (n - 1) - torch.argmax(f1.flip(0), dim=0)
    cols = torch.arange(c)
    found = positives > 0
    thresholds = torch.where(found, ordered[k, cols], thresholds)
    best = torch.where(found, f1[k, cols], best)
    return thresholds, best
