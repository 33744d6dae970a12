"""The fused vocabulary-parallel engine: the loss of ``e @ c.T`` with ``c``'s rows split over the ranks.

Each rank holds the classifier rows (and bias) of its classes, ``c_shard``; the hidden states ``e``
and the targets are the same on every rank (the input of a column-parallel ``lm_head``). The
row-chunked engine runs unchanged (row selection, chunk producers, gradient accumulators, the eager
and recompute modes, :func:`~crossent._engine.chunked.chunked_loss`); only its kernel differs:
:class:`ShardKernel` computes the mergeable states of the chunk's local columns, merges them with the
other ranks' in one all-gather of ``[chunk, K]`` (``K`` state tensors, e.g. 2 for cross-entropy) and
forms the gradient of the local columns from the merged values. No rank holds more than one chunk of
its ``[N, V_r]`` logits.

**One all-gather per chunk, not per call.** A chunk's gradient needs the merged statistics while its
logits are in memory. Merging once per call would mean keeping every chunk's logits (the ``[N, V_r]``
block this engine avoids) or forming them twice (a fourth matrix product, a third more arithmetic).
The gathers are small (``chunk x K`` float64: 8 KiB for 512 rows of cross-entropy) and few
(``N / chunk``), so their latency is negligible beside a chunk's matrix products. A recompute pass in
backward (``reduction='none'``) reuses the forward's merged values: no all-gather again.

**Gradients.** ``c_shard`` and ``bias_shard`` get the gradients of their own rows. ``e``'s gradient is
a sum over all classes, so each rank's columns give a partial sum; it is summed over the group in
backward (one all-reduce of ``[N, D]``), and every rank gets the whole gradient of its replicated
``e``. This is Megatron-LM's convention for the input of a column-parallel layer (its
``copy_to_tensor_model_parallel_region``, identity forward and all-reduce backward), and DTensor's
for a replicated input of a ``Shard(0)`` weight: the layers before the head need no change.

Every rank visits the same rows in the same chunks, so the all-gathers pair up: the rows and targets
are agreed on beforehand (:mod:`.shards`), and the chunk size comes from the widest shard, never the
local one. Half-precision chunks hold a single staging block (the kernel runs once per chunk).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._rows import Rows, compute_dtype
from ..stats import Form
from .chunked import chunked_loss
from .chunked.chunks import stage_rows
from .chunked.kernels import ChunkResult
from .dense import row_blocks
from .options import LinearCrossEntropyOptions, tuning
from .plan import Plan
from .shards import Layout
from .vocab_parallel import merged_values


class ShardKernel:
    """A chunk kernel for the local columns ``layout.cols``; statistics merged over ``layout``'s ranks.

    Values-only calls (the forward of the recompute mode, or no gradient) keep their merged values, so
    the recompute pass in backward, which visits the same chunks in the same order, reads them back
    instead of merging again.
    """

    def __init__(self, plan: Plan, layout: Layout):
        self.plan, self.layout, self.cols = plan, layout, layout.cols
        self._kept: list[dict] = []
        self._next = 0
        # The gradient is written over the chunk's logits: in place, unless the plan reads a block's
        # logits after writing its gradient (a sum of squares), then through a block-sized temporary.
        self._in_place = not plan.structure.has(Form.SQUARES)

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        plan, cols = self.plan, self.cols
        # Blocks of rows, as in the dense engine: the temporaries of the statistics and the gradient are
        # a few MiB, recycled from block to block, never another chunk-sized buffer.
        blocks = row_blocks(*z.shape)
        if row_scale is not None and self._kept:
            values = self._kept[self._next]
            self._next = (self._next + 1) % len(self._kept)
        else:
            values = merged_values(plan, self._states(z, rows, blocks), self.layout)
            if row_scale is None:
                self._kept.append(values)
        loss = plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)
        coefs = plan.coefficients(values, rows, row_scale)
        for b in blocks:
            zb, block_values, block_coefs = z[b], {k: v[b] for k, v in values.items()}, {k: v[b] for k, v in coefs.items()}
            grad = plan.logit_grad(zb, rows.select(b), block_values, block_coefs, cols, out=zb if self._in_place else None)
            if not self._in_place:
                zb.copy_(grad)  # the block's logits are no longer needed
        return ChunkResult(loss, values, z)

    def _states(self, z: Tensor, rows: Rows, blocks) -> dict:
        """The mergeable states of the chunk's local columns, block by block."""
        plan, cols = self.plan, self.cols
        parts = []
        for b in blocks:
            rows_b = rows.select(b)
            parts.append(plan.partial_states(plan.transform(z[b], rows_b, cols), rows_b, cols))
        if len(parts) == 1:
            return parts[0]
        return {s: tuple(torch.cat(ts) for ts in zip(*(p[s] for p in parts))) for s in parts[0]}


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (the column-parallel layer's input)."""

    @staticmethod
    def forward(ctx, e: Tensor, group):
        ctx.group = group
        return e.view_as(e)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def chunk_rows(options: LinearCrossEntropyOptions, layout: Layout, hidden: int, dtype: torch.dtype, summed) -> int:
    """Rows per chunk, the same on every rank: sized by the widest shard; half precision: one staging block."""
    rows = options.chunk_rows(layout.widest, hidden, dtype, summed)
    if dtype != compute_dtype(dtype):
        rows = stage_rows(rows, layout.widest, tuning().stage_bytes)
    return rows


def sharded_loss(
    e: Tensor,
    c_shard: Tensor,
    bias_shard: Tensor | None,
    plan: Plan,
    rows: Rows,
    layout: Layout,
    *,
    reduction: str,
    options: LinearCrossEntropyOptions,
    report: tuple = (),
):
    """:func:`~crossent._engine.chunked.chunked_loss` of ``e @ c_shard.T + bias_shard`` over ``layout``'s ranks.

    Returns ``(loss, stats)`` as ``chunked_loss`` does; the same values on every rank.
    """
    tracked = [t for t in (e, c_shard, bias_shard) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    summed = options.accumulator(e.dtype) if needs_grad and c_shard.requires_grad else None
    options = options.replace(chunk_size=chunk_rows(options, layout, e.shape[1], e.dtype, summed))
    if layout.size > 1 and needs_grad and e.requires_grad:
        e = _SumGradOverRanks.apply(e, layout.group)
    return chunked_loss(
        e, c_shard, bias_shard, plan, rows, reduction=reduction, options=options, report=report,
        kernel=lambda job_plan, _report: ShardKernel(job_plan, layout),
    )  # fmt: skip


__all__ = ["ShardKernel", "chunk_rows", "sharded_loss"]
