"""Label noise for the training set, by the definitions of the papers whose protocols the harness follows.

Each definition is a named :class:`NoiseModel` (``crossent compare --noise NAME``) that corrupts labels
and gives the transition matrix ``T[i, j] = P(noisy = j | clean = i)`` it produces on those labels.

==========================  ==============================================================================
name                        definition
==========================  ==============================================================================
``apl-symmetric``           Active-Passive-Losses (Ma et al. 2020): ``k = floor(floor(rate * N) / C)``
                            examples of every class, drawn without replacement, get a label drawn
                            uniformly from the *other* ``C - 1`` classes. Flips ``C k / N``, about ``rate``.
``apl-asymmetric``          Active-Passive-Losses, MNIST: ``7 -> 1``, ``2 -> 7``, ``5 <-> 6``, ``3 -> 8``,
                            each label of those classes independently with probability ``rate``
                            (10 classes only).
``ldr-uniform``             LDR-KL (Zhu et al. 2023): every label, with probability ``rate``, is replaced by
                            a class drawn uniformly from all ``C`` (itself included), so about
                            ``rate (C - 1) / C`` of the labels change.
``ldr-class-dependent``     LDR-KL: with probability ``rate`` a label moves to its partner under a fixed
                            class map: the published swap pairs where the dataset has them (Letter,
                            Vowel), ``i -> (i + 1) mod C`` otherwise.
``adjacent-swap``           ``0 <-> 1``, ``2 <-> 3``, ... with probability ``rate``. No reference uses it; it
                            is kept for comparison with older results of this harness.
==========================  ==============================================================================

Every draw comes from a ``torch.Generator`` seeded by the run's seed, so a (definition, rate, seed)
gives the same labels on every machine; the reference implementations draw from NumPy, so their
individual flips differ while the distribution is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Active-Passive-Losses' MNIST asymmetric map (source class -> noisy class).
APL_MNIST_MAP = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def check_rate(rate: float) -> float:
    """``rate`` as a float in [0, 1], or ValueError."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate:g}")
    return rate


# -- class maps -------------------------------------------------------------------------------------
def swap_map(num_classes: int, pairs) -> Tensor:
    """``perm[i]``: the partner of ``i`` under disjoint swap ``pairs`` (itself if it has none)."""
    perm = torch.arange(num_classes)
    seen: set[int] = set()
    for a, b in pairs:
        if not (0 <= a < num_classes and 0 <= b < num_classes) or a == b or {a, b} & seen:
            raise ValueError(f"pairs must be disjoint pairs of distinct classes in [0, {num_classes}), got {pairs}")
        seen |= {a, b}
        perm[a], perm[b] = b, a
    return perm


def adjacent_pairs(num_classes: int) -> list[tuple[int, int]]:
    """``(0, 1), (2, 3), ...``."""
    return [(2 * i, 2 * i + 1) for i in range(num_classes // 2)]


def next_class_map(num_classes: int) -> Tensor:
    """``i -> (i + 1) mod C``."""
    return (torch.arange(num_classes) + 1) % num_classes


def apl_mnist_map(num_classes: int) -> Tensor:
    if num_classes != 10:
        raise ValueError(f"apl-asymmetric is defined for 10-class data (digits), not {num_classes} classes")
    perm = torch.arange(10)
    for src, dst in APL_MNIST_MAP.items():
        perm[src] = dst
    return perm


def _map_transition(perm: Tensor, rate: float) -> Tensor:
    """``T`` of "move to ``perm[i]`` with probability ``rate``" (rows with ``perm[i] == i`` stay identity)."""
    c = len(perm)
    t = torch.zeros(c, c, dtype=torch.float64)
    t[torch.arange(c), torch.arange(c)] = 1 - rate
    t[torch.arange(c), perm] += rate
    return t


def _flip_by_map(labels: Tensor, perm: Tensor, rate: float, g: torch.Generator) -> Tensor:
    # One uniform draw per label, whether or not its class moves, as the reference loops do.
    flip = torch.rand(labels.shape, generator=g) < rate
    return torch.where(flip, perm[labels], labels)


# -- the definitions ------------------------------------------------------------------------------------
def apl_symmetric(labels: Tensor, num_classes: int, rate: float, seed=0, pairs=None) -> Tensor:
    """Active-Passive-Losses symmetric noise: exactly ``floor(floor(rate N) / C)`` flips per class.

    Example:
        >>> y = torch.arange(10).repeat(100)
        >>> changed = apl_symmetric(y, 10, 0.4, seed=0) != y
        >>> changed.sum().item(), torch.bincount(y[changed]).tolist()
        (400, [40, 40, 40, 40, 40, 40, 40, 40, 40, 40])
    """
    rate = check_rate(rate)
    g = _generator(seed)
    per_class = _apl_per_class(labels, num_classes, rate)
    noisy = labels.clone()
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=g)[:per_class]]
        # a uniform draw among the C - 1 other classes: skip over c itself
        other = torch.randint(0, num_classes - 1, (len(chosen),), generator=g)
        noisy[chosen] = other + (other >= c).long()
    return noisy


