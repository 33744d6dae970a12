"""Noisy labels with a transition matrix: estimation, loss correction, and importance resampling.

``T[i, j] = P(noisy label = j | clean label = i)`` throughout (rows sum to 1).
:class:`ForwardCorrection` and :class:`BackwardCorrection` are the registry losses
``forward_correction`` / ``backward_correction`` of :mod:`crossent.losses` (one implementation).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ..losses._correction import BackwardCorrection, ForwardCorrection, check_transition_matrix
from .._rows import compute_dtype
from ._base import Strategy, check_index_tensor, check_losses, check_probabilities

__all__ = [
    "ForwardCorrection",
    "BackwardCorrection",
    "estimate_transition_matrix",
    "RENT",
    "DirichletWeightSampling",
]


def _anchor_below_percentile(scores: Tensor, percentile: float) -> int:
    """Index of the largest score strictly below the ``percentile``-th percentile ('higher' rule).

    This is the official estimator's outlier filter: ``np.percentile(s, q, interpolation='higher')``
    picks the sorted value at index ``ceil(q/100 * (n - 1))``; scores at or above it are dropped.
    """
    n = scores.numel()
    position = math.ceil(percentile / 100.0 * (n - 1))
    threshold = torch.sort(scores).values[position]
    below = scores < threshold
    if not below.any():
        # Every score ties at the threshold: the official code would pick an arbitrary zeroed entry.
        return int(torch.argmax(scores))
    return int(torch.argmax(torch.where(below, scores, torch.full_like(scores, -math.inf))))


def estimate_transition_matrix(
    probs: Tensor, noisy_labels: Tensor | None = None, percentile: float | None = 97.0, *, row_normalize: bool = True
) -> Tensor:
    r"""Estimate ``T`` from the probabilities of a model trained on the noisy labels (anchor points).

    For each class ``i`` pick an anchor example ``x_i`` that the model believes most strongly to be
    of class ``i``, and set ``T[i, :] = p(x_i)``; then normalise the rows (Patrini et al., 2017).
    With ``percentile`` (the official ``filter_outlier=True``, used for every dataset but CIFAR-100)
    the anchor is the example with the largest ``p_i`` strictly below the ``percentile``-th
    percentile of ``p_i`` (numpy's ``'higher'`` rule), which skips overconfident outliers; with
    ``percentile=None`` it is ``argmax_x p_i(x)``.

    ``noisy_labels`` restricts the candidates for class ``i`` to the examples labelled ``i``, as the
    RENT code does (which then takes the ``int(0.03 n_i)``-th largest ``p_i``: two ranks above this
    rule's anchor for most ``n_i``, one for the others); without them every example is a candidate,
    as in the original estimator. RENT stores the estimate transposed (``T[noisy, clean]``). Deviation: the
    original code zeroes the filtered entries of the probability matrix in place, so a later row
    can read a zeroed column; this function does not modify ``probs``.

    Args:
        probs: ``[N, C]`` predicted probabilities (rows sum to 1) on held-out or training data.
        noisy_labels: optional ``[N]`` noisy labels.
        percentile: outlier filter in ``(0, 100]``, or ``None`` for the plain argmax. Default ``97``.
        row_normalize: divide each row by its sum (official default ``True``).

    Returns:
        ``[C, C]`` estimate of ``T`` (dtype of ``probs``, at least float32).

    Example:
        >>> import torch
        >>> from crossent.weighting import estimate_transition_matrix
        >>> probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
        >>> estimate_transition_matrix(probs, percentile=None)
        tensor([[0.9000, 0.1000],
                [0.2000, 0.8000]])
    """
    who = "estimate_transition_matrix"
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() != 2:
        raise TypeError(f"{who}: probs must be a floating-point [N, C] tensor")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{who}: probs is empty (shape {tuple(probs.shape)})")
    probs = probs.detach().to(compute_dtype(probs.dtype))
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"{who}: probs must be finite and non-negative")
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"{who}: percentile must be in (0, 100] or None, got {percentile}")
    num_classes = probs.shape[1]
    if noisy_labels is not None:
        noisy_labels = check_index_tensor(noisy_labels, "noisy_labels", who)
        if noisy_labels.shape != (probs.shape[0],):
            raise ValueError(f"{who}: noisy_labels must have shape [{probs.shape[0]}], got {tuple(noisy_labels.shape)}")
        if ((noisy_labels < 0) | (noisy_labels >= num_classes)).any():
            raise ValueError(f"{who}: noisy_labels must lie in [0, {num_classes})")
    T = torch.empty(num_classes, num_classes, dtype=probs.dtype, device=probs.device)
    for i in range(num_classes):
        candidates = probs if noisy_labels is None else probs[noisy_labels == i]
        if candidates.shape[0] == 0:
            raise ValueError(f"{who}: no example is labelled {i}; cannot pick an anchor for that class")
        scores = candidates[:, i]
        best = int(torch.argmax(scores)) if percentile is None else _anchor_below_percentile(scores, float(percentile))
        T[i] = candidates[best]
    if row_normalize:
        T = T / T.sum(1, keepdim=True)
    return T


def _importance(T: Tensor, probs: Tensor, target: Tensor, eps_num: float) -> Tensor:
    """``(p_y + eps_num) / ((p^T T)_y + 1e-12)``: P(clean = y~ | x) / P(noisy = y~ | x)."""
    true = probs.gather(1, target[:, None]).squeeze(1)
    noisy = (probs @ T.to(device=probs.device, dtype=probs.dtype)).gather(1, target[:, None]).squeeze(1)
    return (true + eps_num) / (noisy + 1e-12)


class _Sampling(Strategy):
    """Shared: the matrix, the inputs, and a generator whose state ``weights`` only peeks at."""

    def __init__(self, T, generator: torch.Generator | None):
        self.T = check_transition_matrix(T, type(self).__name__)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"{type(self).__name__}: generator must be a torch.Generator, got {type(generator).__name__}"
            )
        self.generator = generator

    def _labels_and_probs(self, target, probs, logits, rows: int):
        who = type(self).__name__
        target = check_index_tensor(target, "target", who)
        if target.shape != (rows,):
            raise ValueError(
                f"{who}: target must have shape [{rows}] (one noisy label per row), got {tuple(target.shape)}"
            )
        num_classes = self.T.shape[0]
        if ((target < 0) | (target >= num_classes)).any():
            raise ValueError(f"{who}: target (noisy labels) must lie in [0, {num_classes})")
        return target.long(), check_probabilities(probs, logits, who, rows=rows, num_classes=num_classes)

    def _inputs(self, losses, target, probs, logits):
        who = type(self).__name__
        losses = check_losses(losses, who, dim=1)
        if losses.numel() == 0:
            raise ValueError(f"{who}: losses must hold at least one row")
        return (losses, *self._labels_and_probs(target, probs, logits, losses.shape[0]))

    @contextlib.contextmanager
    def _peek(self, device):
        """Run a draw without moving the generator (or the global RNG) forward."""
        if self.generator is not None:
            state = self.generator.get_state()
            try:
                yield
            finally:
                self.generator.set_state(state)
        else:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                yield

    def state_dict(self) -> dict:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            if self.generator is None:
                raise ValueError(f"{type(self).__name__} has no generator to restore; construct it with generator=")
            self.generator.set_state(state["generator"])


class RENT(_Sampling):
    r"""RENT: transition-matrix importance resampling for noisy labels (Bae et al., ICLR 2024).

    With detached model probabilities ``p`` and the noisy label ``y~`` of each row,

    .. math::

        w_i = \frac{p_{\tilde y_i}(x_i)}{\sum_k T_{k \tilde y_i}\, p_k(x_i) + 10^{-12}}
            = \frac{P(y = \tilde y \mid x)}{P(\tilde y \mid x)},

    ``M = int(resample_ratio * N)`` row indices are drawn with replacement with probability
    proportional to ``w`` (``torch.multinomial``), and the loss is the mean of the per-row losses at
    the drawn indices. :meth:`weights` returns the equivalent per-row weights
    ``count_i * N / M`` (so the loss is ``mean(weights * losses)``); :meth:`importance` returns ``w``.

    The draw uses ``generator`` when given (on the device of the inputs; else the global RNG);
    :meth:`weights` peeks at the draw that ``__call__`` will make without consuming it.

    Args:
        T: ``[C, C]`` row-stochastic transition matrix (true or estimated), ``T[clean, noisy]``. The
            RENT code keeps the transpose, ``T[noisy, clean]`` (its columns sum to 1): pass ``T.T``
            of a matrix taken from it.
        resample_ratio: ``N`` in the paper's code (``--N``). Default ``1.0``.
        generator: optional ``torch.Generator`` (state saved by :meth:`state_dict`).

    Inputs: ``losses`` ``[N]`` (e.g. ``crossent.cross_entropy(..., reduction="none")``),
    ``target=`` ``[N]`` noisy labels, and ``probs=`` ``[N, C]`` or ``logits=`` ``[N, C]``.

    Example:
        >>> import torch
        >>> from crossent.weighting import RENT
        >>> T = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
        >>> rent = RENT(T, generator=torch.Generator().manual_seed(0))
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
        >>> target = torch.tensor([0, 1, 1])
        >>> rent.importance(target=target, probs=probs)
        tensor([1.2162, 0.3846, 1.1765])
        >>> losses = torch.tensor([0.1, 2.3, 0.2])
        >>> rent.weights(losses, target=target, probs=probs)
        tensor([0., 1., 2.])
        >>> rent(losses, target=target, probs=probs)
        tensor(0.9000)

    Reference: Bae et al., *Dirichlet-based Per-Sample Weighting by Transition Matrix for Noisy
    Label Learning*, ICLR 2024 (official code: ``BaeHeeSun/RENT``, ``RENT/library/method_utils.py``).
    """

    def __init__(self, T, resample_ratio: float = 1.0, *, generator: torch.Generator | None = None):
        super().__init__(T, generator)
        if not float(resample_ratio) > 0:
            raise ValueError(f"RENT: resample_ratio must be > 0, got {resample_ratio}")
        self.resample_ratio = float(resample_ratio)

    def importance(self, *, target: Tensor, probs: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """The importance ratios ``w`` ``[N]`` (deterministic)."""
        target = check_index_tensor(target, "target", "RENT")
        if target.dim() != 1:
            raise ValueError(f"RENT: target must be 1-D [N], got shape {tuple(target.shape)}")
        target, p = self._labels_and_probs(target, probs, logits, target.shape[0])
        return _importance(self.T, p, target, 0.0)

    def _draw(self, losses, target, probs, logits):
        losses, target, p = self._inputs(losses, target, probs, logits)
        w = _importance(self.T, p, target, 0.0)
        count = int(self.resample_ratio * losses.shape[0])
        if count < 1:
            raise ValueError(f"RENT: resample_ratio * N = {self.resample_ratio * losses.shape[0]} draws no row")
        if not torch.isfinite(w).all() or not (w.sum() > 0):
            raise ValueError(
                "RENT: the importance weights are not finite or are all zero; check T and the probabilities"
            )
        idx = torch.multinomial(w, num_samples=count, replacement=True, generator=self.generator)
        return losses, idx

    def weights(
        self, losses: Tensor, *, target: Tensor, probs: Tensor | None = None, logits: Tensor | None = None
    ) -> Tensor:
        with self._peek(losses.device if isinstance(losses, Tensor) else torch.device("cpu")):
            losses, idx = self._draw(losses, target, probs, logits)
        counts = torch.bincount(idx, minlength=losses.shape[0]).to(compute_dtype(losses.dtype))
        return counts * (losses.shape[0] / idx.numel())

    def __call__(
        self, losses: Tensor, *, target: Tensor, probs: Tensor | None = None, logits: Tensor | None = None
    ) -> Tensor:
        losses, idx = self._draw(losses, target, probs, logits)
        return losses[idx].mean()

    def _repr_args(self):
        return {"num_classes": self.T.shape[0], "resample_ratio": self.resample_ratio}


class DirichletWeightSampling(_Sampling):
    r"""Dirichlet-based per-sample weighting, the reweighting family of RENT's paper (DWS).

    With ``w_i = (p_{y~_i} + 1e-12) / ((p^T T)_{y~_i} + 1e-12)`` (note the ``1e-12`` in the
    numerator too, as in the official DWS code, unlike :class:`RENT`) normalised to sum to 1, draw
    ``B`` weight vectors ``pi_b ~ Dirichlet(alpha * w)`` and return ``mean_b sum_i pi_{b,i} l_i``.
    Large ``alpha`` approaches normalised importance reweighting, small ``alpha`` behaves like
    resampling. The official code draws ``B`` = the configured batch size; ``num_draws=None`` uses
    the number of rows. :meth:`weights` returns ``N * mean_b pi_b`` (the loss is
    ``mean(weights * losses)``).

    The draw uses ``generator`` when given (the Dirichlet sampler is seeded from it; otherwise the
    global RNG is used, which reproduces ``torch.distributions.Dirichlet(alpha * w).sample((1, B))[0]``
    under the same seed). ``alpha`` has no default in the paper: it must be set.

    Args:
        T: ``[C, C]`` row-stochastic transition matrix.
        alpha: Dirichlet concentration scale, > 0.
        num_draws: ``B``; default the number of rows.
        generator: optional ``torch.Generator``.

    Inputs: as :class:`RENT`.

    Example:
        >>> import torch
        >>> from crossent.weighting import DirichletWeightSampling
        >>> T = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
        >>> dws = DirichletWeightSampling(T, alpha=1e6, generator=torch.Generator().manual_seed(0))
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
        >>> dws.weights(torch.zeros(3), target=torch.tensor([0, 1, 1]), probs=probs)
        tensor([1.3134, 0.4157, 1.2709])

    Reference: Bae et al., ICLR 2024 (official code: ``BaeHeeSun/RENT``, ``DWS/library/method_utils.py``).
    """

    def __init__(self, T, alpha: float, *, num_draws: int | None = None, generator: torch.Generator | None = None):
        super().__init__(T, generator)
        if not float(alpha) > 0:
            raise ValueError(f"DirichletWeightSampling: alpha must be > 0, got {alpha}")
        if num_draws is not None and (int(num_draws) != num_draws or num_draws < 1):
            raise ValueError(f"DirichletWeightSampling: num_draws must be a positive integer, got {num_draws}")
        self.alpha = float(alpha)
        self.num_draws = None if num_draws is None else int(num_draws)

    def _draw(self, losses, target, probs, logits):
        losses, target, p = self._inputs(losses, target, probs, logits)
        w = _importance(self.T, p, target, 1e-12)
        concentration = self.alpha * w / w.sum()
        draws = self.num_draws or losses.shape[0]
        dirichlet = torch.distributions.Dirichlet(concentration)
        if self.generator is None:
            return losses, dirichlet.sample((1, draws))[0]
        # Dirichlet sampling takes no generator: seed a forked global RNG from ours instead.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        devices = [losses.device] if losses.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return losses, dirichlet.sample((1, draws))[0]

    def weights(
        self, losses: Tensor, *, target: Tensor, probs: Tensor | None = None, logits: Tensor | None = None
    ) -> Tensor:
        with self._peek(losses.device if isinstance(losses, Tensor) else torch.device("cpu")):
            losses, pi = self._draw(losses, target, probs, logits)
        return (pi.mean(0) * losses.shape[0]).to(compute_dtype(losses.dtype))

    def __call__(
        self, losses: Tensor, *, target: Tensor, probs: Tensor | None = None, logits: Tensor | None = None
    ) -> Tensor:
        losses, pi = self._draw(losses, target, probs, logits)
        return torch.mean(pi.to(losses.dtype) @ losses)

    def _repr_args(self):
        return {"num_classes": self.T.shape[0], "alpha": self.alpha, "num_draws": self.num_draws}
