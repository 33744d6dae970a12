"""Loss correction for noisy labels with a known (or estimated) noise transition matrix.

Patrini et al., *Making Deep Neural Networks Robust to Label Noise: a Loss Correction Approach*,
CVPR 2017. ``T`` is a ``C x C`` row-stochastic matrix with ``T[i, j] = P(noisy label = j | clean
label = i)``; the target ``y~`` of every row is the noisy label.

The official code clips the probabilities to ``[1e-7, 1 - 1e-7]`` (Keras' epsilon) before the
correction; with clipping neither loss can be written over mergeable statistics (the clip depends
on ``lse``), so both need whole rows. Without clipping (``clip=False``) both stream:

* forward: ``-log (p^T T)_{y~} = lse(z) - log sum_i exp(z_i) T[i, y~]``, a second log-sum-exp
  whose per-class bias is the column ``log T[:, y~]`` (statistic :class:`TargetRowLogSumExp`);
* backward: ``-sum_j (T^-1)[y~, j] log p_j = (sum_j (T^-1)[y~, j]) lse - sum_j (T^-1)[y~, j] z_j``,
  a dot product of the logits with the row ``T^-1[y~]`` (statistic :class:`TargetRowDot`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._rows import Rows
from ..stats import LSE, Statistic, anchored, lse_state, measured_sum, merge_lse, merge_measured, softmax_from_lse
from ._base import Loss, register

#: Keras' ``K.epsilon()``: the official code clips probabilities to ``[EPS, 1 - EPS]``.
CLIP_EPS = 1e-7


def check_transition_matrix(T, who: str, *, stochastic: bool = True, atol: float = 1e-4) -> Tensor:
    """``T`` as a detached floating tensor, after checking it is a square (row-stochastic) matrix.

    Raises ``TypeError`` for something that is not a real matrix and ``ValueError`` for a wrong
    shape, non-finite or negative entries, or rows that do not sum to 1 (within ``atol``).
    """
    if not isinstance(T, Tensor):
        try:
            T = torch.as_tensor(T)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{who}: T must be a C x C matrix (tensor or nested list), got {type(T).__name__}") from err
    if T.is_complex() or T.dtype == torch.bool:
        raise TypeError(f"{who}: T must hold real numbers, got {T.dtype}")
    if not T.is_floating_point():
        T = T.double()
    if T.dim() != 2 or T.shape[0] != T.shape[1] or T.shape[0] == 0:
        raise ValueError(f"{who}: T must be a square C x C transition matrix, got shape {tuple(T.shape)}")
    if not torch.isfinite(T).all():
        raise ValueError(f"{who}: T has non-finite entries")
    if stochastic:
        if (T < 0).any():
            i, j = (int(v) for v in (T < 0).nonzero()[0])
            raise ValueError(
                f"{who}: T must be non-negative (T[i, j] = P(noisy=j | clean=i)); T[{i}, {j}] = {T[i, j].item()}"
            )
        sums = T.double().sum(1)
        bad = (sums - 1).abs() > atol
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{who}: T must be row-stochastic (each row P(noisy | clean=i) sums to 1); "
                f"row {i} sums to {sums[i].item():.6g}"
            )
    return T.detach()


class _MatrixStatistic(Statistic):
    """A statistic reading one row of a fixed ``C x C`` matrix per logit row (chosen by the target)."""

    def __init__(self, matrix: Tensor):
        self.matrix = matrix
        self._copies: dict = {}

    def _target_rows(self, rows: Rows, cols: slice, like: Tensor) -> Tensor:
        """``matrix[y_n, cols]`` for every row ``n``: ``[N, width]`` in the dtype and device of ``like``."""
        target = rows.require_indices("a transition-matrix statistic")
        key = (like.device, like.dtype)
        if key not in self._copies:  # one copy per device and dtype, not one per chunk
            self._copies[key] = self.matrix.to(device=like.device, dtype=like.dtype)
        return self._copies[key][target][:, cols]


class TargetRowLogSumExp(_MatrixStatistic):
    """``log sum_j exp(z_j + B[y, j])`` for a fixed ``C x C`` matrix ``B`` (row chosen by the target).

    Held as the ``(max, log-sum)`` pair of ``z + B[y]`` (like ``lse``), merged by ``merge_lse``;
    ``dS / d z_j = softmax(z + B[y])_j``. With ``B[y, i] = log T[i, y]`` this
    is ``log (sum_i e^{z_i} T[i, y])``, the streamable half of forward correction.
    """

    @property
    def key(self):
        return ("TargetRowLogSumExp", id(self.matrix))

    def shift(self, rows):
        return 1.0

    def partial(self, z, rows, cols):
        # log T has -inf entries: a chunk where every entry is -inf adds nothing instead of producing NaN.
        return lse_state(z + self._target_rows(rows, cols, z))

    def merge(self, a, b):
        return merge_lse(a, b)

    def finalize(self, state):
        return anchored(*state)

    def add_grad(self, grad, z, coef, values, rows, cols):
        soft = softmax_from_lse(z + self._target_rows(rows, cols, z), values[self])
        scale = coef.to(z.dtype)[:, None]
        if grad is None:
            return soft.mul_(scale)
        return grad.addcmul_(soft, scale)


class TargetRowDot(_MatrixStatistic):
    """``sum_j M[y, j] z_j`` for a fixed ``C x C`` matrix ``M``, measured from the row maximum.

    ``d / d z_j = M[y, j]``; it moves by ``sum_j M[y, j] t`` when every logit moves by ``t``.
    """

    @property
    def key(self):
        return ("TargetRowDot", id(self.matrix))

    def shift(self, rows):
        target = rows.require_indices("a transition-matrix statistic")
        return self.matrix.to(device=target.device, dtype=torch.float64).sum(1)[target]

    def partial(self, z, rows, cols):
        return measured_sum(z, self._target_rows(rows, cols, z), rows.peak)

    def merge(self, a, b):
        return merge_measured(a, b)

    def finalize(self, state):
        return anchored(state[0], state[1])

    def add_grad(self, grad, z, coef, values, rows, cols):
        term = self._target_rows(rows, cols, z) * coef.to(z.dtype)[:, None]
        if grad is None:
            return term
        return grad.add_(term)


class _Correction(Loss):
    """Shared plumbing: the matrix, the clip switch, a compact repr."""

    shift_invariant = True

    def __init__(self, T, clip: bool = True):
        self.T = check_transition_matrix(T, self.name or type(self).__name__)
        self.clip = bool(clip)

    @property
    def streamable(self):  # type: ignore[override]
        return not self.clip

    @property
    def accepts_probs(self):  # type: ignore[override]
        # Probability targets need one log per class of the corrected distribution: whole rows only.
        return self.clip

    def _check_classes(self, rows: Rows) -> None:
        if self.T.shape[0] != rows.num_classes:
            raise ValueError(
                f"{self.name}: T is {self.T.shape[0]} x {self.T.shape[0]} "
                f"but the logits have {rows.num_classes} classes"
            )

    def hparams(self):
        return {"T": self.T, "clip": self.clip}

    def __repr__(self):
        c = self.T.shape[0]
        return f"{type(self).__name__}(T=<{c}x{c} transition matrix>, clip={self.clip})"


def _clipped_probs(z: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1).clamp(CLIP_EPS, 1.0 - CLIP_EPS)


def _safe_log(x: Tensor) -> Tensor:
    # A zero column of T gives q = 0 exactly; clamping keeps the value finite (-log tiny) and the
    # gradient NaN-free, where the official code would return inf.
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


@register("forward_correction")
class ForwardCorrection(_Correction):
    r"""Forward loss correction: cross-entropy of the *noisy* label under the corrected distribution.

    .. math::

        \ell = -\log \big(\tilde p^\top T\big)_{\tilde y}
             = -\log \sum_i \tilde p_i\, T_{i \tilde y},
        \qquad \tilde p = \mathrm{clip}(\mathrm{softmax}(z), 10^{-7}, 1 - 10^{-7})

    with ``T[i, j] = P(noisy = j | clean = i)`` and the official code's clipping (Keras epsilon;
    gradients are zero where a probability is clipped). With class weights the row is multiplied
    by ``weight[y~]``; a class-probability target ``q`` gives ``-sum_j w_j q_j log (p^T T)_j``. An
    identity ``T`` gives cross-entropy (on clipped probabilities).

    ``clip=False`` drops the clipping and streams on every engine (class-index targets):
    ``lse(z) - log sum_i e^{z_i} T[i, y~]``. With ``clip=True`` (default) it needs whole rows
    (dense and row-chunked engines). A column of ``T`` that is all zero makes the loss of that noisy
    label ``-log(tiny)`` (finite) instead of the official ``inf``.

    Args:
        T: ``[C, C]`` row-stochastic transition matrix (tensor or nested list).
        clip: clip the probabilities as the official code does. Default ``True``.

    Example:
        >>> import torch, crossent as xe
        >>> T = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
        >>> logits, noisy = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1])
        >>> xe.cross_entropy(logits, noisy, loss=xe.losses.ForwardCorrection(T))
        tensor(0.9593)
        >>> xe.cross_entropy(logits, noisy, loss=xe.losses.ForwardCorrection(torch.eye(2)))  # CE
        tensor(1.2201)

    Reference: Patrini et al., *Making Deep Neural Networks Robust to Label Noise: a Loss
    Correction Approach*, CVPR 2017 (official code: ``giorgiop/loss-correction``, ``loss.py``).
    """

    def __init__(self, T, clip: bool = True):
        super().__init__(T, clip)
        # B[y, i] = log T[i, y]: the per-class bias of the second log-sum-exp, one row per noisy label.
        self._log_columns = torch.log(self.T.double()).T.contiguous()
        self._noisy_lse = TargetRowLogSumExp(self._log_columns)

    def statistics(self, rows):
        return (LSE, self._noisy_lse)

    def row_loss(self, s, rows):
        self._check_classes(rows)
        return s[LSE] - s[self._noisy_lse]

    def dense_row_loss(self, z, rows):
        self._check_classes(rows)
        if not self.clip:
            return super().dense_row_loss(z, rows)
        q = _clipped_probs(z) @ self.T.to(device=z.device, dtype=z.dtype)
        log_q = _safe_log(q)
        weight = rows.class_weight.to(z.dtype) if rows.class_weight is not None else None
        if rows.has_indices:
            loss = -log_q.gather(-1, rows.target[:, None]).squeeze(-1)
            return loss if weight is None else loss * weight[rows.target]
        target = rows.probs.to(z.dtype)
        if weight is not None:
            target = target * weight
        return -(target * log_q).sum(-1)


@register("backward_correction")
class BackwardCorrection(_Correction):
    r"""Backward loss correction: cross-entropy against the row ``T^{-1}[y~]`` of the inverse matrix.

    .. math::

        \ell = -\sum_j \big(T^{-1}\big)_{\tilde y j} \log \tilde p_j,
        \qquad \tilde p = \mathrm{clip}(\mathrm{softmax}(z), 10^{-7}, 1 - 10^{-7})

    An unbiased estimator of the clean-label loss; entries of ``T^{-1}`` can be negative, so the
    loss can be negative and is unbounded below without clipping (the clip bounds it). With class
    weights the row is multiplied by ``weight[y~]``; a probability target ``q`` uses the row
    ``(w * q) @ T^{-1}`` (the official code's ``y_true @ P_inv``). An identity ``T`` gives
    cross-entropy.

    Streaming: the loss is linear in ``log p``, but the official clip makes each term depend on
    ``lse``, so with ``clip=True`` (default) it needs whole rows. ``clip=False`` streams on every
    engine (class-index targets): ``(sum_j T^{-1}[y~, j]) lse - sum_j T^{-1}[y~, j] z_j``, one extra
    statistic (the dot product with the row ``T^{-1}[y~]``, chunked by columns like ``z``).

    Args:
        T: ``[C, C]`` row-stochastic, invertible transition matrix.
        clip: clip the probabilities as the official code does. Default ``True``.

    Raises:
        ValueError: if ``T`` is singular or too ill-conditioned to invert (condition number > 1e12).

    Example:
        >>> import torch, crossent as xe
        >>> T = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
        >>> logits, noisy = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1])
        >>> xe.cross_entropy(logits, noisy, loss=xe.losses.BackwardCorrection(T))
        tensor(1.5201)

    Reference: Patrini et al., CVPR 2017 (official code: ``giorgiop/loss-correction``, ``loss.py``).
    """

    def __init__(self, T, clip: bool = True):
        super().__init__(T, clip)
        T64 = self.T.double()
        cond = torch.linalg.cond(T64).item()
        if not cond < 1e12:
            raise ValueError(
                f"backward_correction: T is singular or nearly so (condition number {cond:.3g}); it must be invertible"
            )
        self._inverse = torch.linalg.inv(T64)
        self._inverse_row_sums = self._inverse.sum(1)
        self._dot = TargetRowDot(self._inverse)

    @property
    def T_inverse(self) -> Tensor:
        """``T^{-1}`` (float64)."""
        return self._inverse

    def statistics(self, rows):
        return (LSE, self._dot)

    def row_loss(self, s, rows):
        self._check_classes(rows)
        row_sum = self._inverse_row_sums.to(device=s[LSE].device, dtype=s[LSE].dtype)[rows.target]
        return row_sum * s[LSE] - s[self._dot]

    def dense_row_loss(self, z, rows):
        self._check_classes(rows)
        if not self.clip:
            return super().dense_row_loss(z, rows)
        inverse = self._inverse.to(device=z.device, dtype=z.dtype)
        log_p = torch.log(_clipped_probs(z))
        weight = rows.class_weight.to(z.dtype) if rows.class_weight is not None else None
        if rows.has_indices:
            loss = -(inverse[rows.target] * log_p).sum(-1)
            return loss if weight is None else loss * weight[rows.target]
        target = rows.probs.to(z.dtype)
        if weight is not None:
            target = target * weight
        return -((target @ inverse) * log_p).sum(-1)


__all__ = [
    "ForwardCorrection",
    "BackwardCorrection",
    "TargetRowLogSumExp",
    "TargetRowDot",
    "check_transition_matrix",
    "CLIP_EPS",
]
