"""The vocabulary-parallel engine: each process holds a slice of the classes, none holds a whole row.

This is the layout of a tensor-parallel LM head (Megatron-style): rank ``r`` computes the logits of
classes ``[vocab_start, vocab_start + V_r)`` only. Each rank computes the mergeable states of its
columns, one all-gather of the ``[N, K]`` states (``K`` state tensors in all) combines them, merged in
the order of the classes on every rank, so every rank gets bit-identical values; the per-row formula
runs everywhere, and the backward pass needs no communication: each rank applies the coefficients to
its own columns through :meth:`Plan.logit_grad`. The ranks' layout (``layout``: a
:class:`~crossent._engine.shards.Layout`) is agreed on beforehand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._rows import Rows, as_float
from ..stats import ACC
from .plan import Plan

ENGINE = "vocab-parallel"


def world(group) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def gather_into(out: Tensor, t: Tensor, group) -> None:
    """Every rank's ``t`` (same shape everywhere) concatenated along dim 0 into ``out``."""
    # Recent PyTorch deprecates all_gather_into_tensor for all_gather_single; older releases lack the latter.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def merged_values(plan: Plan, states: dict, layout) -> dict:
    """Final statistic values from every rank's states: one all-gather, merged in the order of the classes.

    The states (``[N]`` tensors, a few per statistic) travel packed as one ``[N, K]`` float64 tensor,
    which holds each of them exactly (float32 values, indices below 2**53).
    """
    n = next(iter(states.values()))[0].shape[0] if states else 0
    if layout.size == 1 or n == 0:
        return plan.merge_states([states])
    parts = [t for state in states.values() for t in state]
    packed = torch.stack([t.to(ACC) for t in parts], 1)
    gathered = packed.new_empty(layout.size * n, len(parts))
    gather_into(gathered, packed, layout.group)
    gathered = gathered.view(layout.size, n, len(parts))

    def unpacked(r: int) -> dict:
        columns = iter(gathered[r].unbind(1))
        return {stat: tuple(next(columns).to(t.dtype) for t in state) for stat, state in states.items()}

    return plan.merge_states([unpacked(r) for r in layout.order])


class VocabParallelRowLoss(torch.autograd.Function):
    """Per-row losses of logit columns ``cols`` held by this rank; states merged over ``layout``'s ranks."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan, rows: Rows, cols: slice, layout) -> Tensor:
        z = as_float(logits)
        states = plan.partial_states(plan.transform(z, rows, cols), rows, cols)
        values = merged_values(plan, states, layout)
        ctx.save_for_backward(logits)
        ctx.plan, ctx.rows, ctx.cols, ctx.values = plan, rows, cols, values
        return plan.row_losses(values, rows)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (logits,) = ctx.saved_tensors
        # Every rank holds the same upstream gradient of the (replicated) per-row losses.
        coefs = ctx.plan.coefficients(ctx.values, ctx.rows, grad_rows)
        grad = ctx.plan.logit_grad(as_float(logits), ctx.rows, ctx.values, coefs, ctx.cols)
        return grad.to(logits.dtype), None, None, None, None
