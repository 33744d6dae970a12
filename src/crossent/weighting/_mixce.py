"""MixCE token weights (Zhang et al., ACL 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Strategy, check_losses, check_mask

REDUCTIONS = ("mean", "sum")


class MixCEWeights(Strategy):
    r"""MixCE as a token reweighting: mix forward cross-entropy with an approximation of the reverse one.

    For each token with loss ``l_t = -log q(x_t | x_<t)`` (cross-entropy of the gold token),

    .. math::

        L_t = \eta\, l_t + (1 - \eta)\, \mathrm{sg}(e^{-l_t})\, l_t = w_t\, l_t,
        \qquad w_t = \eta + (1 - \eta)\, \mathrm{sg}(q(x_t \mid x_{<t})),

    so the reverse-CE gradient is approximated by weighting the data NLL with the model's own
    (detached) probability of the gold token. ``eta = 1`` is maximum likelihood. The official code's
    reductions: ``"mean"`` is ``sum_t L_t m_t / (1e-15 + sum_t m_t)`` over the mask ``m``; ``"sum"``
    is ``sum_t L_t`` (rows with loss 0, such as ignored tokens, add nothing). The weights are only
    meaningful when ``losses`` are cross-entropies (``-log p`` of the gold token). The loss itself is
    also available as the registry loss ``mixce``.

    Args:
        eta: mixing ratio (``mixing_ratio``). Default ``0.5`` (``run.py``; the paper searches
            ``{0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1}`` by dev MAUVE).
        reduction: ``"mean"`` (default) or ``"sum"``.

    Inputs: ``losses`` per-token cross-entropies of any shape, optional ``mask=`` of the same shape.

    Example:
        >>> import torch
        >>> from crossent.weighting import MixCEWeights
        >>> mix = MixCEWeights(eta=0.5)
        >>> losses = torch.tensor([0.1, 1.0, 3.0])
        >>> mix.weights(losses)
        tensor([0.9524, 0.6839, 0.5249])
        >>> mix(losses)
        tensor(0.7846)

    Reference: Zhang et al., *MixCE: Training Autoregressive Language Models by Mixing Forward and
    Reverse Cross-Entropies*, ACL 2023 (official code: ``bloomberg/MixCE-acl2023``, ``gpt2.py``).
    """

    def __init__(self, eta: float = 0.5, reduction: str = "mean"):
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"MixCEWeights: eta must be in [0, 1], got {eta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"MixCEWeights: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.eta = eta
        self.reduction = reduction

    def weights(self, losses: Tensor, *, mask: Tensor | None = None) -> Tensor:
        losses = check_losses(losses, "MixCEWeights")
        check_mask(mask, losses, "MixCEWeights")
        return self.eta + (1.0 - self.eta) * torch.exp(-losses.detach())

    def __call__(self, losses: Tensor, *, mask: Tensor | None = None) -> Tensor:
        w = self.weights(losses, mask=mask)
        mixed = w * losses
        if self.reduction == "sum":
            return mixed.sum()
        m = check_mask(mask, losses, "MixCEWeights").to(losses.dtype)
        return (mixed * m).sum() / (1e-15 + m.sum())

    def _repr_args(self):
        return {"eta": self.eta, "reduction": self.reduction}
