"""The Triton engine's autograd glue: one forward pass of statistics, one backward pass of gradients.

The forward kernel gives the statistic values of the visited rows; the per-row formula, its
reduction and (in backward) its coefficients ``dL/dS`` and their
:class:`~crossent._engine.plan.Factors` come from :class:`~crossent._engine.plan.Plan` on ``[rows]``
tensors, as in every engine. Backward recomputes the logit tiles (Cut Cross-Entropy's schedule: one
product in the forward pass, three in the backward pass). Rows whose target is ``ignore_index`` are
skipped unless their statistics are reported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._rows import Rows
from ...stats import ACC, Form, number
from ..chunked import INSTEAD
from ..chunked.selection import RowSelection
from ..options import LinearCrossEntropyOptions
from ..plan import Factors, Plan, refuse_second_order
from ..reduction import reduce
from .program import Program


class Call:
    """The untracked half of one call: plan, program, visited rows, launch shape, reported statistics."""

    def __init__(self, plan: Plan, rows: Rows, options: LinearCrossEntropyOptions, launch, report=()):
        self.report = tuple(report)
        self.plan = plan.with_statistics(self.report, rows)
        self.program = Program.of(self.plan)
        self.rows = rows
        self.selection = RowSelection(rows, max(1, rows.num_rows), keep_all=bool(self.report))
        active = self.selection.active
        index = self.selection.index
        self.index = index if index is not None else torch.arange(rows.num_rows, device=rows.valid.device)
        self.target = active.target.contiguous()
        self.launch = launch
        self.filter_eps = options.filter_eps

    @property
    def active(self) -> Rows:
        return self.selection.active

    def scatter(self, values: Tensor, dtype) -> Tensor:
        """``[N]`` tensor with the visited rows' ``values`` (zero elsewhere)."""
        out = torch.zeros(self.rows.num_rows, dtype=dtype, device=values.device)
        return out.index_copy_(0, self.index, values.to(dtype))


def _row_losses(call: Call, e: Tensor, c: Tensor, bias: Tensor | None) -> tuple[Tensor, dict, tuple]:
    """``([N] float64 losses, values of the visited rows, [N] values of the reported statistics)``."""
    from .launch import forward_values

    values = forward_values(call.program, e, c, bias, call.index, call.target, call.launch)
    if call.index.numel():
        losses = call.plan.row_losses(values, call.active)
    else:
        losses = torch.zeros(0, dtype=ACC, device=e.device)
    stats = tuple(
        call.scatter(number(s, values[s], call.active), torch.long if s.form(call.active) is Form.ARGMAX else ACC)
        for s in call.report
    )
    return call.scatter(losses, ACC), values, stats


class _TritonRowLosses(torch.autograd.Function):
    """Per-row losses ``[N]`` (float64) and the reported statistics; backward runs the gradient kernel."""

    @staticmethod
    def forward(ctx, e, c, bias, call: Call):
        per_row, values, stats = _row_losses(call, e, c, bias)
        ctx.save_for_backward(e, c, bias)
        ctx.call, ctx.values = call, values
        ctx.mark_non_differentiable(*stats)
        return (per_row, *stats)

    @staticmethod
    def backward(ctx, grad_rows, *_stats):
        from .launch import gradients, row_operands

        refuse_second_order("triton", INSTEAD)

        e, c, bias = ctx.saved_tensors
        call, values = ctx.call, ctx.values
        need = tuple(ctx.needs_input_grad[:3])
        grad_active = grad_rows.index_select(0, call.index).to(ACC)
        if call.index.numel():
            factors = call.plan.factors(values, call.plan.coefficients(values, call.active, grad_active), call.active)
        else:
            factors = Factors()
        operands = row_operands(call.program, values, factors, grad_active, call.filter_eps)
        grads = gradients(call.program, e, c, bias, call.index, call.target, operands, need, call.launch)
        return (*grads, None)


def triton_loss(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    plan: Plan,
    rows: Rows,
    *,
    reduction: str,
    options: LinearCrossEntropyOptions | None = None,
    report: tuple = (),
    row_weight: Tensor | None = None,
    denominator: Tensor | None = None,
):
    """The loss of ``e @ c.T + bias`` (``e`` is ``[N, D]``) in float64 and the reported statistics.

    The counterpart of :func:`crossent._engine.chunked.chunked_loss` (same arguments and results) on
    the Triton kernels. Raises ``ValueError`` for a plan the kernels cannot run, naming the part.
    ``row_weight`` and ``denominator`` act on the per-row losses (autograd carries their factors).
    """
    from .launch import check_device, launch_config

    options = options if options is not None else LinearCrossEntropyOptions()
    if options.mode == "eager":
        raise ValueError("the triton backend recomputes the logits in backward; mode='eager' needs backend='torch'")
    check_device(e)
    if e.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the triton backend takes float32, bfloat16 or float16 inputs, got {e.dtype}; use 'torch'")
    e = e if e.stride(-1) == 1 else e.contiguous()
    c = c if c.stride(-1) == 1 else c.contiguous()
    bias = bias.contiguous() if bias is not None else None
    call = Call(plan, rows, options, launch_config(e), report)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (e, c, bias)):
        per_row, *stats = _TritonRowLosses.apply(e, c, bias, call)
    else:
        with torch.no_grad():
            per_row, _, stats = _row_losses(call, e, c, bias)
    if row_weight is not None:
        per_row = per_row * row_weight.to(ACC)
    return reduce(per_row, rows, reduction, (e.shape[0],), ACC, denominator), dict(zip(call.report, stats))


__all__ = ["triton_loss", "Call"]
