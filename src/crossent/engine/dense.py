"""The dense engine: statistics from a logit tensor the caller already has.

Forward computes the statistics of each row and the per-row loss, saving only the logits (which the
caller holds anyway) and ``[N]`` statistic values. Backward turns the upstream gradient into
coefficients and applies the statistics' elementwise derivatives: for CE that is one ``exp`` pass and
a scatter, the same work as ``F.cross_entropy``'s softmax backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rows import Rows, as_float
from .plan import Plan


class _DenseRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan, rows: Rows) -> Tensor:
        z = as_float(logits)
        zt = plan.transform(z, rows, slice(0, z.shape[-1]))
        values = plan.statistics(zt, rows)
        del zt
        out = plan.row_losses(values, rows)
        ctx.save_for_backward(logits)
        ctx.plan, ctx.rows, ctx.values = plan, rows, values
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (logits,) = ctx.saved_tensors
        plan, rows, values = ctx.plan, ctx.rows, ctx.values
        coefs = plan.coefficients(values, rows, grad_rows)
        grad = plan.logit_grad(as_float(logits), rows, values, coefs, slice(0, logits.shape[-1]))
        return grad.to(logits.dtype), None, None


def dense_row_losses(logits: Tensor, plan: Plan, rows: Rows, *, autograd: bool = False) -> Tensor:
    """Per-row weighted losses ``[N]`` (float32 or float64) for ``[N, C]`` logits.

    Whole-row losses, and calls with ``autograd=True`` (a target that needs a gradient), take ordinary
    autograd through the row; everything else goes through the statistics.
    """
    if autograd or not plan.streamable:
        return plan.autograd_row_losses(as_float(logits), rows)
    return _DenseRowLoss.apply(logits, plan, rows)
