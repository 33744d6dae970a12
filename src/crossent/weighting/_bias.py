"""Bias loss weights from the variance of feature maps (Abrahamyan et al., 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._base import Strategy, check_losses

NORMALISATIONS = ("global", "local")
#: ``"paper"``: ``exp(alpha v) - beta`` (the paper, and the official code since 2022-09); ``"code"``:
#: ``exp(beta v) - 1 + alpha`` (the official code's 2021 commits).
FORMS = ("paper", "code")


def _variances(features, who: str) -> Tensor:
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"{who}: features must be a floating-point tensor [N, ...] (e.g. [N, C, H, W])")
    if features.dim() < 2 or features.shape[0] == 0:
        raise ValueError(
            f"{who}: features must be [N, ...] with at least one row and one value per row, got {tuple(features.shape)}"
        )
    flat = features.detach().reshape(features.shape[0], -1)
    if flat.shape[1] < 2:
        raise ValueError(f"{who}: each row needs at least 2 feature values for an (unbiased) variance")
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return torch.var(flat, dim=1)


def _scale(v: Tensor, low: Tensor, vmin: Tensor, vmax: Tensor) -> Tensor:
    """``(v - low) / (vmax - vmin)``; 0 where the batch range is 0 (the official code divides by zero)."""
    span = vmax - vmin
    return torch.where(span > 0, (v - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(v))


def _weights(v: Tensor, alpha: float, beta: float, form: str) -> Tensor:
    if form == "paper":
        return torch.exp(v * alpha) - beta
    return torch.exp(v * beta) - 1.0 + alpha


def _check(alpha, beta, form, who):
    if form not in FORMS:
        raise ValueError(f"{who}: form must be one of {FORMS}, got {form!r}")
    return float(alpha), float(beta)


def bias_loss_weights(features: Tensor, alpha: float = 0.3, beta: float = 0.3, *, form: str = "paper") -> Tensor:
    r"""Per-example bias-loss weights from a batch of feature maps, with batch ('local') normalisation.

    ``v_i`` is the (unbiased) variance of the flattened, detached feature map of example ``i`` (the
    output of the last convolutional block, before pooling), min-max normalised over the batch:
    ``v_i <- (v_i - min v) / (max v - min v)`` (0 when all variances are equal, where the official
    code divides by zero). The weight is the paper's ``exp(alpha * v) - beta`` (``form="paper"``,
    default), which the official code computes since 2022-09; its 2021 commits computed
    ``exp(beta * v) - 1 + alpha`` (``form="code"``). With ``alpha = beta = 0.3`` the paper's weights
    lie in ``[0.7, 1.05]``, the 2021 code's in ``[0.3, 0.65]``.
    The bias loss is ``mean_i(w_i * CE_i)``. For the official default 'global' normalisation (a
    running minimum) use :class:`BiasLossWeights`.

    Example:
        >>> import torch
        >>> from crossent.weighting import bias_loss_weights
        >>> features = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
        >>> bias_loss_weights(features)
        tensor([0.7779, 1.0499, 0.7000])
    """
    alpha, beta = _check(alpha, beta, form, "bias_loss_weights")
    v = _variances(features, "bias_loss_weights")
    vmin, vmax = v.min(), v.max()
    return _weights(_scale(v, vmin, vmin, vmax), alpha, beta, form)


class BiasLossWeights(Strategy):
    r"""Bias loss (Abrahamyan et al., 2021): cross-entropy scaled by the feature-map variance of each example.

    ``loss = mean_i(w_i * l_i)`` with ``w_i`` as in :func:`bias_loss_weights`. ``normalisation``:

    * ``"global"`` (the official default): ``v_i <- (v_i - m) / (max v - min v)`` where ``m`` is a
      running minimum of the variances over every batch seen (it only decreases) while the
      denominator is still this batch's range; so the normalised values can exceed 1. The running
      minimum starts at ``1e5`` as in the official code (so a batch whose variances all exceed ``1e5``
      is shifted by ``1e5`` rather than by its own minimum); it is updated by ``__call__`` before
      normalising, and :meth:`weights` uses the value ``__call__`` would use without storing it.
    * ``"local"``: min-max over the batch (stateless).

    Args:
        alpha, beta: Default ``0.3`` and ``0.3``.
        normalisation: ``"global"`` (default) or ``"local"``.
        form: ``"paper"`` (default, ``exp(alpha v) - beta``, as the official code since 2022-09) or
            ``"code"`` (``exp(beta v) - 1 + alpha``, the official code's 2021 commits).
        initial_min: starting running minimum. Default ``1e5``.

    Inputs: ``losses`` ``[N]`` per-example cross-entropies, ``features=`` ``[N, ...]`` feature maps.

    Example:
        >>> import torch
        >>> from crossent.weighting import BiasLossWeights
        >>> bias = BiasLossWeights()
        >>> features = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
        >>> losses = torch.tensor([1.0, 2.0, 3.0])
        >>> bias(losses, features=features)
        tensor(1.6592)
        >>> bias.running_min
        0.0

    Reference: Abrahamyan et al., *Bias Loss for Mobile Neural Networks*, ICCV 2021 (official code:
    ``lusinlu/bias-loss-skipblocknet``, ``bias_loss/biasloss.py``).
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.3,
        normalisation: str = "global",
        *,
        form: str = "paper",
        initial_min: float = 1e5,
    ):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"BiasLossWeights: normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.alpha, self.beta = _check(alpha, beta, form, "BiasLossWeights")
        self.normalisation = normalisation
        self.form = form
        if not math.isfinite(float(initial_min)):
            raise ValueError("BiasLossWeights: initial_min must be finite")
        self.running_min = float(initial_min)

    def _weights_and_min(self, losses: Tensor, features: Tensor) -> tuple[Tensor, float]:
        losses = check_losses(losses, "BiasLossWeights", dim=1)
        v = _variances(features, "BiasLossWeights")
        if v.shape[0] != losses.shape[0]:
            raise ValueError(f"BiasLossWeights: features have {v.shape[0]} rows but losses have {losses.shape[0]}")
        vmin, vmax = v.min(), v.max()
        if self.normalisation == "local":
            return _weights(_scale(v, vmin, vmin, vmax), self.alpha, self.beta, self.form), self.running_min
        low = min(self.running_min, float(vmin))
        scaled = _scale(v, torch.tensor(low, dtype=v.dtype, device=v.device), vmin, vmax)
        return _weights(scaled, self.alpha, self.beta, self.form), low

    def weights(self, losses: Tensor, *, features: Tensor) -> Tensor:
        return self._weights_and_min(losses, features)[0].to(losses.dtype)

    def __call__(self, losses: Tensor, *, features: Tensor) -> Tensor:
        w, self.running_min = self._weights_and_min(losses, features)
        return (w.to(losses.dtype) * losses).mean()

    def state_dict(self) -> dict:
        return {"running_min": self.running_min}

    def load_state_dict(self, state: dict) -> None:
        self.running_min = float(state["running_min"])

    def _repr_args(self):
        return {"alpha": self.alpha, "beta": self.beta, "normalisation": self.normalisation, "form": self.form}
