"""What one chunk of whole logit rows contributes: statistics, per-row losses, logit gradient.

The row-chunked engine computes a block of logits ``z`` (``[r, V]``, float32 or float64, every column
of ``r`` rows) and hands it to a *kernel*. Three kernels share one interface,
``kernel(z, rows, row_scale, source) -> ChunkResult``; ``row_scale`` is the upstream gradient of each
row's loss (``None``: values only); ``source`` (optional) knows the chunk's factors:
``source.logit_at(i, j)`` recomputes single raw logits, ``source.row_sums(stat)`` gives a column
sum ``sum_j w_j z_ij`` as ``e_i . (c^T w)`` (one ``[r, D]`` product instead of a pass over the chunk).
The kernel may overwrite ``z``. :func:`make_kernel` picks one from the plan's declared structure.

* :class:`FactoredKernel` (the fast path): plans whose statistics are all of the forms
  ``lse``, ``target``, column sum and ``argmax`` behind an affine transform chain
  (:attr:`Plan.structure`). It works in place on the chunk buffer, writes the softmax ``P`` over
  ``z`` and returns the gradient's :class:`~crossent._engine.plan.Factors` as :meth:`Plan.factors`
  gives them, ``a_i P_ij + b_i 1[j = y_i] + sum_k s_ki w_kj``. The engine folds ``a``, ``b`` and ``s``
  into the small ``[r, D]`` and ``[V]`` operands of the matrix products, so on CPU the only pass over
  the chunk between the matrix products is one fused softmax.
* :class:`PlanKernel`: any other streamable loss, through :meth:`Plan.statistics` and
  :meth:`Plan.logit_grad`, in blocks of rows: a few block-sized temporaries, the gradient written
  over the chunk's logits.
* :class:`WholeRowKernel`: losses with ``streamable = False``, by autograd through the chunk's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._rows import Rows
from ...stats import ACC, Form, anchored
from ..plan import Factors, Plan
from ..dense import row_blocks
from ..row_grad import weighted_grad
from ..softmax import fused, softmax_


@dataclass
class ChunkResult:
    """What a kernel returns for a chunk of rows.

    ``grad`` (with a ``row_scale``) is the chunk's logit gradient ``dL/dz``, or, with ``factors``, the
    softmax ``P`` the factors multiply: ``dL/dz`` is then ``factors`` with ``P`` for ``p`` (the
    :meth:`Plan.factors` of the raw logits, :meth:`~crossent._engine.plan.Factors.relative` to a
    ``P`` that holds ``exp(tail)`` times the softmax).
    """

    loss: Tensor  # [r] weighted per-row losses, zero on ignored rows
    values: dict  # statistic -> [r]
    grad: Tensor | None = None
    factors: Factors | None = None


class FactoredKernel:
    """In-place kernel for plans of ``lse``, ``target``, column sums and ``argmax`` behind affine transforms."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.affine = plan.structure.affine
        self.by_form = plan.structure.by_form
        self.columns = plan.structure.columns

    @staticmethod
    def supports(plan: Plan) -> bool:
        st = plan.structure
        return (
            plan.streamable
            and st.affine is not None
            and st.only(Form.LOG_SUM_EXP, Form.TARGET, Form.COLUMN_SUM, Form.ARGMAX)
            and st.has(Form.LOG_SUM_EXP)
            and st.has(Form.TARGET)
        )

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan, affine, num_classes = self.plan, self.affine, rows.num_classes
        cols = slice(0, z.shape[1])
        values: dict = {}
        if source is not None:
            for s, w in self.columns:
                values[s] = affine.of_sums(source.row_sums(s), w, num_classes)
        affine.apply_(z, cols)
        for s, w in self.columns:
            if s not in values:
                values[s] = (z.sum(1) if w is None else z @ w.to(z.dtype)).to(ACC)
        ref = rows.target[:, None]  # the target column (0 on ignored rows): a reference for lse
        z_ref = z.gather(1, ref).squeeze(1).to(ACC)
        values[self.by_form[Form.TARGET]] = z_ref
        peak = where = None
        argmax = self.by_form.get(Form.ARGMAX)
        if argmax is not None:
            peak, where = z.max(1)
            values[argmax] = where
        elif not fused(z):
            peak = z.amax(1)
        norm = softmax_(z, peak)
        log_norm = None if norm is None else norm.to(ACC).log()
        lse_stat = self.by_form[Form.LOG_SUM_EXP]
        # lse as the anchored pair (head, tail): a logit of the row and -log of its probability.
        if log_norm is not None:
            values[lse_stat] = anchored(peak, log_norm)
        elif where is not None:
            # p at the row's maximum lies in [1/V, 1]: its log is well conditioned.
            values[lse_stat] = anchored(peak, -z.gather(1, where[:, None]).squeeze(1).to(ACC).log())
        else:
            values[lse_stat] = self._lse_from_reference(z, z_ref, ref, source)
        loss = plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)

        f = plan.factors(values, plan.coefficients(values, rows, row_scale), rows, raw=True)
        if log_norm is not None:  # z holds exp(z - peak), the softmax times its normaliser
            f = f.relative(log_norm)
        return ChunkResult(loss, values, z, f)

    def _lse_from_reference(self, p: Tensor, z_ref: Tensor, ref: Tensor, source) -> Tensor:
        """``lse`` as the pair ``(z_k, -log p_k)`` for a column ``k`` with ``p_k`` well away from underflow.

        The target column serves almost always (it spares a separate ``max`` pass over the chunk,
        the softmax kernel finds the maximum itself). Rows whose target probability is below
        ``_TINY`` use their most probable column instead (``p >= 1/V``), whose logit is recomputed
        as one dot product.
        """
        p_ref = p.gather(1, ref).squeeze(1)
        head, tail = z_ref.clone(), -p_ref.to(ACC).log()
        small = (p_ref < _TINY).nonzero().squeeze(1)
        if small.numel():
            p_top, k = p.index_select(0, small).max(1)
            head[small] = self.affine.at(source.logit_at(small, k), k).to(ACC)
            tail[small] = -p_top.to(ACC).log()
        return anchored(head, tail)


