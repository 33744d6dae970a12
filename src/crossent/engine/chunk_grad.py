"""What one chunk of whole logit rows contributes: statistics, per-row losses, logit gradient.

The row-chunked engine (:mod:`crossent.engine.chunked`) computes a block of logits ``z`` (``[r, V]``,
float32 or float64, every column of ``r`` rows) and hands it to a *kernel*. Three kernels share one
interface, ``kernel(z, rows, row_scale, source) -> ChunkResult``; ``row_scale`` is the upstream
gradient of each row's loss (``None``: values only); ``source`` (optional) knows the chunk's factors:
``source.logit_at(i, j)`` recomputes single raw logits, ``source.row_sums(w)`` gives
``sum_j w_j z_ij`` as ``e_i . (c^T w)`` (one ``[r, D]`` product instead of a pass over the chunk).
The kernel may overwrite ``z``.

* :class:`SoftmaxKernel` (the fast path): losses over ``lse``, ``target`` and (class-weighted) sums,
  behind affine logit transforms (temperature, class bias). It works in place on the chunk buffer and
  returns the gradient *factored* as ``a_i P_ij + b_i 1[j = y_i] + sum_k s_ki w_kj`` with ``P`` the
  softmax (written over ``z``). The engine folds ``a``, ``b`` and ``s`` into the small ``[r, D]`` and
  ``[V]`` operands of the matrix products, so on CPU the only pass over the chunk between the matrix
  products is one fused softmax: no fresh ``[r, V]`` tensor per statistic, no separate ``max`` or
  scaling pass.
* :class:`PlanKernel`: any other streamable loss, through :class:`~crossent.engine.plan.Plan`
  (statistics, coefficients by autograd on the row formula, ``logit_grad``); a few chunk-sized
  temporaries.
* :class:`WholeRowKernel`: losses with ``streamable = False``, by autograd through the chunk's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..rows import Rows
from ..stats import ACC, ARGMAX, LSE, SUM, TARGET, SoftDot, Statistic
from ..transforms import ClassBias, Temperature
from .plan import Plan


@dataclass
class ChunkGrad:
    """``dL/dz = row_scale[:, None] * matrix + target_coef * onehot(y) + sum_k s_k[:, None] * w_k[None, :]``.

    ``row_scale`` / ``target_coef`` are ``None`` when absent; a ``w`` of ``None`` stands for all ones.
    """

    matrix: Tensor
    row_scale: Tensor | None = None
    target_coef: Tensor | None = None
    sums: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)


@dataclass
class ChunkResult:
    loss: Tensor  # [r] weighted per-row losses, zero on ignored rows
    values: dict  # statistic -> [r]
    grad: ChunkGrad | None = None


def _sum_weights(stat: Statistic, rows: Rows) -> Tensor | None | bool:
    """The class vector ``w`` of a sum-like statistic (``None`` = ones), or ``False`` if it is not one."""
    if stat == SUM:
        return None
    if isinstance(stat, SoftDot) and stat.source == "ones":
        return rows.class_weight if stat.class_weighted else None
    return False


#: Devices whose softmax kernel may write its output over its input (checked by the test suite).
FUSED_SOFTMAX_DEVICES = {"cpu"}


def softmax_(z: Tensor, peak: Tensor | None = None) -> Tensor | None:
    """Softmax of each row of ``z``, in place; returns ``None``, or the row normalisers to divide by.

    On CPU the fused softmax kernel reads and writes each element once per pass at the same index, so
    aliasing its output to its input is exact and keeps one row in cache across its passes. Elsewhere
    the rows become ``exp(z - peak)`` in place (``peak``: the row maxima) and their sums are returned,
    for the caller to fold into its row coefficients.
    """
    if z.device.type in FUSED_SOFTMAX_DEVICES:
        torch.ops.aten._softmax.out(z, 1, False, out=z)
        return None
    z.sub_((z.amax(1) if peak is None else peak)[:, None]).exp_()
    return z.sum(1)


class SoftmaxKernel:
    """In-place kernel for losses over ``lse``, ``target``, sums and ``argmax`` (see module docstring)."""

    _SUPPORTED = (Temperature, ClassBias)

    def __init__(self, plan: Plan):
        self.plan = plan
        self.scale = 1.0
        for t in plan.transforms:
            if isinstance(t, Temperature):
                self.scale /= t.temperature

    @classmethod
    def supports(cls, plan: Plan, rows: Rows) -> bool:
        if not plan.streamable or not all(isinstance(t, cls._SUPPORTED) for t in plan.transforms):
            return False
        return all(s in (LSE, TARGET, ARGMAX) or _sum_weights(s, rows) is not False for s in plan.stats)

    def _transform_(self, z: Tensor, rows: Rows) -> None:
        cols = slice(0, z.shape[1])
        for t in self.plan.transforms:
            if isinstance(t, Temperature):
                z.div_(t.temperature)
            else:
                if t.bias.shape[0] != rows.num_classes:
                    raise ValueError(
                        f"class bias has {t.bias.shape[0]} entries but the logits have {rows.num_classes} classes"
                    )
                z.add_(t.bias[cols].to(device=z.device, dtype=z.dtype))

    def _transformed_at(self, z: Tensor, cols: Tensor) -> Tensor:
        for t in self.plan.transforms:
            z = z / t.temperature if isinstance(t, Temperature) else z + t.bias.to(device=z.device, dtype=z.dtype)[cols]
        return z

    def _transformed_sums(self, sums: Tensor, w: Tensor | None) -> Tensor:
        """``sum_j w_j t(z)_ij`` from the raw ``sum_j w_j z_ij``: the transforms are affine per class."""
        for t in self.plan.transforms:
            if isinstance(t, Temperature):
                sums = sums / t.temperature
            else:
                bias = t.bias.to(device=sums.device, dtype=ACC)
                sums = sums + (bias.sum() if w is None else w.to(ACC) @ bias)
        return sums

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan = self.plan
        values: dict = {}
        sum_like = []
        for s in plan.stats:
            w = _sum_weights(s, rows)
            if w is not False:
                sum_like.append((s, w))
                if source is not None:
                    values[s] = self._transformed_sums(source.row_sums(w), w)
        self._transform_(z, rows)
        for s, w in sum_like:
            if s not in values:
                values[s] = (z.sum(1) if w is None else z @ w.to(z.dtype)).to(ACC)
        ref = rows.target[:, None]  # the target column (0 on ignored rows): a reference for lse
        z_ref = z.gather(1, ref).squeeze(1).to(ACC)
        if TARGET in plan.stats:
            values[TARGET] = z_ref
        peak = where = None
        if ARGMAX in plan.stats:
            peak, where = z.max(1)
            values[ARGMAX] = where
        elif z.device.type not in FUSED_SOFTMAX_DEVICES:
            peak = z.amax(1)
        norm = softmax_(z, peak)
        if norm is not None:
            values[LSE] = peak.to(ACC) + norm.to(ACC).log()
        elif where is not None:
            # p at the row's maximum lies in [1/V, 1]: its log is well conditioned.
            values[LSE] = peak.to(ACC) - z.gather(1, where[:, None]).squeeze(1).to(ACC).log()
        else:
            values[LSE] = self._lse_from_reference(z, z_ref, ref, source)
        loss = plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)

        # Coefficients (float64, like the statistics) become row factors in the logits' dtype.
        coefs = plan.coefficients(values, rows, row_scale)
        k, dtype = self.scale, z.dtype
        a = coefs.get(LSE)
        if a is None:
            a = torch.zeros_like(values[LSE])
        if norm is not None:
            a = a / norm.to(a.dtype)
        b = coefs.get(TARGET)
        sums = [((coefs[s] * k).to(dtype), w) for s, w in sum_like if s in coefs]
        return ChunkResult(
            loss,
            values,
            ChunkGrad(z, (a * k).to(dtype), None if b is None else (b * k).to(dtype), sums),
        )


    def _lse_from_reference(self, p: Tensor, z_ref: Tensor, ref: Tensor, source) -> Tensor:
        """``lse = z_k - log p_k`` for a column ``k`` with ``p_k`` well away from underflow.

        The target column serves almost always (it spares a separate ``max`` pass over the chunk,
        the softmax kernel finds the maximum itself). Rows whose target probability is below
        ``_TINY`` use their most probable column instead (``p >= 1/V``), whose logit is recomputed
        as one dot product.
        """
        p_ref = p.gather(1, ref).squeeze(1)
        lse = z_ref - p_ref.to(ACC).log()
        small = (p_ref < _TINY).nonzero().squeeze(1)
        if small.numel():
            p_top, k = p.index_select(0, small).max(1)
            z_top = self._transformed_at(source.logit_at(small, k), k).to(ACC)
            lse[small] = z_top - p_top.to(ACC).log()
        return lse


#: Below this a float32 probability has lost relative precision to underflow (exp(-69)).
_TINY = 1e-30


class PlanKernel:
    """Any streamable loss through the generic :class:`Plan` methods (allocates per statistic)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan = self.plan
        cols = slice(0, z.shape[1])
        zt = plan.transform(z, rows, cols)
        values = plan.statistics(zt, rows)
        del zt
        loss = plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)
        coefs = plan.coefficients(values, rows, row_scale)
        return ChunkResult(loss, values, ChunkGrad(plan.logit_grad(z, rows, values, coefs, cols)))


