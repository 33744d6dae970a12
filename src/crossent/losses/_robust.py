"""Losses robust to label noise: comp-sum / GCE / MAE, the normalized losses, RCE, SCE and APL.

All of them are functions of ``log p_y = z_y - lse`` and at most one more statistic (``sum`` for NCE,
``sum_p_pow(q)`` for NGCE), so they stream. Powers of ``p_y`` are formed as ``exp(q log p_y)`` and
``1 - p_y`` as ``-expm1(log p_y)``: no ``pow`` of an underflowed probability, no cancellation near 1.

Where the reference code of a paper clamps probabilities to ``[1e-7, 1]``, crossent uses the exact
closed form instead (documented per loss); the difference only shows on rows with ``p < 1e-7``.
"""

from __future__ import annotations

import math

import torch

from ..stats import LSE, SUM, TARGET, SumProbPower
from .. import _validation as V
from ._base import CompositeLoss, Loss, get, log_prob_target, register

#: comp-sum with tau < 1 grows like ``p_y^(tau - 1)``, which overflows for confidently wrong rows;
#: below this ``log p_y`` (``p_y = 1e-7``, the reference code's probability floor) the loss continues
#: along its tangent, so it stays finite with a bounded, non-zero gradient.
COMP_SUM_MIN_LOG_PROB = math.log(1e-7)

#: The smallest ``q`` of NGCE. Its denominator ``C - sum_k p_k^q`` is about ``q sum_k -log p_k`` for a
#: small ``q``: a difference of numbers near ``C`` whose relative error grows like ``1e-8 / q`` from
#: float32 logits (1e-5 at this bound) until, near ``q = 1e-8``, it is 0 and the loss infinite.
NGCE_MIN_Q = 1e-3


def _one_minus_p(logp):
    return -torch.expm1(logp)


def _gce(logp, q):
    return -torch.expm1(q * logp) / q


@register("comp_sum")
class CompSum(Loss):
    r"""Comp-sum losses :math:`\Phi^\tau`: one knob from sum-exponential through CE and GCE to MAE.

    .. math::

        \ell_\tau = \Phi^\tau\Big(\sum_{k \ne y} e^{z_k - z_y}\Big) =
        \begin{cases}
            -\log p_y & \tau = 1 \\
            \dfrac{1 - p_y^{\tau - 1}}{\tau - 1} & \tau \ge 0,\ \tau \ne 1
        \end{cases}

    :math:`\tau = 0` is the sum-exponential loss :math:`1/p_y - 1`, :math:`\tau = 1` is CE,
    :math:`\tau \in (1, 2)` is GCE with :math:`q = \tau - 1`, :math:`\tau = 2` is MAE :math:`1 - p_y`.
    The gradient is the CE gradient scaled by :math:`p_y^{\tau - 1}`.

    Computed as ``-expm1((tau - 1) log p_y) / (tau - 1)``. For :math:`\tau < 1` the loss grows like
    :math:`p_y^{-(1-\tau)}` and would overflow on confidently wrong rows; below
    :math:`p_y = 10^{-7}` (``COMP_SUM_MIN_LOG_PROB``) it continues linearly in :math:`\log p_y` along its
    tangent, so values and gradients stay finite (the gradient scale is capped at
    :math:`10^{7(1-\tau)}`). Rows above that floor, and every row for :math:`\tau \ge 1`, are exact.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        tau: :math:`\tau \ge 0`. Default ``1.0`` (CE).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> target = torch.tensor([0, 2])
        >>> xe.cross_entropy(logits, target, loss=xe.losses.CompSum(tau=0.0), reduction="none")
        tensor([0.2729, 1.7236])
        >>> xe.cross_entropy(logits, target, loss=xe.losses.CompSum(tau=2.0), reduction="none")
        tensor([0.2144, 0.6328])

    Reference: Mao, Mohri, Zhong, *Cross-Entropy Loss Functions: Theoretical Analysis and
    Applications*, ICML 2023.
    """

    shift_invariant = True

    def __init__(self, tau: float = 1.0):
        self.tau = V.real("comp_sum", "tau", tau, low=0.0)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        tau = self.tau
        if tau == 1.0:
            return -logp
        if tau > 1.0:
            return _gce(logp, tau - 1.0)
        floor = COMP_SUM_MIN_LOG_PROB
        core = _gce(logp.clamp(min=floor), tau - 1.0)
        slope = torch.exp(torch.full_like(logp, (tau - 1.0) * floor))  # -dL/dlogp at the floor (tau stays symbolic)
        return core + slope * (floor - logp).clamp(min=0.0)


