"""Cross-entropy itself, its soft-target form, and the z-loss regulariser."""

from __future__ import annotations

import torch

from .. import _validation as V
from .._rows import Rows
from ..stats import LSE, TARGET, SoftDot
from ._base import Loss, register

_WEIGHTED_SUM = SoftDot("ones", class_weighted=True)
_WEIGHTED_PROBS = SoftDot("probs", class_weighted=True)


@register("ce")
class CrossEntropy(Loss):
    r"""Cross-entropy with optional label smoothing, exactly as ``torch.nn.functional.cross_entropy``.

    .. math::

        \ell = (1 - \varepsilon)\, w_y (\mathrm{lse} - z_y)
               + \frac{\varepsilon}{C} \sum_k w_k (\mathrm{lse} - z_k)

    with :math:`\mathrm{lse} = \log\sum_j e^{z_j}` and class weights :math:`w` (all ones by default).
    With a class-probability target :math:`q` the smoothed target is
    :math:`q' = (1-\varepsilon) q + \varepsilon / C` and
    :math:`\ell = \sum_k w_k q'_k (\mathrm{lse} - z_k)`.

    Statistics: ``lse``, ``target`` (indices) or ``soft_dot`` (probabilities), plus the weighted
    ``sum`` when smoothing. Streams on every engine.

    Args:
        label_smoothing: :math:`\varepsilon \in [0, 1]`. Default ``0.0``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.CrossEntropy())
        tensor(0.6216)

    Reference: Szegedy et al., *Rethinking the Inception Architecture*, CVPR 2016 (label smoothing).
    """

    shift_invariant = True

    accepts_probs = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = V.real(None, "label_smoothing", label_smoothing, low=0.0, high=1.0)

    def statistics(self, rows: Rows):
        if rows.has_indices:
            return (LSE, TARGET, _WEIGHTED_SUM) if self.label_smoothing else (LSE, TARGET)
        return (LSE, _WEIGHTED_PROBS, _WEIGHTED_SUM) if self.label_smoothing else (LSE, _WEIGHTED_PROBS)

    def _total_weight(self, rows: Rows, like):
        if rows.class_weight is None:
            return float(rows.num_classes)
        return rows.class_weight.sum().to(like.dtype)

    def weighted_row_loss(self, s, rows):
        eps = self.label_smoothing
        lse = s[LSE]
        if rows.has_indices:
            nll = lse - s[TARGET]
            w = rows.target_weight()
            if w is not None:
                nll = nll * w.to(nll.dtype)
            if not eps:
                return nll
            smooth = self._total_weight(rows, lse) * lse - s[_WEIGHTED_SUM]
            return (1 - eps) * nll + (eps / rows.num_classes) * smooth
        probs = rows.probs.to(lse.dtype)
        mass = (probs * rows.class_weight.to(lse.dtype)).sum(-1) if rows.class_weight is not None else probs.sum(-1)
        loss = mass * lse - s[_WEIGHTED_PROBS]
        if not eps:
            return loss
        smooth = self._total_weight(rows, lse) * lse - s[_WEIGHTED_SUM]
        return (1 - eps) * loss + (eps / rows.num_classes) * smooth

    def row_loss(self, s, rows):
        if rows.class_weight is not None:
            raise ValueError("CrossEntropy applies class weights itself: use weighted_row_loss")
        return self.weighted_row_loss(s, rows)

    def dense_row_loss(self, z, rows):
        if rows.has_indices:
            return super().dense_row_loss(z, rows)
        # Class probabilities on whole rows (a target that needs a gradient takes this path):
        # -sum_k w_k q'_k log p_k, as PyTorch forms it. Its derivative in q_k is -w_k log p_k, one
        # number per class; through the statistics (mass * lse - sum_k q_k z_k) it would reach a
        # half-precision target as lse and z_k separately, each rounded to the target's dtype.
        q = rows.probs.to(z.dtype)
        if self.label_smoothing:
            q = (1 - self.label_smoothing) * q + self.label_smoothing / rows.num_classes
        if rows.class_weight is not None:
            q = q * rows.class_weight.to(z.dtype)
        return -(q * torch.log_softmax(z, -1)).sum(-1)


@register("z_loss")
class ZLoss(Loss):
    r"""PaLM's z-loss, :math:`\ell = \lambda\, \mathrm{lse}^2`, which keeps the log-normaliser near 0.

    Usually added to a loss: ``xe.losses.CrossEntropy() + xe.losses.ZLoss(1e-4)`` (or ``z_loss=1e-4``).
    Like every term it is multiplied by ``weight[y]`` when class weights are given.

    Args:
        scale: :math:`\lambda`. Default ``1e-4``.

    Example:
        >>> import torch, crossent as xe
        >>> xe.cross_entropy(torch.tensor([[3.0, 1.0]]), torch.tensor([0]), loss=xe.losses.ZLoss(0.5))
        tensor(4.8888)

    Reference: Chowdhery et al., *PaLM: Scaling Language Modeling with Pathways*, 2022.
    """

    accepts_probs = True

    def __init__(self, scale: float = 1e-4):
        self.scale = V.non_negative("scale", scale, who="z_loss")

    def statistics(self, rows):
        return (LSE,)

    def row_loss(self, s, rows):
        return self.scale * s[LSE] ** 2