def _apl_per_class(labels: Tensor, num_classes: int, rate: float) -> int:
    per_class = int(int(rate * len(labels)) / num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < per_class]
    if short:
        raise ValueError(
            f"apl-symmetric flips {per_class} labels of every class, but class {short[0]} has only "
            f"{int(counts[short[0]])} examples; use ldr-uniform on imbalanced data"
        )
    return per_class


def apl_symmetric_transition(labels: Tensor, num_classes: int, rate: float, pairs=None) -> Tensor:
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    flipped = _apl_per_class(labels, num_classes, rate) / counts  # per-class share that changes
    t = (flipped / (num_classes - 1)).unsqueeze(1).expand(num_classes, num_classes).clone()
    t[torch.arange(num_classes), torch.arange(num_classes)] = 1 - flipped
    return t


def apl_asymmetric(labels: Tensor, num_classes: int, rate: float, seed=0, pairs=None) -> Tensor:
    """Active-Passive-Losses MNIST asymmetric noise (``7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8``)."""
    return _flip_by_map(labels, apl_mnist_map(num_classes), check_rate(rate), _generator(seed))


def ldr_uniform(labels: Tensor, num_classes: int, rate: float, seed=0, pairs=None) -> Tensor:
    """LDR-KL uniform noise: each label redrawn from all ``C`` classes with probability ``rate``.

    Example:
        >>> y = torch.zeros(10000, dtype=torch.long)
        >>> round((ldr_uniform(y, 10, 0.5, seed=0) != y).float().mean().item(), 2)  # 0.5 * 9 / 10
        0.45
    """
    rate = check_rate(rate)
    g = _generator(seed)
    flip = torch.rand(labels.shape, generator=g) < rate
    random = torch.randint(0, num_classes, labels.shape, generator=g)
    return torch.where(flip, random, labels)


def ldr_uniform_transition(labels: Tensor, num_classes: int, rate: float, pairs=None) -> Tensor:
    t = torch.full((num_classes, num_classes), rate / num_classes, dtype=torch.float64)
    return t + torch.eye(num_classes, dtype=torch.float64) * (1 - rate)


def class_dependent_map(num_classes: int, pairs=None) -> Tensor:
    """LDR-KL's class-dependent map: the dataset's swap pairs if it has them, ``i -> i + 1 mod C`` otherwise."""
    return swap_map(num_classes, pairs) if pairs is not None else next_class_map(num_classes)