@register("gce")
class GCE(Loss):
    r"""Generalized cross-entropy :math:`L_q`: between CE (:math:`q \to 0`) and MAE (:math:`q = 1`).

    .. math::

        \ell = \frac{1 - p_y^{\,q}}{q}

    The gradient is the CE gradient weighted by :math:`p_y^{\,q}`. Computed as
    ``-expm1(q log p_y) / q``. The common reference implementation clamps :math:`p` to
    :math:`[10^{-7}, 1]`; crossent does not (no clamp is needed for stability), which differs only on
    rows with :math:`p_y < 10^{-7}`, by less than :math:`10^{-7q}/q` in value.
    ``gce(q)`` equals ``comp_sum(tau=1+q)``.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        q: :math:`q \in (0, 1]`. Default ``0.7``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.GCE(q=0.7), reduction="none")
        tensor([0.2220, 0.7201])

    Reference: Zhang & Sabuncu, *Generalized Cross Entropy Loss for Training Deep Neural Networks with
    Noisy Labels*, NeurIPS 2018.
    """

    shift_invariant = True

    def __init__(self, q: float = 0.7):
        self.q = V.real("gce", "q", q, low=0.0, high=1.0, low_open=True)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        return _gce(log_prob_target(s, rows), self.q)


@register("tgce")
class TGCE(Loss):
    r"""Truncated :math:`L_q` loss: GCE, constant below a probability threshold :math:`k`.

    .. math::

        \ell = \begin{cases} L_q(p_y) = \dfrac{1 - p_y^{\,q}}{q} & p_y > k \\[4pt]
                             L_q(k) & p_y \le k \end{cases}

    Rows with :math:`p_y \le k` get a constant loss and no gradient (the paper's pruning of likely
    mislabelled samples, applied per batch; the paper re-scores the whole training set periodically
    instead, which needs state outside the loss). ``k=0`` is :class:`GCE`. The official code subtracts
    :math:`L_q(k)` from every row (pruned rows give 0): a constant offset, with equal gradients.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        q: :math:`q \in (0, 1]`. Default ``0.7``.
        k: threshold :math:`k \in [0, 1)`. Default ``0.5``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.TGCE(), reduction="none")
        tensor([0.2220, 0.5492])

    Reference: Zhang & Sabuncu, *Generalized Cross Entropy Loss for Training Deep Neural Networks with
    Noisy Labels*, NeurIPS 2018.
    """

    shift_invariant = True

    def __init__(self, q: float = 0.7, k: float = 0.5):
        self.q = V.real("tgce", "q", q, low=0.0, high=1.0, low_open=True)
        self.k = V.real("tgce", "k", k, low=0.0, high=1.0, high_open=True)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        if self.k == 0.0:
            return _gce(logp, self.q)
        # On tensors, not math.log: a k that changes between calls stays symbolic under torch.compile.
        log_k = torch.log(torch.full_like(logp, self.k))
        floor = -torch.expm1(self.q * log_k) / self.q  # L_q(k), also for a tiny q
        # NaN compares false: written this way round, a NaN row takes the GCE branch and stays NaN.
        return torch.where(logp <= log_k, floor, _gce(logp, self.q))


@register("mae")
class MAE(Loss):
    r"""Mean absolute error between the softmax and the one-hot target, in its reduced form.

    .. math::

        \ell = 1 - p_y

    The true L1 distance is :math:`\sum_k |p_k - \mathbb{1}[k = y]| = 2 - 2p_y`, twice this; the
    reduced form is what the reference code (and the APL/GCE papers' experiments) use. Bounded and
    noise-tolerant, but its gradient :math:`p_y (p - \mathbb{1}_y)` vanishes when :math:`p_y` is small,
    so it underfits on its own. Equals ``comp_sum(tau=2)`` and ``gce(q=1)``.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.MAE(), reduction="none")
        tensor([0.2145, 0.6328])

    Reference: Ghosh, Kumar, Sastry, *Robust Loss Functions under Label Noise for Deep Neural
    Networks*, AAAI 2017.
    """

    shift_invariant = True

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        return _one_minus_p(log_prob_target(s, rows))


