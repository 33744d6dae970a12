"""Losses that need the whole logit row: normalized focal, LogitClip, adaptive LDR-KL.

None of these can be written over mergeable row statistics (the normalizer of NFL sums a function of
``log p_k`` that needs ``lse`` first; LogitClip rescales the row by its norm before anything else;
ALDR-KL rescales the row by its L1 norm and fits a per-sample temperature to the whole softmax). Each
sets ``streamable = False`` and implements :meth:`~crossent.losses.Loss.dense_row_loss` with autograd,
so it runs where a whole row is in memory (the dense and the row-chunked engines); engines that only
see blocks of the vocabulary refuse it by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._rows import Rows
from ..stats import tempered_dtype
from ..transforms import apply_all
from .. import _validation as V
from ._base import CompositeLoss, Loss, StatefulLoss, register, resolve
from ._margin import LDR_MAX_TEMPERATURE


def _weighted(loss: Tensor, rows: Rows) -> Tensor:
    w = rows.target_weight()
    return loss if w is None else loss * w.to(loss.dtype)


def _temperature_dtype(dtype: torch.dtype, low: float, high: float) -> torch.dtype:
    """The dtype for logit differences divided by temperatures in ``[low, high]`` (:func:`tempered_dtype`)."""
    if tempered_dtype(dtype, low) == dtype and tempered_dtype(dtype, high) == dtype:
        return dtype
    return torch.float64


def _tempered_log_mean_exp(a: Tensor, lam: Tensor, work: torch.dtype) -> Tensor:
    """``lam * log mean_k exp(a_k / lam)`` per row (``a``: ``[N, C]``, ``lam``: ``[N]``), with autograd.

    Exact from the hinge ``max_k a_k`` (``lam -> 0``) to the mean ``mean_k a_k`` (``lam -> inf``): it is
    ``m + lam * log mean_k exp(d_k)`` with ``m`` the row maximum (detached: the value does not depend
    on it) and ``d = (a - m) / lam <= 0``, divided in ``work`` with ``lam`` clamped to its normal
    numbers. Where ``mean exp(d) >= 1/2`` (large ``lam``), its log is ``log1p(mean expm1(d))``, which
    keeps the small deviations that ``log sum exp(d) - log C`` would cancel; elsewhere that difference
    is at most ``-log 2`` and cancels nothing.
    """
    info = torch.finfo(work)
    peak = a.detach().amax(-1, keepdim=True)
    lam = lam.to(work).clamp(info.tiny, info.max)[:, None]
    d = (a - peak).to(work) / lam
    mean_expm1 = torch.expm1(d).mean(-1)
    near = mean_expm1 >= -0.5
    # The untaken branch must stay finite too (log1p(-1) would make its zero gradient NaN).
    log_mean = torch.where(
        near, torch.log1p(torch.where(near, mean_expm1, 0.0)), torch.logsumexp(d, -1) - math.log(a.shape[-1])
    )
    return (peak.squeeze(-1) + lam.squeeze(-1) * log_mean).to(a.dtype)


@register("nfl")
class NormalizedFocal(Loss):
    r"""Normalized focal loss (NFL) of Ma et al., as in the official code.

    .. math::

        \ell = \frac{(1 - \mathrm{sg}(p_y))^\gamma\, (-\log p_y)}
                    {\sum_{k=1}^{C} (1 - \mathrm{sg}(p_k))^\gamma\, (-\log p_k)}

    with :math:`p = \mathrm{softmax}(z)` and :math:`\mathrm{sg}` a stop-gradient: the official code
    detaches the modulating factors :math:`(1-p)^\gamma` (numerator and denominator) but not the log
    terms, and so does this class. The value lies in :math:`[0, 1]`; ``gamma=0`` gives NCE. The
    normalizer sums over the whole row, so the loss is whole-row (``streamable = False``). The
    modulating factors are formed relative to the row's largest, so any finite ``gamma`` gives finite
    values (as :math:`\gamma \to \infty` the normalizer keeps only the least likely classes).

    Class-index targets only; ``weight[y]`` multiplies the row. The APL combinations scale it by
    ``alpha`` (e.g. ``10 * NormalizedFocal()`` for CIFAR-10 alone, see the paper's configs).

    Args:
        gamma: focusing parameter :math:`\gamma \ge 0`. Default ``0.5`` (the paper's configs).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.NormalizedFocal(), reduction="none")
        tensor([0.0229, 0.2949])

    Reference: Ma et al., *Normalized Loss Functions for Deep Learning with Noisy Labels*, ICML 2020
    (official code: HanxunH/Active-Passive-Losses, ``NormalizedFocalLoss``).
    """

    streamable = False

    def __init__(self, gamma: float = 0.5):
        self.gamma = V.non_negative("gamma", gamma)

    def _modulators(self, logp: Tensor) -> Tensor:
        """``(1 - p_k)^gamma`` divided by the row's largest (a common factor, which the ratio cancels).

        Formed as ``exp(gamma * (log(1 - p_k) - max_j log(1 - p_j)))``: the direct powers underflow to 0
        in every class for a large ``gamma`` (``0 / 0``); these stay 1 at the least likely class, so the
        normalizer is at least ``log 2``. ``gamma`` beyond the logits' dtype multiplies in float64.
        """
        if self.gamma == 0.0:
            return torch.ones_like(logp)
        # -expm1(log p) is 1 - p without cancellation when p is close to 1.
        log_rest = torch.log(-torch.expm1(logp))
        below = log_rest - log_rest.amax(-1, keepdim=True)
        if self.gamma > torch.finfo(below.dtype).max:
            return torch.exp(below.double() * self.gamma).to(logp.dtype)
        return torch.exp(below * self.gamma)

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        target = rows.require_indices("nfl")
        if z.shape[-1] < 2:
            raise ValueError(f"nfl needs at least 2 classes (its normalizer is 0 for one), got {z.shape[-1]}")
        logp = torch.log_softmax(z, dim=-1)
        terms = self._modulators(logp.detach()) * -logp
        loss = terms.gather(-1, target[:, None]).squeeze(-1) / terms.sum(-1)
        return _weighted(loss, rows)


def _lp_norm(z: Tensor, p: float) -> Tensor:
    """``||z||_p`` over the last axis (``[N, 1]``), without overflow for large ``|z|`` or ``p``."""
    if math.isinf(p):
        return z.abs().amax(-1, keepdim=True)
    # ||z||_p = m ||z / m||_p for any constant m > 0; with m = max|z| held constant the powers stay
    # <= 1 and autograd still sees the exact gradient of the norm.
    m = z.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    return m * torch.linalg.vector_norm(z / m, ord=p, dim=-1, keepdim=True)


@register("logit_clip")
class LogitClip(CompositeLoss):
    r"""LogitClip of Wei et al.: bound the :math:`L_p` norm of the logit row, then apply a base loss.

    .. math::

        z' = z \cdot \min\!\Big(1, \frac{\tau}{\lVert z \rVert_p}\Big), \qquad \ell = \ell_{\text{base}}(z', y)

    The clipped row keeps its direction and has norm at most :math:`\tau`; the gradient flows through
    the norm (it is not detached), as in the official code. The base loss is any registered loss (a
    name, or a loss object for non-default hyperparameters); it is evaluated through its
    ``dense_row_loss`` on the clipped row, so streamable and whole-row bases both work, and it accepts
    class-probability targets when the base does. Class weights are applied by the base. A stateful
    base (``LogitClip(base=xe.losses.AdaptiveLDRKL())``) observes the clipped rows and keeps its state
    as it would alone (:class:`~crossent.losses.CompositeLoss`).

    **Difference from the official code.** The official implementation (``--temp t``, default 1.0)
    computes ``norm = ||z||_p + 1e-7`` and replaces ``z`` by ``z / norm / t`` *where* ``norm > t``:
    it triggers at norm ``t`` but clips to norm ``1/t``. These agree only for ``t = 1``; otherwise
    the map jumps at ``norm = t`` (for ``t = 1.5`` a row of norm 1.49 is kept while a row of norm 1.51
    is shrunk to norm 0.667). This class implements the continuous map above: ``tau = 1/t`` gives
    the official clipped norm, and the default ``tau = 1`` equals the official default ``t = 1``
    (up to the ``1e-7``).

    Args:
        tau: the norm bound :math:`\tau > 0`. Default ``1.0``.
        p: the norm order, ``p >= 1`` or ``float("inf")``. Default ``2``.
        base: the loss applied to the clipped logits: a registered name or a
            :class:`~crossent.losses.Loss`. Default ``"ce"``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.LogitClip(tau=1.0), reduction="none")
        tensor([0.5820, 1.0019])

    Reference: Wei et al., *Mitigating Memorization of Noisy Labels by Clipping the Model Prediction*,
    ICML 2023 (official code: hongxin001/LogitClip, ``algorithms/clip.py``).
    """

    streamable = False
    shift_invariant = False  # the clip reads the row's norm, which a constant added to the row changes

    def __init__(self, tau: float = 1.0, p: float = 2, base="ce"):
        self.tau = V.positive("tau", tau)
        p_value = float("inf") if isinstance(p, str) and p.lower() == "inf" else p
        if isinstance(p_value, bool) or not isinstance(p_value, (int, float)) or not p_value >= 1:
            raise ValueError(f"p must be a number >= 1 or float('inf'), got {p!r}")
        self.p = p
        self._p = float(p_value)
        self.base = base
        super().__init__(resolve(base))

    def part_logits(self, z: Tensor, rows: Rows) -> Tensor:
        """The rows the base loss reads: clipped, then through the base's own transforms."""
        zc = self.clip(z)
        base_transforms = self.parts[0].transforms()
        if base_transforms:
            zc = apply_all(base_transforms, zc, rows, slice(0, zc.shape[-1]))
        return zc

    def transforms(self):
        return ()  # the base's transforms apply after the clip (part_logits)

    def clip(self, z: Tensor) -> Tensor:
        """The clipped logits :math:`z \\min(1, \\tau / \\lVert z \\rVert_p)` (rows on the last axis)."""
        norm = _lp_norm(z, self._p)
        over = norm > self.tau
        # The untaken branch must not see norm = 0 either, or its zero gradient becomes 0 * inf.
        safe = torch.where(over, norm, torch.ones_like(norm))
        return z * torch.where(over, self.tau / safe, torch.ones_like(norm))


