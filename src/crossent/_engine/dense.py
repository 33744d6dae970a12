"""The dense engine: statistics from a logit tensor the caller already has.

Forward computes the statistics of each row and the per-row loss, saving only the logits (which the
caller holds anyway) and ``[N]`` statistic values. Backward turns the upstream gradient into
coefficients and lets :meth:`Plan.logit_grad` form the logit gradient: for CE that is one fused softmax
pass and a scatter, the same work as ``F.cross_entropy``'s softmax backward.

Under ``backward(create_graph=True)`` the gradient comes from autograd on the formula instead
(:func:`formula_grad`), so second derivatives are exact.

Both passes walk the rows in blocks of about ``BLOCK_ELEMENTS`` logits, so every temporary is some MB:
small enough for the allocator to recycle it from block to block (a fresh ``[N, C]`` temporary costs a
page fault per 4 KB, which dominates a softmax pass) and, for half-precision input, the float32
upcast never exists for the whole matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._rows import Rows, as_float
from .plan import Plan
from .row_grad import weighted_grad


#: Logits per row block: 24 MiB of float32, under glibc's largest mmap threshold (32 MiB), so block
#: temporaries are recycled from the heap; large enough that each elementwise op is one long parallel
#: region (many short ones stall whenever another process holds a core).
BLOCK_ELEMENTS = 6 << 20


def row_blocks(num_rows: int, num_classes: int, block_elements: int | None = None):
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(num_classes, 1))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


def _cat(parts: list[dict], keys) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


class _DenseRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan, rows: Rows) -> Tensor:
        cols = slice(0, logits.shape[-1])
        blocks = row_blocks(*logits.shape)
        parts = []
        for b in blocks:
            rows_b = rows.select(b)
            parts.append(plan.statistics(plan.transform(as_float(logits[b]), rows_b, cols), rows_b))
        if len(parts) == 1:
            values = parts[0]
        elif parts:
            values = _cat(parts, plan.stats)
        else:
            values = plan.statistics(as_float(logits), rows)
        out = plan.row_losses(values, rows)
        ctx.save_for_backward(logits)
        ctx.plan, ctx.rows, ctx.values, ctx.blocks = plan, rows, values, blocks
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (logits,) = ctx.saved_tensors
        plan, rows, values = ctx.plan, ctx.rows, ctx.values
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradient must itself be differentiable.
            return formula_grad(logits, plan, rows, grad_rows), None, None
        coefs = plan.coefficients(values, rows, grad_rows)
        cols = slice(0, logits.shape[-1])
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for b in ctx.blocks:
            plan.logit_grad(
                as_float(logits[b]),
                rows.select(b),
                {k: v[b] for k, v in values.items()},
                {k: v[b] for k, v in coefs.items()},
                cols,
                out=grad[b],
            )
        return grad, None, None


def formula_grad(logits: Tensor, plan: Plan, rows: Rows, grad_rows: Tensor) -> Tensor:
    """``d(sum_i grad_rows[i] L_i) / d logits`` by autograd on the formula over whole rows, with its graph.

    The fused backward forms the gradient in place, which autograd cannot differentiate; under
    ``create_graph=True`` (gradient penalties, Hessian-vector products) the gradient comes from the
    same per-row formula through ordinary differentiable ops instead, so its own derivatives are
    exact. It costs what plain autograd over the logits costs.
    """
    with torch.enable_grad():
        out = plan.autograd_row_losses(as_float(logits), rows)
        if not out.requires_grad:  # a formula that does not depend on the logits
            return torch.zeros_like(logits)
        (grad,) = weighted_grad(out, [logits], grad_rows, create_graph=True)
    return grad


def dense_row_losses(logits: Tensor, plan: Plan, rows: Rows, *, autograd: bool = False) -> Tensor:
    """Per-row weighted losses ``[N]`` (float32 or float64) for ``[N, C]`` logits.

    Whole-row losses, and calls with ``autograd=True`` (a target that needs a gradient), take ordinary
    autograd through the row; everything else goes through the statistics. A stateful loss observes
    the rows once, here.
    """
    if plan.stateful:
        rows = plan.observe(as_float(logits), rows)
        plan.commit(rows)
    if autograd or not plan.streamable:
        return plan.autograd_row_losses(as_float(logits), rows)
    return _DenseRowLoss.apply(logits, plan, rows)