@register("nce")
class NCE(Loss):
    r"""Normalized cross-entropy: CE of the target divided by the CE summed over every label.

    .. math::

        \ell = \frac{-\log p_y}{\sum_k -\log p_k} = \frac{\mathrm{lse} - z_y}{C\,\mathrm{lse} - \sum_k z_k}
        \in [0, 1]

    The denominator is part of the gradient (not detached), as in the reference code.

    Statistics: ``lse``, ``target``, ``sum``. Streams on every engine.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.NCE(), reduction="none")
        tensor([0.0462, 0.3031])

    Reference: Ma et al., *Normalized Loss Functions for Deep Learning with Noisy Labels*, ICML 2020.
    """

    shift_invariant = True

    def statistics(self, rows):
        return (LSE, TARGET, SUM)

    def row_loss(self, s, rows):
        V.at_least_classes("nce", rows.num_classes)  # one class: 0 / 0
        lse = s[LSE]
        return (lse - s[TARGET]) / (rows.num_classes * lse - s[SUM])


@register("ngce")
class NGCE(Loss):
    r"""Normalized generalized cross-entropy.

    .. math::

        \ell = \frac{1 - p_y^{\,q}}{\sum_k (1 - p_k^{\,q})} = \frac{1 - p_y^{\,q}}{C - \sum_k p_k^{\,q}}

    The reference code clamps :math:`p` to :math:`[10^{-7}, 1]` before the powers; crossent uses the
    exact :math:`\sum_k p_k^q` (the ``sum_p_pow`` statistic), which differs from the clamped sum by
    less than :math:`C \cdot 10^{-7q}`. ``q`` is at least ``1e-3`` (``NGCE_MIN_Q``): for a smaller
    ``q`` the denominator is a difference of numbers near :math:`C` that float32 logits cannot resolve
    (as :math:`q \to 0` the loss tends to :class:`NCE`, which has no such difference).

    Statistics: ``lse``, ``target``, ``sum_p_pow(q)``. Streams on every engine.

    Args:
        q: :math:`q \in [10^{-3}, 1]`. Default ``0.7``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.NGCE(), reduction="none")
        tensor([0.0885, 0.3130])

    Reference: Ma et al., *Normalized Loss Functions for Deep Learning with Noisy Labels*, ICML 2020.
    """

    shift_invariant = True

    def __init__(self, q: float = 0.7):
        self.q = V.real("ngce", "q", q, low=NGCE_MIN_Q, high=1.0)
        self._power = SumProbPower(self.q)

    def statistics(self, rows):
        return (LSE, TARGET, self._power)

    def row_loss(self, s, rows):
        V.at_least_classes("ngce", rows.num_classes)  # one class: 0 / 0
        numerator = -torch.expm1(self.q * log_prob_target(s, rows))
        return numerator / (rows.num_classes - s[self._power])


@register("nmae")
class NMAE(Loss):
    r"""Normalized mean absolute error (reduced form), as in the reference code.

    .. math::

        \ell = \frac{1 - p_y}{2\,(C - 1)}

    The reference code's normalizer is :math:`1 / (2(C-1))` applied to the reduced MAE
    :math:`1 - p_y`; crossent follows it.

    Statistics: ``lse``, ``target``. Streams on every engine. Needs :math:`C \ge 2`.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.NMAE(), reduction="none")
        tensor([0.0536, 0.1582])

    Reference: Ma et al., *Normalized Loss Functions for Deep Learning with Noisy Labels*, ICML 2020.
    """

    shift_invariant = True

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        V.at_least_classes("nmae", rows.num_classes)
        return _one_minus_p(log_prob_target(s, rows)) / (2.0 * (rows.num_classes - 1))