#: Below this a float32 probability has lost relative precision to underflow (exp(-69)).
_TINY = 1e-30


class PlanKernel:
    """Any streamable loss through the generic :class:`Plan` methods.

    It walks the chunk in blocks of rows, as the dense engine does: the per-statistic temporaries are a
    few MiB, recycled from block to block, and the gradient is written over the chunk's logits (through
    a block-sized temporary where the plan reads a block's logits after writing its gradient, a sum of
    squares), never another chunk-sized buffer.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self._in_place = not plan.structure.has(Form.SQUARES)

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan = self.plan
        cols = slice(0, z.shape[1])
        blocks = row_blocks(*z.shape)
        parts = []
        for b in blocks:
            rows_b = rows.select(b)
            parts.append(plan.statistics(plan.transform(z[b], rows_b, cols), rows_b))
        values = parts[0] if len(parts) == 1 else {s: torch.cat([p[s] for p in parts]) for s in parts[0]}
        loss = plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)
        coefs = plan.coefficients(values, rows, row_scale)
        for b in blocks:
            zb = z[b]
            block_values, block_coefs = {k: v[b] for k, v in values.items()}, {k: v[b] for k, v in coefs.items()}
            grad = plan.logit_grad(zb, rows.select(b), block_values, block_coefs, cols, out=zb if self._in_place else None)
            if not self._in_place:
                zb.copy_(grad)  # the block's logits are no longer needed
        return ChunkResult(loss, values, z)


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
                (grad,) = weighted_grad(loss, [leaf], row_scale)
            else:
                grad = torch.zeros_like(z)
        return ChunkResult(loss.detach(), values, grad)


def make_kernel(plan: Plan, extra_stats=()):
    """The fastest kernel for ``plan``, chosen from its declared structure.

    ``extra_stats``: statistics to report besides the loss; a streamable plan must already compute
    them (:meth:`Plan.with_statistics`), a whole-row kernel computes them itself.
    """
    if not plan.streamable:
        return WholeRowKernel(plan, extra_stats)
    if FactoredKernel.supports(plan):
        return FactoredKernel(plan)
    return PlanKernel(plan)
