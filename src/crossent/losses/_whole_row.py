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
from ..transforms import apply_all
from .. import _validation as V
from ._base import CompositeLoss, Loss, StatefulLoss, register, resolve


def _weighted(loss: Tensor, rows: Rows) -> Tensor:
    w = rows.target_weight()
    return loss if w is None else loss * w.to(loss.dtype)


@register("nfl")
class NormalizedFocal(Loss):
    r"""Normalized focal loss (NFL) of Ma et al., as in the official code.

    .. math::

        \ell = \frac{(1 - \mathrm{sg}(p_y))^\gamma\, (-\log p_y)}
                    {\sum_{k=1}^{C} (1 - \mathrm{sg}(p_k))^\gamma\, (-\log p_k)}

    with :math:`p = \mathrm{softmax}(z)` and :math:`\mathrm{sg}` a stop-gradient: the official code
    detaches the modulating factors :math:`(1-p)^\gamma` (numerator and denominator) but not the log
    terms, and so does this class. The value lies in :math:`[0, 1]`; ``gamma=0`` gives NCE. The
    normalizer sums over the whole row, so the loss is whole-row (``streamable = False``).

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

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        target = rows.require_indices("nfl")
        if z.shape[-1] < 2:
            raise ValueError(f"nfl needs at least 2 classes (its normalizer is 0 for one), got {z.shape[-1]}")
        logp = torch.log_softmax(z, dim=-1)
        # -expm1(log p) is 1 - p without cancellation when p is close to 1.
        modulator = (-torch.expm1(logp.detach())).pow(self.gamma)
        terms = modulator * -logp
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
    restores at its saved size), and the ``crossent.nn`` wrappers include it in theirs.

    Not reproduced: the official CIFAR-100 variant applies ``softplus`` to the logits first. A row of
    zeros is scored as zeros (the official code divides by zero).

    Args:
        lam0: :math:`\lambda_0 > 0`, the reference temperature. Default ``1.0`` (the paper picks it by
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
        self.lam0 = V.positive("lam0", lam0)
        self.margin = V.real(None, "margin", margin)
        self.alpha = V.real(None, "alpha", alpha)
        if not self.alpha > 1:
            raise ValueError(f"alpha must be > 1 (it keeps every lambda above lam0 * (1 - 1/alpha) > 0), got {alpha}")
        self.num_samples = None if num_samples is None else V.count("num_samples", num_samples)
        self.register_buffer("lambdas", torch.full((self.num_samples or 0,), self.lam0, dtype=torch.float64))
        self._key = f"aldr_kl.lambda.{id(self)}"

    # -- state ------------------------------------------------------------------------------------
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
        # Distinct ids among the counted rows: sorted, ignored rows hold distinct negative stand-ins.
        standing = torch.where(valid, ids, -1 - torch.arange(ids.shape[0], device=ids.device)).sort().values
        duplicate = standing[1:] == standing[:-1]
        V.data_check(duplicate, "aldr_kl: sample_ids of the counted rows of one call must be distinct")
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
        s = self._scores(z)
        if self.lambdas.numel():
            lam_old = self.lambdas[ids].to(z.dtype)
        else:  # nothing stored yet and every row ignored
            lam_old = torch.full_like(ids, self.lam0, dtype=z.dtype)
        q = torch.softmax(s / lam_old[:, None], dim=-1) + 1e-5
        q = q / q.sum(-1, keepdim=True)
        kl = (q * torch.log(num_classes * q)).sum(-1)
        lam = self.lam0 - self.lam0 * kl / (self.alpha * math.log(num_classes))
        return {self._key: lam, self._key + ".ids": ids}

    def commit(self, rows: Rows) -> None:
        """``lambdas[id] = lambda`` for every counted row of the forward (training mode only)."""
        if not self.training or not self.lambdas.numel():
            return
        # Branch-free (no host sync, traceable): ignored rows write to a scratch slot past the table.
        ids, lam = rows.extra[self._key + ".ids"], rows.extra[self._key].to(torch.float64)
        table = torch.cat([self.lambdas, self.lambdas.new_zeros(1)])
        table[torch.where(rows.valid, ids, self.lambdas.shape[0])] = lam
        self.lambdas.copy_(table[:-1])

    @staticmethod
    def _scores(z: Tensor) -> Tensor:
        scale = z.abs().sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny) / z.shape[-1]
        return z / scale

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        target = rows.require_indices("aldr_kl")
        lam = rows.extra.get(self._key)
        if lam is None:
            raise RuntimeError("aldr_kl: the engine evaluated the loss without observing the rows first (Plan.observe)")
        lam = lam.to(z.dtype)
        log_c = math.log(z.shape[-1])
        s = self._scores(z)
        s_y = s.gather(-1, target[:, None])
        margins = torch.full_like(s, self.margin).scatter(-1, target[:, None], 0.0)
        ldr = lam * (torch.logsumexp((s - s_y + margins) / lam[:, None], dim=-1) - log_c)
        prior = self.alpha * log_c / (2 * self.lam0) * (lam - self.lam0) ** 2
        return _weighted(ldr - prior, rows)


__all__ = ["NormalizedFocal", "LogitClip", "AdaptiveLDRKL"]