@register("rce")
class RCE(Loss):
    r"""Reverse cross-entropy: CE with the roles of prediction and label swapped.

    .. math::

        \ell = -\sum_k p_k \log \tilde q_k = -A\,(1 - p_y), \qquad A = \log(10^{-4})

    with the one-hot label clamped to :math:`\tilde q_k \in [10^{-4}, 1]` so that :math:`\log 0` is the
    finite constant :math:`A < 0`. The reference code also clamps :math:`p_k \ge 10^{-7}` inside the sum;
    crossent uses the closed form above, which differs from it by at most :math:`-A \cdot C \cdot 10^{-7}`.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        A: :math:`A < 0`, the log of the clamped zero label. Default ``math.log(1e-4)`` (:math:`-9.21`).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.RCE(), reduction="none")
        tensor([1.9747, 5.8286])

    Reference: Wang et al., *Symmetric Cross Entropy for Robust Learning with Noisy Labels*, ICCV 2019.
    """

    shift_invariant = True

    def __init__(self, A: float = math.log(1e-4)):
        self.A = V.real("rce", "A", A, high=0.0, high_open=True)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        return -self.A * _one_minus_p(log_prob_target(s, rows))


@register("sce")
class SCE(Loss):
    r"""Symmetric cross-entropy: CE plus reverse CE.

    .. math::

        \ell = \alpha\,(-\log p_y) + \beta\,(-A)(1 - p_y)

    Paper defaults per dataset (from its code): MNIST :math:`\alpha = 0.01, \beta = 1`; CIFAR-10
    :math:`\alpha = 0.1, \beta = 1`; CIFAR-100 :math:`\alpha = 6, \beta = 0.1`. The CE term is exact
    (the reference code clamps :math:`p_y \ge 10^{-7}` there), so ``SCE(alpha=1, beta=0)`` is CE.

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        alpha: weight of CE, :math:`\ge 0`. Default ``0.1``.
        beta: weight of RCE, :math:`\ge 0`. Default ``1.0``.
        A: :math:`A < 0` as in :class:`RCE`. Default ``math.log(1e-4)``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.SCE(), reduction="none")
        tensor([1.9989, 5.9288])

    Reference: Wang et al., *Symmetric Cross Entropy for Robust Learning with Noisy Labels*, ICCV 2019.
    """

    shift_invariant = True

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, A: float = math.log(1e-4)):
        self.alpha = V.real("sce", "alpha", alpha, low=0.0)
        self.beta = V.real("sce", "beta", beta, low=0.0)
        self.A = V.real("sce", "A", A, high=0.0, high_open=True)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        return self.alpha * -logp + (self.beta * -self.A) * _one_minus_p(logp)


def _part(role: str, loss) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return get(loss)
    raise TypeError(f"apl: {role} must be a registered loss name or a crossent.losses.Loss, got {type(loss).__name__}")


@register("apl")
class APL(CompositeLoss):
    r"""Active-passive loss: a weighted sum of an active and a passive (normalized / bounded) loss.

    .. math::

        \ell = \alpha\, \ell_{\text{active}} + \beta\, \ell_{\text{passive}}

    The paper pairs an active loss (``nce``, ``nfl``, ``ngce``, ``gce``) with a passive one (``rce``,
    ``mae``, ``nmae``). Parts are given by registry name (built with their default hyperparameters) or as
    loss objects (for other hyperparameters: ``APL(active=xe.losses.NGCE(q=0.5))``). They are resolved
    when the APL is built. The APL streams if and only if both parts do; otherwise it runs on the
    engines that hold whole rows. A stateful part (``APL(active=xe.losses.AdaptiveLDRKL())``) keeps its
    state as it would alone (:class:`~crossent.losses.CompositeLoss`). Paper settings (from its
    configs): CIFAR-10 NCE+RCE :math:`\alpha = \beta = 1`; CIFAR-100 NCE+RCE
    :math:`\alpha = 10, \beta = 0.1`; MNIST :math:`\alpha = 1, \beta = 10`.

    Args:
        active: name or loss object. Default ``"nce"``.
        passive: name or loss object. Default ``"rce"``.
        alpha: weight of the active part, :math:`\ge 0`. Default ``1.0``.
        beta: weight of the passive part, :math:`\ge 0`. Default ``1.0``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.APL(), reduction="none")
        tensor([2.0209, 6.1317])

    Reference: Ma et al., *Normalized Loss Functions for Deep Learning with Noisy Labels*, ICML 2020.
    """

    def __init__(self, active="nce", passive="rce", alpha: float = 1.0, beta: float = 1.0):
        self.active = active
        self.passive = passive
        self.alpha = V.real("apl", "alpha", alpha, low=0.0)
        self.beta = V.real("apl", "beta", beta, low=0.0)
        super().__init__(_part("active", active), _part("passive", passive))

    def combine(self, losses):
        active, passive = losses
        return self.alpha * active + self.beta * passive
