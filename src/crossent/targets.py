"""Classification targets for regression: HL-Gauss and two-hot histograms over fixed bins.

A scalar target ``y`` in ``[v_min, v_max]`` becomes a probability vector over ``num_bins`` equal bins;
the network predicts logits over the bins, trains with soft-target cross-entropy
(``crossent.cross_entropy(logits, probs)``), and reads its prediction out as the mean of the bin
centres under the softmax (:func:`expectation`). Following Farebrother et al., *Stop Regressing:
Training Value Functions via Classification for Scalable Deep RL*, ICML 2024 (Appendix A).

Example:
    >>> import torch, crossent as xe
    >>> y = torch.tensor([0.3, -0.5])
    >>> probs = xe.targets.hl_gauss(y, -1.0, 1.0, num_bins=8)
    >>> probs.sum(-1)
    tensor([1.0000, 1.0000])
    >>> logits = torch.zeros(2, 8, requires_grad=True)
    >>> xe.cross_entropy(logits, probs).backward()
    >>> xe.targets.expectation(torch.log(probs), -1.0, 1.0)
    tensor([ 0.2999, -0.4976])
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._rows import as_float

__all__ = ["bin_centers", "hl_gauss", "two_hot", "expectation"]


def _check_range(v_min, v_max, num_bins) -> tuple[float, float, int]:
    for name, v in (("v_min", v_min), ("v_max", v_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite real number, got {v!r}")
    if not float(v_min) < float(v_max):
        raise ValueError(f"v_min must be < v_max, got v_min={v_min}, v_max={v_max}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return float(v_min), float(v_max), int(num_bins)


def _as_float(y) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold real values, got {y.dtype}")
    return y if y.is_floating_point() else y.to(torch.get_default_dtype())


def _edges(v_min: float, v_max: float, num_bins: int, dtype, device) -> Tensor:
    return torch.linspace(v_min, v_max, num_bins + 1, dtype=dtype, device=device)


def bin_centers(v_min: float, v_max: float, num_bins: int, *, dtype=None, device=None) -> Tensor:
    """The ``num_bins`` bin centres ``(e[i] + e[i+1]) / 2`` of ``num_bins`` equal bins on ``[v_min, v_max]``.

    (``hl-gauss-pytorch`` 0.0.1 computes ``(e[:-1] - e[1:]) / 2``, a sign error; not reproduced.)

    Example:
        >>> import crossent as xe
        >>> xe.targets.bin_centers(0.0, 1.0, 4)
        tensor([0.1250, 0.3750, 0.6250, 0.8750])
    """
    v_min, v_max, num_bins = _check_range(v_min, v_max, num_bins)
    e = _edges(v_min, v_max, num_bins, dtype or torch.get_default_dtype(), device)
    return (e[:-1] + e[1:]) / 2


def hl_gauss(y: Tensor, v_min: float, v_max: float, num_bins: int, sigma_ratio: float = 0.75) -> Tensor:
    r"""HL-Gauss target: a Gaussian centred on ``y`` integrated over each bin, renormalised to the range.

    With bin edges :math:`e_0 < \dots < e_m` (``linspace(v_min, v_max, m + 1)``), width :math:`w`,
    :math:`\sigma = \text{sigma\_ratio} \cdot w` and :math:`\Phi` the normal CDF,

    .. math::

        q_i = \frac{\Phi((e_i - y)/\sigma) - \Phi((e_{i-1} - y)/\sigma)}{\Phi((e_m - y)/\sigma) - \Phi((e_0 - y)/\sigma)}

    ``y`` is first clipped to ``[v_min, v_max]`` (out of range, the normaliser would tend to 0).
    The bin masses are differences of ``erf`` or, in the tails, of ``erfc``, so that small
    probabilities keep their relative precision.

    Args:
        y: scalar targets, any shape ``[...]`` (integers are cast to the default dtype).
        v_min, v_max: the range covered by the bins. num_bins: :math:`m \ge 1`.
        sigma_ratio: :math:`\sigma / w > 0`. Default ``0.75`` (the paper's choice).

    Returns:
        ``[..., num_bins]`` probabilities (each row sums to 1), in ``y``'s floating dtype.

    Example:
        >>> import torch, crossent as xe
        >>> xe.targets.hl_gauss(torch.tensor([0.5]), 0.0, 1.0, num_bins=4)
        tensor([[0.0881, 0.4119, 0.4119, 0.0881]])
    """
    v_min, v_max, num_bins = _check_range(v_min, v_max, num_bins)
    if isinstance(sigma_ratio, bool) or not isinstance(sigma_ratio, numbers.Real) or not 0 < sigma_ratio < math.inf:
        raise ValueError(f"sigma_ratio must be > 0 and finite, got {sigma_ratio!r}")
    y = _as_float(y).clamp(v_min, v_max)
    edges = _edges(v_min, v_max, num_bins, y.dtype, y.device)
    sigma = float(sigma_ratio) * (v_max - v_min) / num_bins
    u = (edges - y[..., None]) / (math.sqrt(2.0) * sigma)
    a, b = u[..., :-1], u[..., 1:]
    # erf(b) - erf(a) cancels where both are near +-1: use erfc on the side of the tail.
    upper = torch.special.erfc(a) - torch.special.erfc(b)
    lower = torch.special.erfc(-b) - torch.special.erfc(-a)
    middle = torch.special.erf(b) - torch.special.erf(a)
    mass = torch.where(a >= 0, upper, torch.where(b <= 0, lower, middle)).clamp_min(0)
    return mass / mass.sum(-1, keepdim=True)


def two_hot(y: Tensor, v_min: float, v_max: float, num_bins: int) -> Tensor:
    r"""Two-hot target: ``y`` split linearly between the two nearest bin centres.

    With centres :math:`c_1 < \dots < c_m` (:func:`bin_centers`), ``y`` is clipped to
    :math:`[c_1, c_m]`; for :math:`c_k \le y \le c_{k+1}`,
    :math:`q_{k+1} = (y - c_k)/(c_{k+1} - c_k)` and :math:`q_k = 1 - q_{k+1}`, so that
    :math:`\sum_i q_i c_i = y` exactly (up to rounding). With ``num_bins = 1`` all mass is on the bin.

    Returns:
        ``[..., num_bins]`` probabilities, in ``y``'s floating dtype.

    Example:
        >>> import torch, crossent as xe
        >>> xe.targets.two_hot(torch.tensor([0.5, 2.0]), 0.0, 1.0, num_bins=4)
        tensor([[0.0000, 0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.0000, 1.0000]])
    """
    v_min, v_max, num_bins = _check_range(v_min, v_max, num_bins)
    y = _as_float(y)
    centers = bin_centers(v_min, v_max, num_bins, dtype=y.dtype, device=y.device)
    out = torch.zeros(*y.shape, num_bins, dtype=y.dtype, device=y.device)
    if num_bins == 1:
        return out.fill_(1.0)
    y = y.clamp(float(centers[0]), float(centers[-1]))
    width = (v_max - v_min) / num_bins
    k = torch.floor((y - centers[0]) / width).long().clamp(0, num_bins - 2)
    upper = ((y - centers[k]) / (centers[k + 1] - centers[k])).clamp(0, 1)
    out.scatter_(-1, k[..., None], (1 - upper)[..., None])
    out.scatter_(-1, (k + 1)[..., None], upper[..., None])
    return out


def expectation(logits: Tensor, v_min: float, v_max: float) -> Tensor:
    r"""Read-out :math:`\hat y = \sum_i \mathrm{softmax}(z)_i\, c_i` over the bin centres.

    ``logits`` is ``[..., num_bins]``; returns ``[...]`` (half precision computes in float32 and
    returns float32).

    Example:
        >>> import torch, crossent as xe
        >>> xe.targets.expectation(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), 0.0, 1.0)
        tensor([0.8651])
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() == 0:
        raise TypeError("logits must be a floating-point tensor with the bins on its last axis")
    z = as_float(logits)
    centers = bin_centers(v_min, v_max, z.shape[-1], dtype=z.dtype, device=z.device)
    return torch.softmax(z, dim=-1) @ centers
