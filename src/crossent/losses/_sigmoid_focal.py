"""Sigmoid (per-element, one-vs-all) focal loss: the functional and the registry loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._rows import Rows
from .. import _validation as V
from ._base import Loss, register



def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    r"""Sigmoid focal loss, elementwise; same signature and values as ``torchvision.ops.sigmoid_focal_loss``.

    With :math:`p = \sigma(x)` and a target :math:`t \in [0, 1]` (binary or soft),
    :math:`p_t = p\,t + (1-p)(1-t)`:

    .. math::

        \ell = \alpha_t\, (1 - p_t)^\gamma\, \mathrm{BCE}(x, t), \qquad
        \alpha_t = \alpha t + (1 - \alpha)(1 - t)

    and :math:`\alpha_t = 1` when ``alpha < 0``. The modulating factor is computed in log space,
    :math:`\log(1-p_t) = \mathrm{logaddexp}(\log t - \mathrm{softplus}(x),\ \log(1-t) - \mathrm{softplus}(-x))`,
    which for binary targets is the ``exp(-gamma*t*x - gamma*softplus(-x))`` form of the class-balanced
    loss code: values agree with torchvision's, and stay exact (with finite gradients, also for
    ``gamma < 1``) where :math:`1 - p_t` underflows. Gradients with respect to ``targets`` are finite
    for targets strictly inside (0, 1).

    Args:
        inputs: logits of any shape.
        targets: same shape, values in [0, 1] (integer or bool targets are cast to ``inputs.dtype``).
        alpha: weight of the positive term in (0, 1), or negative to disable. Default ``0.25``.
        gamma: focusing exponent :math:`\gamma \ge 0`. Default ``2.0``.
        reduction: ``"none"`` (elementwise), ``"mean"`` (over all elements) or ``"sum"``.
            Default ``"none"``; RetinaNet divides the sum by the number of positive anchors.

    Example:
        >>> import torch, crossent as xe
        >>> x = torch.tensor([[2.0, -1.0, 0.5]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0]])
        >>> xe.losses.sigmoid_focal_loss(x, t)
        tensor([[0.0005, 0.0170, 0.2831]])

    Reference: Lin et al., *Focal Loss for Dense Object Detection*, ICCV 2017.
    """
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("inputs and targets must be tensors")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must hold floating-point logits, got {inputs.dtype}")
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}")
    V.check_reduction(reduction)
    alpha = V.real(None, "alpha", alpha)
    gamma = V.non_negative("gamma", gamma)
    if not targets.is_floating_point():
        targets = targets.to(inputs.dtype)

    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if gamma:
        log_one_minus_pt = torch.logaddexp(
            torch.log(targets) - F.softplus(inputs), torch.log1p(-targets) - F.softplus(-inputs)
        )
        loss = loss * torch.exp(gamma * log_one_minus_pt)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@register("sigmoid_focal")
class SigmoidFocal(Loss):
    r"""Sigmoid focal loss over the classes of a row, for :func:`crossent.cross_entropy`.

    Each class is an independent binary problem against the one-hot encoding of a class-index
    target (or against a class-probability target, used elementwise), and the row's loss is the sum
    over its classes of :func:`sigmoid_focal_loss`:

    .. math::

        \ell = \sum_{k=1}^{C} \alpha_{t_k} (1 - p_{t_k})^\gamma\, \mathrm{BCE}(z_k, t_k)

    With class-index targets ``weight[y]`` multiplies the whole row (as class-balanced focal loss
    does); with probability targets ``weight[k]`` multiplies the term of class ``k``. The per-element
    form needs the whole row here (``streamable = False``). For detection-style normalisation
    (sum divided by the number of positives) use ``reduction="sum"`` and divide.

    Args:
        gamma: focusing exponent :math:`\gamma \ge 0`. Default ``2.0``.
        alpha: weight of the positive term in (0, 1), or negative to disable. Default ``0.25``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, -1.0, 0.5]])
        >>> xe.cross_entropy(logits, torch.tensor([0]), loss=xe.losses.SigmoidFocal())
        tensor(0.3005)

    Reference: Lin et al., *Focal Loss for Dense Object Detection*, ICCV 2017 (values as
    ``torchvision.ops.sigmoid_focal_loss``).
    """

    streamable = False
    accepts_probs = True

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        self.gamma = V.non_negative("gamma", gamma)
        self.alpha = V.real(None, "alpha", alpha)

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        if rows.has_indices:
            t = F.one_hot(rows.target, z.shape[-1]).to(z.dtype)
        else:
            t = rows.probs.to(z.dtype)
        elems = sigmoid_focal_loss(z, t, alpha=self.alpha, gamma=self.gamma)
        if rows.class_weight is None:
            return elems.sum(-1)
        w = rows.class_weight.to(z.dtype)
        if rows.has_indices:
            return elems.sum(-1) * w[rows.target]
        return (elems * w).sum(-1)


__all__ = ["sigmoid_focal_loss", "SigmoidFocal"]