@register("aldr_kl")
class AdaptiveLDRKL(StatefulLoss):
    r"""Adaptive LDR-KL (ALDR-KL) of Zhu, Ying and Yang, with a per-sample temperature kept here.

    Each row's scores are the logits rescaled by their mean absolute value,
    :math:`s = z / (\lVert z \rVert_1 / C)` (gradient kept), and

    .. math::

        \ell_i = \lambda_i \log \frac{1}{C} \sum_k \exp\frac{s_k - s_y + c\,1[k \ne y]}{\lambda_i}
                 \;-\; \frac{\alpha \log C}{2 \lambda_0} (\lambda_i - \lambda_0)^2

    The second term is constant for the model (it only makes the value the paper's objective).

    **State.** The loss is an ``nn.Module`` that stores one temperature per training sample, the
    buffer ``lambdas[j]`` (float64, initialised to :math:`\lambda_0`), keyed by the sample ids passed as
    ``crossent.cross_entropy(..., extra={"sample_ids": ids})`` (one non-negative integer per row;
    the ids of ignored rows are not read). On every forward (once, whatever the engine and mode),
    for each counted row :math:`i` with id :math:`j`, first

    .. math::

        q = \mathrm{normalize}_1\big(\mathrm{softmax}(s / \lambda^{\text{old}}_j) + 10^{-5}\big), \quad
        \lambda_i = \lambda_0 - \lambda_0 \frac{\sum_k q_k \log(C q_k)}{\alpha \log C}

    is computed without gradient (:math:`\lambda^{\text{old}}_j` is the stored value), then
    ``lambdas[j] = lambda_i`` is written (in training mode only: after ``.eval()`` the table never
    changes), and the loss above uses this new, detached :math:`\lambda_i`. Hence :math:`\lambda_i \in (\lambda_0 (1 - 1/\alpha), \lambda_0]`.
    This is the order of the official ``ALDRLoss_V1``. The ids of the counted rows of one call must be
    distinct. With ``num_samples=None`` the table grows to the largest id seen (new entries start at
    :math:`\lambda_0`); ``state_dict()`` / ``load_state_dict()`` save and restore it (a grown table
    restores at its saved size), and the ``crossent.nn`` wrappers include it in theirs. The table stays
    float64 through casts of the module (``.half()``, ``.bfloat16()``, ``.to(dtype)``: a temperature near
    :math:`\lambda_0` rounded to half precision would lose its updates) and follows its moves between
    devices; ``copy.deepcopy`` and pickling give a loss with a table of its own.

    Every :math:`\lambda_0 \in (0, 10^3]`, down to the hinge limit :math:`\lambda_0 \to 0`, gives finite,
    accurate values and gradients on finite logits: the tempered terms are measured from the row
    maximum (:math:`\lambda` divides only differences that are :math:`\le 0`, in float64 where it is
    extreme for the logits' dtype), and the prior is formed without :math:`\alpha / \lambda_0`.

    Not reproduced: the official CIFAR-100 variant applies ``softplus`` to the logits first. A row of
    zeros is scored as zeros (the official code divides by zero).

    Args:
        lam0: :math:`\lambda_0 \in (0, 10^3]`, the reference temperature (at most ``LDR_MAX_TEMPERATURE``,
            as for :class:`~crossent.losses.LDRKL`). Default ``1.0`` (the paper picks it by
            cross-validation from {0.1, 1, 10}).
        margin: :math:`c`, the margin added to non-target scores. Default ``0.1``.
        alpha: :math:`\alpha > 1`, strength of the KL prior on :math:`\lambda`. Default ``2.0``.
        num_samples: size of the training set (ids must be below it), or ``None`` to grow as needed
            (growing reads the ids on the host; under ``torch.compile`` give ``num_samples``).

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.losses.AdaptiveLDRKL(num_samples=10)
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> ids = torch.tensor([3, 7])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=crit, extra={"sample_ids": ids}, reduction="none")
        tensor([-0.7313, -0.3668])
        >>> crit.lambdas[ids]
        tensor([0.8233, 0.9643], dtype=torch.float64)

    Reference: Zhu, Ying and Yang, *Label Distributionally Robust Losses for Multi-class
    Classification: Consistency, Robustness and Adaptivity*, ICML 2023 (official code: DixianZhu/LDR,
    ``ALDRLoss_V1``).
    """

    streamable = False

    def __init__(self, lam0: float = 1.0, margin: float = 0.1, alpha: float = 2.0, num_samples: int | None = None):
        super().__init__()
        self.lam0 = V.real(None, "lam0", lam0, low=0.0, low_open=True, high=LDR_MAX_TEMPERATURE)
        self.margin = V.real(None, "margin", margin)
        self.alpha = V.real(None, "alpha", alpha)
        if not self.alpha > 1:
            raise ValueError(f"alpha must be > 1 (it keeps every lambda above lam0 * (1 - 1/alpha) > 0), got {alpha}")
        if not self.lam0 * (1 - 1 / self.alpha) > 0:
            raise ValueError(f"lam0 * (1 - 1/alpha), the lower bound of every lambda, is 0: lam0={lam0}, alpha={alpha}")
        self.num_samples = None if num_samples is None else V.count("num_samples", num_samples)
        self.register_buffer("lambdas", torch.full((self.num_samples or 0,), self.lam0, dtype=torch.float64))

    @property
    def _key(self) -> str:
        # From the object's identity, not stored: a copy (deepcopy, pickle) gets keys of its own, so two
        # copies in one composed loss do not read each other's observations.
        return f"aldr_kl.lambda.{id(self)}"

    # -- state ------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        table = self.lambdas
        super()._apply(fn, recurse)
        if self.lambdas.dtype != torch.float64:
            # A cast of the module (.half(), .to(dtype)): the table stays float64 (a temperature near lam0
            # in half precision would round its updates away) and only follows the device.
            moved = self.lambdas.device
            self.lambdas = table.to(moved) if table.device.type != "meta" else self.lambdas.to(torch.float64)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A copy: the table keeps changing in place while training, a saved state must not.
        destination[prefix + "lambdas"] = self.lambdas.detach().clone()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not isinstance(state_dict, dict) or "lambdas" not in state_dict:
            raise ValueError("state must be a dict with a 'lambdas' tensor, as returned by state_dict()")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "lambdas"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        lam = state_dict[key]
        if not isinstance(lam, Tensor) or lam.dim() != 1 or not lam.is_floating_point():
            raise ValueError("state['lambdas'] must be a 1-D floating-point tensor")
        if self.num_samples is not None and lam.shape[0] != self.num_samples:
            raise ValueError(f"state['lambdas'] has {lam.shape[0]} entries but num_samples is {self.num_samples}")
        if lam.numel() and not bool((lam > 0).all()):
            raise ValueError("state['lambdas'] must be positive")
        # The table may have grown since it was saved (num_samples=None): restore it at its saved size.
        self.lambdas = lam.detach().to(device=self.lambdas.device, dtype=torch.float64).clone()

    # -- the loss ---------------------------------------------------------------------------------
    def extra_inputs(self):
        return ("sample_ids", *super().extra_inputs())

    def _sample_ids(self, rows: Rows) -> Tensor:
        ids = rows.extra.get("sample_ids")
        if ids is None:
            raise ValueError(
                "aldr_kl keeps one temperature per training sample and needs their ids: pass "
                "extra={'sample_ids': ids} to crossent.cross_entropy (one integer per target)"
            )
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 1:
            raise ValueError(f"sample_ids must hold one id per target, got trailing shape {tuple(ids.shape[1:])}")
        ids = ids.to(device=rows.valid.device, dtype=torch.long)
        valid = rows.valid
        negative = valid & (ids < 0)
        V.data_check(negative, "aldr_kl: sample_ids must be non-negative",
                     lambda: f"sample_ids must be non-negative, got {int(ids[negative].min())}")  # fmt: skip
        if self.num_samples is not None:
            beyond = valid & (ids >= self.num_samples)
            V.data_check(
                beyond,
                f"aldr_kl: sample ids must be below num_samples={self.num_samples}",
                lambda: f"sample id {int(ids[beyond].max())} is out of range for num_samples={self.num_samples}",
            )
        if self.num_samples is None:
            if torch.compiler.is_compiling():
                raise ValueError(
                    "aldr_kl under torch.compile needs num_samples: its table of temperatures cannot grow inside "
                    "a compiled graph"
                )
            counted = ids[valid]
            high = int(counted.max()) if counted.numel() else -1
            if high >= self.lambdas.shape[0]:
                grown = torch.full((high + 1,), self.lam0, dtype=torch.float64, device=self.lambdas.device)
                grown[: self.lambdas.shape[0]] = self.lambdas
                self.lambdas = grown
        return torch.where(valid, ids, torch.zeros_like(ids))

    def observe(self, z: Tensor, rows: Rows) -> dict[str, Tensor]:
        """Each counted row's new temperature, from the stored one (the table is written in :meth:`commit`)."""
        rows.require_indices("aldr_kl")
        num_classes = z.shape[-1]
        if num_classes < 2:
            raise ValueError(f"aldr_kl needs at least 2 classes, got {num_classes}")
        ids = self._sample_ids(rows)
        if self.lambdas.device != z.device:
            self.lambdas = self.lambdas.to(z.device)
        if self.lambdas.numel():
            lam_old = self.lambdas[ids]
        else:  # nothing stored yet and every row ignored
            lam_old = torch.full_like(ids, self.lam0, dtype=torch.float64)
        s = self._scores(z)
        work = self._work_dtype(z.dtype)
        info = torch.finfo(work)
        # softmax(s / lam) from the row maximum: lam divides differences <= 0 only.
        scaled = (s - s.amax(-1, keepdim=True)).to(work) / lam_old.to(work).clamp(info.tiny, info.max)[:, None]
        q = torch.softmax(scaled, dim=-1) + 1e-5
        q = q / q.sum(-1, keepdim=True)
        kl = (q * torch.log(num_classes * q)).sum(-1).to(torch.float64)
        strength = self.alpha * math.log(num_classes)
        # kl < log C, so lam > lam0 (1 - 1/alpha) > 0; the clamp only undoes rounding (alpha near 1).
        lam = (self.lam0 - self.lam0 * kl / strength).clamp(self.lam0 * (1 - 1 / self.alpha), self.lam0)
        # The prior alpha log C / (2 lam0) (lam - lam0)^2, without forming alpha / lam0 (it overflows for
        # a large alpha and a small lam0 while the prior itself is tiny).
        prior = self.lam0 * (kl / (2 * strength)) * kl
        return {self._key: lam, self._key + ".prior": prior, self._key + ".ids": ids}

    def commit(self, rows: Rows) -> None:
        """``lambdas[id] = lambda`` for every counted row of the forward (training mode only).

        Also checks, once per call, that the counted rows' ids are distinct: an engine may observe a
        call's rows in several blocks, and only here are they all together.
        """
        ids = rows.extra[self._key + ".ids"]
        # Sorted, with distinct negative stand-ins for the ignored rows.
        standing = torch.where(rows.valid, ids, -1 - torch.arange(ids.shape[0], device=ids.device)).sort().values
        duplicate = standing[1:] == standing[:-1]
        V.data_check(duplicate, "aldr_kl: sample_ids of the counted rows of one call must be distinct")
        if not self.training or not self.lambdas.numel():
            return
        # Branch-free (no host sync, traceable): ignored rows write to a scratch slot past the table.
        lam = rows.extra[self._key].to(torch.float64)
        table = torch.cat([self.lambdas, self.lambdas.new_zeros(1)])
        table[torch.where(rows.valid, ids, self.lambdas.shape[0])] = lam
        self.lambdas.copy_(table[:-1])

    @staticmethod
    def _scores(z: Tensor) -> Tensor:
        scale = z.abs().sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny) / z.shape[-1]
        return z / scale

    def _work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Where to divide by the temperatures, which lie in ``(lam0 (1 - 1/alpha), lam0]``."""
        return _temperature_dtype(dtype, self.lam0 * (1 - 1 / self.alpha), self.lam0)

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        target = rows.require_indices("aldr_kl")
        lam = rows.extra.get(self._key)
        if lam is None:
            raise RuntimeError("aldr_kl: the engine evaluated the loss without observing the rows first (Plan.observe)")
        s = self._scores(z)
        if abs(self.margin) > torch.finfo(s.dtype).max / 4:  # a margin beyond the range of z's dtype
            s = s.double()
        margins = torch.full_like(s, self.margin).scatter(-1, target[:, None], 0.0)
        violations = s - s.gather(-1, target[:, None]) + margins
        ldr = _tempered_log_mean_exp(violations, lam, self._work_dtype(s.dtype))
        return _weighted(ldr - rows.extra[self._key + ".prior"].to(ldr.dtype), rows)


__all__ = ["NormalizedFocal", "LogitClip", "AdaptiveLDRKL"]
