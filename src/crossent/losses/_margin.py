"""Margin-shaped losses: LDR-KL, class-level circle loss, and the encouraging loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stats import LSE, TARGET, TemperedLogSumExp
from ..transforms import CircleMargin
from .. import _validation as V
from ._base import Loss, log_prob_target, register

_NORMALIZATIONS = (None, "softplus", "l1")

#: The largest LDR-KL temperature. The loss is ``lse_lam - s_y - lam log C`` with ``lse_lam`` near
#: ``lam log C`` for a large ``lam``, so its absolute error is ``lam`` times the rounding of the log-sum
#: (about ``1e-7 lam`` from float32 logits): at ``lam = 1e3`` about ``1e-4``, beyond it soon the size of
#: the loss itself. Larger temperatures are refused rather than silently rounded.
LDR_MAX_TEMPERATURE = 1e3


def _log_softplus(z: Tensor) -> Tensor:
    """``log(softplus(z))``, accurate where ``softplus(z)`` underflows.

    Below ``z = -20``, ``log softplus(z) = z - e^z / 2 + O(e^(2z))`` (the remainder is under 1e-18).
    """
    low = z < -20.0
    tail = z - torch.exp(torch.where(low, z, torch.full_like(z, -20.0))) / 2
    return torch.where(low, tail, torch.log(F.softplus(z.clamp(min=-20.0))))


@register("ldr_kl")
class LDRKL(Loss):
    r"""Label-distributionally-robust loss with a KL regulariser (LDR-KL).

    .. math::

        \ell = \lambda \log\Big(\frac{1}{C} \sum_k \exp\frac{s_k - s_y + c\,\mathbb{1}[k \ne y]}{\lambda}\Big)
             = \mathrm{lse}_{\lambda, c}(s) - s_y - \lambda \log C

    where :math:`\mathrm{lse}_{\lambda,c}` is the ``TemperedLogSumExp(lam, margin)`` statistic. As
    :math:`\lambda \to 0` it tends to the Crammer-Singer hinge :math:`\max_k (s_k - s_y + c\mathbb{1}[k\ne y])`,
    as :math:`\lambda \to \infty` to the mean margin violation; :math:`\lambda = 1, c = 0` is CE minus
    :math:`\log C`. Any :math:`\lambda > 0` down to the hinge limit gives finite values and gradients
    (the statistic divides only differences :math:`\le 0` by :math:`\lambda`); :math:`\lambda` is at
    most ``1e3`` (``LDR_MAX_TEMPERATURE``): the last term cancels most of the first for a large
    :math:`\lambda`, leaving an absolute error of about :math:`10^{-7}\lambda` from float32 logits.

    Scores :math:`s`: the official code first normalises each row, which needs the whole row, so it
    is an option here. ``normalize=None`` (default) uses the raw logits :math:`s = z` and streams on
    every engine; ``"softplus"`` uses :math:`s = \mathrm{softplus}(z) / \mathrm{mean}_k\,\mathrm{softplus}(z_k)`
    (the code's LDR-KL); ``"l1"`` uses :math:`s = z / (\|z\|_1 / C)` (the code's ALDR-KL scores). With a
    normalisation the loss runs only on engines that hold whole rows. The softplus scores are formed in
    log space (no underflow for very negative logits); the :math:`\ell_1` denominator is clamped at the
    dtype's smallest normal number so that an all-zero row gives :math:`s = 0` rather than NaN.

    Args:
        lam: temperature :math:`\lambda > 0`. Default ``1.0`` (the paper picks it from
            :math:`\{0.1, 1, 10\}` by cross-validation).
        margin: :math:`c`. Default ``0.1``.
        normalize: ``None``, ``"softplus"`` or ``"l1"``. Default ``None``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.LDRKL(), reduction="none")
        tensor([-0.8350, -0.0322])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.LDRKL(normalize="softplus"), reduction="none")
        tensor([-0.6126, -0.0023])

    Reference: Zhu, Ying, Yang, *Label Distributionally Robust Losses for Multi-class Classification:
    Consistency, Robustness and Adaptivity*, ICML 2023.
    """

    shift_invariant = True

    def __init__(self, lam: float = 1.0, margin: float = 0.1, normalize: str | None = None):
        self.lam = V.real("ldr_kl", "lam", lam, low=0.0, high=LDR_MAX_TEMPERATURE, low_open=True)
        self.margin = V.real("ldr_kl", "margin", margin)
        if normalize not in _NORMALIZATIONS:
            raise ValueError(f"ldr_kl: normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self._tlse = TemperedLogSumExp(self.lam, self.margin)

    @property
    def streamable(self):  # type: ignore[override]
        return self.normalize is None

    def statistics(self, rows):
        return (self._tlse, TARGET)

    def row_loss(self, s, rows):
        return s[self._tlse] - s[TARGET] - self.lam * math.log(rows.num_classes)

    def scores(self, z: Tensor) -> Tensor:
        """The scores :math:`s` the formula reads, from whole logit rows ``z`` (``[N, C]``)."""
        if self.normalize is None:
            return z
        if self.normalize == "softplus":
            # softplus(z) / mean softplus(z) in log space: softplus underflows to 0 below z ~ -100 in
            # float32, which would zero a whole row (and its gradient) in the direct form.
            log_sp = _log_softplus(z)
            return torch.exp(log_sp - (torch.logsumexp(log_sp, -1, keepdim=True) - math.log(z.shape[-1])))
        denom = z.abs().mean(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)
        return z / denom

    def dense_row_loss(self, z, rows):
        return super().dense_row_loss(self.scores(z), rows)


@register("circle")
class Circle(Loss):
    r"""Class-level circle loss: CE over circle-reweighted cosine logits.

    .. math::

        \ell = -\log \frac{e^{\gamma a_p (s_y - \Delta_p)}}{e^{\gamma a_p (s_y - \Delta_p)}
               + \sum_{k \ne y} e^{\gamma a_n (s_k - \Delta_n)}},\quad
        a_p = [1 + m - \mathrm{sg}(s_y)]_+,\ a_n = [\mathrm{sg}(s_k) + m]_+,\ \Delta_p = 1 - m,\ \Delta_n = m

    The logits :math:`s` should be cosine similarities between normalised features and normalised class
    weights (in :math:`[-1, 1]`); the loss does not normalise them. The reweighting is the elementwise
    :class:`CircleMargin` transform, so the loss streams on every engine.

    Args:
        m: relaxation margin :math:`m`. Default ``0.25``.
        gamma: scale :math:`\gamma > 0`. Default ``256.0`` (face recognition / re-ID setting of the paper).

    Example:
        >>> import torch, crossent as xe
        >>> cosines = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.5, 0.4]])
        >>> xe.cross_entropy(cosines, torch.tensor([0, 2]), loss=xe.losses.Circle(gamma=32.0), reduction="none")
        tensor([ 0.4558, 15.5212])

    Reference: Sun et al., *Circle Loss: A Unified Perspective of Pair Similarity Optimization*, CVPR 2020.
    """

    shift_invariant = True

    def __init__(self, m: float = 0.25, gamma: float = 256.0):
        self.m = V.real("circle", "m", m)
        self.gamma = V.real("circle", "gamma", gamma, low=0.0, low_open=True)
        self._transform = CircleMargin(self.m, self.gamma)

    def transforms(self):
        return (self._transform,)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        return s[LSE] - s[TARGET]


@register("encouraging")
class Encouraging(Loss):
    r"""Encouraging loss: CE plus a bonus that keeps learning from well-classified rows.

    .. math::

        \ell = -\log p_y + b(p_y), \qquad
        b(p) = \begin{cases} \log \max(1 - p,\ 10^{-5}) & p \le \mathrm{LE} \\
                             \dfrac{p - \mathrm{LE}}{\mathrm{LE} - 1} + \log(1 - \mathrm{LE}) & p > \mathrm{LE}
               \end{cases}

    The bonus :math:`b \le 0` adds :math:`-1/(1-p)` to the slope in :math:`p`, so confident rows keep a
    gradient. The conservative bonus replaces :math:`b` above ``log_end`` (LE) by its tangent, capping the
    extra slope at :math:`1/(1-\mathrm{LE})`; ``log_end=1`` gives the plain bonus, bounded only by the
    :math:`10^{-5}` clamp of the reference code (kept here). The loss can be negative.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        log_end: :math:`\mathrm{LE} \in (0, 1]`. Default ``0.75`` (the authors recommend 0.75 for
            high-accuracy settings and report 0.5 working everywhere they tried).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.Encouraging(), reduction="none")
        tensor([-1.2874,  0.5444])

    Reference: Zhao et al., *Well-classified Examples are Underestimated in Classification with Deep
    Neural Networks*, AAAI 2022.
    """

    shift_invariant = True

    def __init__(self, log_end: float = 0.75):
        self.log_end = V.real("encouraging", "log_end", log_end, low=0.0, high=1.0, low_open=True)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        bonus = torch.log((-torch.expm1(logp)).clamp(min=1e-5))
        le = self.log_end
        if le < 1.0:
            p = torch.exp(logp)
            tangent = (p - le) / (le - 1.0) + torch.log1p(torch.full_like(p, -le))
            bonus = torch.where(p > le, tangent, bonus)
        return bonus - logp
