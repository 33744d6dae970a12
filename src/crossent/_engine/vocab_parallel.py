"""The vocabulary-parallel engine: each process holds a slice of the classes, none holds a whole row.

This is the layout of a tensor-parallel LM head (Megatron-style): rank ``r`` computes the logits of
classes ``[vocab_start, vocab_start + V_r)`` only. Each rank computes the mergeable states of its
columns, one all-gather of ``[N]``-sized states per statistic combines them (in rank order, so every
rank gets bit-identical values), the per-row formula runs everywhere, and the backward pass needs no
communication: each rank applies the coefficients to its own columns through :meth:`Plan.logit_grad`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._rows import Rows, as_float
from .plan import Plan, refuse_second_order

ENGINE = "vocab-parallel"


def world(group) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _all_gather(t: Tensor, group, size: int) -> list[Tensor]:
    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def merged_values(plan: Plan, states: dict, group, size: int) -> dict:
    """Final statistic values from every rank's states, merged in rank order."""
    per_rank: list[dict] = [{} for _ in range(size)]
    for stat, state in states.items():
        gathered = [_all_gather(part, group, size) for part in state]
        for r in range(size):
            per_rank[r][stat] = tuple(g[r] for g in gathered)
    return plan.merge_states(per_rank)


class VocabParallelRowLoss(torch.autograd.Function):
    """Per-row losses of logit columns ``cols`` held by this rank; states merged over ``group``."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan, rows: Rows, cols: slice, group, size: int) -> Tensor:
        z = as_float(logits)
        states = plan.partial_states(plan.transform(z, rows, cols), rows, cols)
        values = merged_values(plan, states, group, size)
        ctx.save_for_backward(logits)
        ctx.plan, ctx.rows, ctx.cols, ctx.values = plan, rows, cols, values
        return plan.row_losses(values, rows)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        refuse_second_order(ENGINE, "gather the logits and use crossent.cross_entropy for second derivatives")
        (logits,) = ctx.saved_tensors
        # Every rank holds the same upstream gradient of the (replicated) per-row losses.
        coefs = ctx.plan.coefficients(ctx.values, ctx.rows, grad_rows)
        grad = ctx.plan.logit_grad(as_float(logits), ctx.rows, ctx.values, coefs, ctx.cols)
        return grad.to(logits.dtype), None, None, None, None, None
