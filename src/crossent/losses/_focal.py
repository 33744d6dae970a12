"""Focal loss and the PolyLoss family: CE reshaped by powers of ``1 - p_y``.

Every formula reads ``log p_y = z_y - lse`` only, so all of them stream. ``1 - p_y`` is always formed
as ``-expm1(log p_y)``, which keeps its relative accuracy when ``p_y`` is close to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import LSE, TARGET
from .. import _validation as V
from ._base import Loss, log_prob_target, register


class _FocalTerm(torch.autograd.Function):
    """``(1 - p)^gamma * (-log p)`` as a function of ``log p``.

    Autograd through ``pow`` would form ``gamma (1 - p)^(gamma - 1) * log p``, which is ``inf * 0`` at
    ``p = 1`` when ``gamma < 1``. Written as ``-(1 - p)^gamma (1 + gamma p r)`` with
    ``r = -log p / (1 - p)`` (which tends to 1 as ``p -> 1``), the derivative is finite everywhere.
    """

    @staticmethod
    def forward(ctx, logp: Tensor, gamma: float) -> Tensor:
        ctx.save_for_backward(logp)
        ctx.gamma = gamma
        return (-torch.expm1(logp)).pow(gamma) * -logp

    @staticmethod
    def backward(ctx, grad: Tensor):
        (logp,) = ctx.saved_tensors
        gamma = ctx.gamma
        em = torch.expm1(logp)  # -(1 - p)
        nonzero = em != 0
        r = torch.where(nonzero, logp / torch.where(nonzero, em, -torch.ones_like(em)), torch.ones_like(em))
        slope = -(-em).pow(gamma) * (1 + gamma * torch.exp(logp) * r)
        return grad * slope, None


def focal_term(logp: Tensor, gamma: float) -> Tensor:
    """``-(1 - p)^gamma log p`` from ``log p``, with a gradient that is finite for every ``gamma >= 0``."""
    return _FocalTerm.apply(logp, gamma)


def _one_minus_p(logp: Tensor) -> Tensor:
    return -torch.expm1(logp)


@register("focal")
class Focal(Loss):
    r"""Softmax focal loss: CE down-weighted on well-classified rows.

    .. math::

        \ell = -\alpha_y\, (1 - p_y)^{\gamma} \log p_y

    The modulating factor :math:`(1 - p_y)^\gamma` is part of the gradient (it is not detached, unlike
    some reference code that wraps :math:`p_y` in ``.data``). The gradient is computed in a form that
    stays finite at :math:`p_y = 1` for every :math:`\gamma \ge 0`, including :math:`\gamma < 1`.
    ``gamma=0`` without ``alpha`` is CE. ``alpha`` and PyTorch's ``weight`` multiply each other.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        gamma: focusing parameter :math:`\gamma \ge 0`. Default ``2.0``.
        alpha: optional ``[C]`` non-negative per-class factor :math:`\alpha` (a tensor or a sequence).
            Default ``None`` (all ones).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> target = torch.tensor([0, 2])
        >>> xe.cross_entropy(logits, target, loss=xe.losses.Focal(gamma=2.0), reduction="none")
        tensor([0.0111, 0.4013])
        >>> xe.cross_entropy(logits, target, loss=xe.losses.Focal(alpha=[0.25, 1.0, 0.5]))
        tensor(0.1017)

    Reference: Lin et al., *Focal Loss for Dense Object Detection*, ICCV 2017.
    """

    shift_invariant = True

    def __init__(self, gamma: float = 2.0, alpha=None):
        self.gamma = V.real("focal", "gamma", gamma, low=0.0)
        self.alpha = None if alpha is None else V.class_vector("focal", "alpha", alpha)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        loss = focal_term(log_prob_target(s, rows), self.gamma)
        if self.alpha is None:
            return loss
        V.check_length("focal", "alpha", self.alpha, rows.num_classes)
        target = rows.require_indices("focal")
        return loss * self.alpha.to(device=loss.device, dtype=loss.dtype)[target]


@register("poly1")
class Poly1(Loss):
    r"""Poly-1: CE plus :math:`\varepsilon` times its first polynomial term.

    .. math::

        \ell = -\log p_y + \varepsilon\, (1 - p_y)

    CE is :math:`\sum_{j \ge 1} (1 - p_y)^j / j`; Poly-1 raises the weight of the leading term from
    1 to :math:`1 + \varepsilon`. ``epsilon=0`` is CE; the paper requires :math:`\varepsilon \ge -1`
    (below that the loss grows again as :math:`p_y \to 1`) and reports :math:`\varepsilon = 2` for
    ImageNet classification.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        epsilon: :math:`\varepsilon \ge -1`. Default ``1.0``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.Poly1(epsilon=1.0), reduction="none")
        tensor([0.4557, 1.6348])

    Reference: Leng et al., *PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions*, ICLR 2022.
    """

    shift_invariant = True

    def __init__(self, epsilon: float = 1.0):
        self.epsilon = V.real("poly1", "epsilon", epsilon, low=-1.0)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        return -logp + self.epsilon * _one_minus_p(logp)


@register("poly")
class Poly(Loss):
    r"""Poly-N: CE plus the first N polynomial terms with free coefficients.

    .. math::

        \ell = -\log p_y + \sum_{j=1}^{N} \varepsilon_j\, (1 - p_y)^j

    ``epsilons=(e,)`` is :class:`Poly1` with ``epsilon=e``; all zeros is CE.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        epsilons: :math:`(\varepsilon_1, \dots, \varepsilon_N)`, a non-empty sequence of finite numbers.
            Default ``(1.0,)``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.Poly(epsilons=(1.0, 0.5)), reduction="none")
        tensor([0.4787, 1.8350])

    Reference: Leng et al., *PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions*, ICLR 2022.
    """

    shift_invariant = True

    def __init__(self, epsilons=(1.0,)):
        if isinstance(epsilons, (str, bytes)) or not hasattr(epsilons, "__iter__"):
            raise TypeError(f"poly: epsilons must be a sequence of numbers, got {type(epsilons).__name__}")
        values = tuple(V.real("poly", f"epsilons[{j}]", e) for j, e in enumerate(epsilons))
        if not values:
            raise ValueError("poly: epsilons must hold at least one coefficient")
        self.epsilons = values

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        u = _one_minus_p(logp)
        loss = -logp
        for j, eps in enumerate(self.epsilons, start=1):
            if eps:
                loss = loss + eps * u.pow(j)
        return loss


@register("poly1_focal")
class Poly1Focal(Loss):
    r"""Poly-1 applied to the focal loss.

    .. math::

        \ell = -(1 - p_y)^{\gamma} \log p_y + \varepsilon\, (1 - p_y)^{\gamma + 1}

    ``epsilon=0`` is :class:`Focal` with the same ``gamma``.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        epsilon: :math:`\varepsilon`. Default ``1.0``.
        gamma: :math:`\gamma \ge 0`. Default ``2.0``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.Poly1Focal(), reduction="none")
        tensor([0.0209, 0.6547])

    Reference: Leng et al., *PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions*, ICLR 2022 (section 5, the focal-loss base).
    """

    shift_invariant = True

    def __init__(self, epsilon: float = 1.0, gamma: float = 2.0):
        self.epsilon = V.real("poly1_focal", "epsilon", epsilon)
        self.gamma = V.real("poly1_focal", "gamma", gamma, low=0.0)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        return focal_term(logp, self.gamma) + self.epsilon * _one_minus_p(logp).pow(self.gamma + 1)
