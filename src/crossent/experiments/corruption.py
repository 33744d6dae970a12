"""Label noise and class imbalance, applied to a training set only.

- :func:`symmetric_noise`: each label is replaced, with probability ``rate``, by a class drawn
  uniformly from all ``C`` classes (possibly itself), as in the LDR-KL paper's code; the expected
  fraction of changed labels is therefore ``rate * (C - 1) / C``.
- :func:`pair_noise`: each label is swapped to its partner, with probability ``rate``, for a fixed
  set of class pairs (Letter: B<->D, C<->G, ...; by default adjacent pairs 0<->1, 2<->3, ...).
- :func:`long_tail_indices`: keeps ``n_i = floor(n_max * ratio ** (-i / (C - 1)))`` examples of class
  ``i`` (class 0 is the head), the profile of the CIFAR-LT / Fashion-MNIST-LT benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    return rate


def symmetric_noise(labels: Tensor, num_classes: int, rate: float, seed=0) -> Tensor:
    """Replace each label with probability ``rate`` by a uniformly drawn class (any of the ``C``).

    Example:
        >>> y = torch.zeros(10000, dtype=torch.long)
        >>> noisy = symmetric_noise(y, 10, 0.5, seed=0)
        >>> round((noisy != y).float().mean().item(), 2)  # 0.5 * 9 / 10
        0.45
    """
    rate = _check_rate(rate)
    g = _generator(seed)
    flip = torch.rand(labels.shape, generator=g) < rate
    random = torch.randint(0, num_classes, labels.shape, generator=g)
    return torch.where(flip, random, labels)


def pair_permutation(num_classes: int, pairs=None) -> Tensor:
    """The class map of pair noise: ``perm[i]`` is the partner of ``i`` (itself if it has none)."""
    perm = torch.arange(num_classes)
    if pairs is None:
        pairs = [(2 * i, 2 * i + 1) for i in range(num_classes // 2)]
    seen: set[int] = set()
    for a, b in pairs:
        if not (0 <= a < num_classes and 0 <= b < num_classes) or a == b or {a, b} & seen:
            raise ValueError(f"pairs must be disjoint pairs of distinct classes in [0, {num_classes}), got {pairs}")
        seen |= {a, b}
        perm[a], perm[b] = b, a
    return perm


def pair_noise(labels: Tensor, num_classes: int, rate: float, pairs=None, seed=0) -> Tensor:
    """Swap each label to its pair partner with probability ``rate``.

    Example:
        >>> pair_noise(torch.tensor([0, 1, 2, 3, 4]), 5, 1.0)
        tensor([1, 0, 3, 2, 4])
    """
    rate = _check_rate(rate)
    perm = pair_permutation(num_classes, pairs)
    flip = torch.rand(labels.shape, generator=_generator(seed)) < rate
    return torch.where(flip, perm[labels], labels)


def transition_matrix(kind: str, num_classes: int, rate: float, pairs=None) -> Tensor:
    """The true ``T[i, j] = P(noisy = j | clean = i)`` of a noise model (for checks and oracles)."""
    if kind == "symmetric":
        t = torch.full((num_classes, num_classes), rate / num_classes, dtype=torch.float64)
        return t + torch.eye(num_classes, dtype=torch.float64) * (1 - rate)
    if kind == "pair":
        perm = pair_permutation(num_classes, pairs)
        t = torch.eye(num_classes, dtype=torch.float64) * (1 - rate)
        t[torch.arange(num_classes), perm] += rate
        return t
    raise ValueError(f"unknown noise kind {kind!r}; use 'symmetric' or 'pair'")


def long_tail_counts(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """``n_i = floor(n_max * ratio ** (-i / (C - 1)))`` for ``i = 0 .. C-1``.

    Example:
        >>> long_tail_counts(10, 6000, 100)
        [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    """
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
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