@dataclass(frozen=True)
class NoiseModel:
    """A named label-noise definition: how it corrupts labels and the transition matrix it yields."""

    name: str
    summary: str
    source: str
    #: ``corrupt(labels, num_classes, rate, seed, pairs) -> noisy labels``
    corrupt: Callable[..., Tensor]
    #: ``transition(clean_labels, num_classes, rate, pairs) -> T`` (float64, rows sum to 1)
    transition: Callable[..., Tensor]

    def check(self, labels: Tensor, num_classes: int, rate: float, pairs=None) -> None:
        """Raise ValueError now if this definition cannot apply to these labels (before any training)."""
        self.transition(labels, num_classes, check_rate(rate), pairs)

    def check_classes(self, num_classes: int) -> None:
        """Raise ValueError now if this definition cannot apply to ``num_classes`` classes (before any data is
        loaded). At rate 0 no definition depends on the class sizes, only on their number."""
        self.transition(torch.arange(num_classes), num_classes, 0.0)


MODELS: dict[str, NoiseModel] = {
    m.name: m
    for m in (
        NoiseModel(
            "apl-symmetric", "floor(floor(rate N) / C) labels of every class move to a uniformly drawn other class",
            "Ma et al. 2020, Active-Passive-Losses code (dataset.py)", apl_symmetric, apl_symmetric_transition,
        ),
        NoiseModel(
            "apl-asymmetric", "7->1, 2->7, 5<->6, 3->8, each with probability rate (10 classes)",
            "Ma et al. 2020, Active-Passive-Losses code (MNIST)", apl_asymmetric,
            lambda y, c, r, pairs=None: _map_transition(apl_mnist_map(c), r),
        ),
        NoiseModel(
            "ldr-uniform", "each label redrawn from all C classes with probability rate",
            "Zhu et al. 2023, LDR-KL code (uniform_noise)", ldr_uniform, ldr_uniform_transition,
        ),
        NoiseModel(
            "ldr-class-dependent",
            "with probability rate a label moves to its partner: the dataset's swap pairs, else i -> i+1 mod C",
            "Zhu et al. 2023, LDR-KL code (classDep_letter / classDep_vowel / classDep_noise)",
            lambda y, c, r, seed=0, pairs=None: _flip_by_map(y, class_dependent_map(c, pairs), check_rate(r), _generator(seed)),
            lambda y, c, r, pairs=None: _map_transition(class_dependent_map(c, pairs), r),
        ),
        NoiseModel(
            "adjacent-swap", "0<->1, 2<->3, ... with probability rate (no published protocol uses it)",
            "this harness's former default pair noise",
            lambda y, c, r, seed=0, pairs=None: _flip_by_map(y, swap_map(c, adjacent_pairs(c)), check_rate(r), _generator(seed)),
            lambda y, c, r, pairs=None: _map_transition(swap_map(c, adjacent_pairs(c)), r),
        ),
    )
}

#: Former names, refused with a pointer to the definitions they could mean.
RETIRED = {
    "symmetric": "'symmetric' was ambiguous: use apl-symmetric (exact per-class flips to another class) or "
    "ldr-uniform (redraw from all classes, the former behaviour)",
    "pair": "'pair' was ambiguous: use ldr-class-dependent (the published Letter/Vowel pairs, i -> i+1 mod C "
    "elsewhere) or adjacent-swap (0<->1, 2<->3, the former default)",
}


def names() -> list[str]:
    return list(MODELS)


def get(name: str) -> NoiseModel:
    """The noise definition called ``name``; ValueError naming the choices otherwise."""
    if name in MODELS:
        return MODELS[name]
    if name in RETIRED:
        raise ValueError(RETIRED[name])
    raise ValueError(f"unknown noise {name!r}; choose from none, {', '.join(MODELS)}")


def flip_rate(clean: Tensor, noisy: Tensor) -> float:
    """Fraction of labels that changed."""
    return (clean != noisy).double().mean().item()


def empirical_transition(clean: Tensor, noisy: Tensor, num_classes: int) -> Tensor:
    """Row-normalised counts of (clean, noisy) pairs."""
    t = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    t.index_put_((clean, noisy), torch.ones(len(clean), dtype=torch.float64), accumulate=True)
    return t / t.sum(1, keepdim=True).clamp_min(1)