class WholeRowKernel:
    """Losses that need whole rows (``streamable = False``): autograd through the chunk.

    ``extra_stats`` (``lse`` / ``argmax`` for ``return_stats``) are computed from the transformed rows.
    """

    def __init__(self, plan: Plan, extra_stats=()):
        self.plan = plan
        self.extra_stats = tuple(extra_stats)

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan = self.plan
        values = {}
        if self.extra_stats:
            with torch.no_grad():
                zt = plan.transform(z, rows, slice(0, z.shape[1]))
                values = {s: s.compute(zt, rows) for s in self.extra_stats}
                del zt
        if row_scale is None:
            with torch.no_grad():
                return ChunkResult(plan.autograd_row_losses(z, rows), values)
        with torch.enable_grad():
            leaf = z.detach().requires_grad_()
            loss = plan.autograd_row_losses(leaf, rows)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, leaf, row_scale.to(loss.dtype))
            else:
                grad = torch.zeros_like(z)
        return ChunkResult(loss.detach(), values, ChunkGrad(grad))


def make_kernel(plan: Plan, rows: Rows, extra_stats=()):
    """The fastest kernel that handles ``plan`` (``extra_stats`` are added to the plan's statistics)."""
    from ..stats import with_requirements

    if not plan.streamable:
        return WholeRowKernel(plan, extra_stats)
    if extra_stats:
        plan.stats = with_requirements([*plan.stats, *extra_stats])
    if SoftmaxKernel.supports(plan, rows):
        return SoftmaxKernel(plan)
    return PlanKernel(plan)
