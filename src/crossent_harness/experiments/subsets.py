"""Training subsets: a long-tailed profile and a stratified subsample (label noise lives in :mod:`.noise`).

- :func:`long_tail_indices`: keeps ``n_i = floor(n_max * ratio ** (-i / (C - 1)))`` examples of class
  ``i`` (class 0 is the head), the profile of the CIFAR-LT / Fashion-MNIST-LT benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def long_tail_counts(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """``n_i = floor(n_max * ratio ** (-i / (C - 1)))`` for ``i = 0 .. C-1``.

    Example:
        >>> long_tail_counts(10, 6000, 100)
        [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    """
    if not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"imbalance ratio must be a finite number >= 1, got {ratio}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * ratio ** (-i / (num_classes - 1)) + 1e-9) for i in range(num_classes)]


def long_tail_indices(labels: Tensor, num_classes: int, ratio: float, seed=0) -> Tensor:
    """Indices of a long-tailed subset: the first ``n_i`` of a random order of each class.

    ``n_max`` is the size of the smallest class, so that every class can supply its share.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    keep = long_tail_counts(num_classes, int(counts.min()), ratio)
    g = _generator(seed)
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[: keep[c]]])
    return torch.cat(out).sort().values


def stratified_subsample(labels: Tensor, n: int, seed=0) -> Tensor:
    """About ``n`` indices keeping each class's share (for runs that must fit a small CPU budget)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = _generator(seed)
    frac = n / len(labels)
    out = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[: max(1, round(frac * len(idx)))]])
    return torch.cat(out).sort().values
