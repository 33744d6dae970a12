"""The row-chunked engine: any loss of ``z = e @ c.T (+ bias)`` without the ``[N, V]`` logit matrix.

Rows are processed in chunks of ``chunk_size``; each chunk holds whole vocabulary rows, so every loss
works, whole-row ones included. Two modes (docs/linear.md, "The two modes"):

* **eager gradient** (a scalar loss that will be differentiated): the upstream gradient of each row is
  known before the loop (``1 / denominator`` for ``mean``, ``1`` for ``sum``), so each chunk's logit
  gradient is formed in the forward pass and folded at once into ``grad_e`` (its rows) and ``grad_c`` /
  ``grad_bias`` (accumulated in place). Three matrix products in all; backward only rescales by the
  upstream scalar, in place, and not at all when it is 1.
* **recompute** (``reduction='none'``, or an upstream gradient unknown up front): the forward keeps
  per-row losses only; backward recomputes each chunk's logits (four matrix products).

Without gradients the same loop runs once and keeps nothing but ``[N]`` values. Neither backward is
differentiable: under ``backward(create_graph=True)`` both raise by name rather than return a gradient
without its graph.

The parts, each in its module: :mod:`.options` is in ``crossent._engine.options`` (chunk size,
accumulator dtype, mode); :mod:`.selection` (which rows, in which chunks); :mod:`.chunks` (forming a
chunk's logits in full or half precision and running the kernel); :mod:`.kernels` (statistics,
losses and the factored gradient of one chunk); :mod:`.gradients` (``grad_e``, the ``grad_c``
accumulators, ``grad_bias``); :mod:`.sweep` (the loop).

Memory beyond inputs and gradients: one float32 ``[chunk, V]`` buffer, and ``[chunk, D]`` / ``[N]``
odds and ends; the generic and whole-row kernels add a few chunk-sized temporaries. bfloat16/float16
inputs keep the chunk in the input dtype instead, with a small float32 staging buffer for the kernel,
and accumulate ``grad_c`` transposed (``[D, V]``, float32 unless ``accum_dtype`` is the input dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._rows import Rows
from ...stats import ACC
from ..options import LinearCrossEntropyOptions
from ..plan import Plan, refuse_second_order
from ..reduction import mean_denominator, reduce
from .sweep import Job, Sweep


ENGINE = "row-chunked"
#: What to use instead under ``backward(create_graph=True)``.
INSTEAD = (
    "materialise the logits (e @ c.T + bias) and use crossent.cross_entropy, whose backward is "
    "differentiable under create_graph=True"
)


class _EagerGradient(torch.autograd.Function):
    """Scalar loss and the reported statistics (in ``job.report``'s order); gradients formed during the
    forward pass, rescaled in backward."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job, reduction: str):
        need = tuple(ctx.needs_input_grad[:3])
        if reduction == "mean":
            denominator = job.denominator if job.denominator is not None else mean_denominator(job.rows, ACC)
            scale = 1.0 / denominator.to(ACC)
        else:
            scale = torch.ones((), dtype=ACC, device=e.device)
        if job.row_weight is not None:
            scale = job.row_weight * scale  # each row's upstream gradient: its weight over the divisor
        sweep = Sweep(job, e, c, bias, need).run(scale)
        ctx.grads = sweep.grads()
        loss = reduce(job.weighted(sweep.per_row), job.rows, reduction, (e.shape[0],), ACC, job.denominator)
        return (loss, *_reported(ctx, job, sweep))

    @staticmethod
    def backward(ctx, grad, *_stats):
        refuse_second_order(ENGINE, INSTEAD)
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "linear_cross_entropy: the eager-gradient path can be differentiated once; for "
                "retain_graph=True use reduction='none' and reduce the result yourself"
            )
        # Scaling allocates nothing and is skipped when the upstream gradient is exactly 1 (loss.backward()).
        if grad.device.type != "cpu" or grad.item() != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(grad.to(g.dtype))
        return (*grads, None, None)


class _Recompute(torch.autograd.Function):
    """Per-row losses and the reported statistics; backward recomputes each chunk's logits (a stateful
    loss is not observed again)."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job):
        sweep = Sweep(job, e, c, bias).run()
        ctx.save_for_backward(e, c, bias)
        ctx.job = job
        return (sweep.per_row, *_reported(ctx, job, sweep))

    @staticmethod
    def backward(ctx, grad_rows, *_stats):
        refuse_second_order(ENGINE, INSTEAD)
        e, c, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        sweep = Sweep(ctx.job, e, c, bias, need).run(grad_rows)
        return (*sweep.grads(), None)


def _reported(ctx, job: Job, sweep: Sweep) -> tuple:
    """The reported statistics of the first sweep, in ``job.report``'s order, as outputs without gradients."""
    stats = tuple(sweep.stats[s] for s in job.report)
    ctx.mark_non_differentiable(*stats)
    return stats


def chunked_loss(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    plan: Plan,
    rows: Rows,
    *,
    reduction: str,
    options: LinearCrossEntropyOptions = LinearCrossEntropyOptions(),
    report: tuple = (),
    kernel=None,
    row_weight: Tensor | None = None,
    denominator: Tensor | None = None,
):
    """The loss of ``e @ c.T + bias`` (``e`` is ``[N, D]``) in float64, and reported statistics.

    Returns ``(loss, stats)``: ``loss`` is ``[N]`` for ``reduction='none'``, else a scalar; ``stats``
    maps each statistic of ``report`` (e.g. ``LSE``, ``ARGMAX``) to its ``[N]`` values. The chunk size,
    the ``grad_c`` accumulator's dtype and the mode come from ``options``; ``kernel(plan, report)``
    builds the chunk kernel (:class:`Job`).

    ``row_weight`` (``[N]``) multiplies each row's loss before the reduction; ``denominator`` (0-dim)
    replaces the ``mean`` divisor. Both keep the eager-gradient path: they only change the upstream
    gradient of each row, which is still known before the loop. A ``row_weight`` that requires grad
    takes the recompute path, where autograd differentiates the product.
    """
    if options.mode == "eager" and reduction == "none":
        raise ValueError("the eager-gradient mode needs reduction='mean' or 'sum'")
    tracked = [t for t in (e, c, bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    weight_grad = row_weight is not None and torch.is_grad_enabled() and row_weight.requires_grad
    accum_dtype = options.accumulator(e.dtype)
    summed = accum_dtype if needs_grad and c.requires_grad else None
    chunk_size = options.chunk_rows(c.shape[0], c.shape[1], e.dtype, summed)
    if not needs_grad and not weight_grad:
        job = Job(plan, rows, chunk_size, accum_dtype, report, kernel, row_weight, denominator)
        with torch.no_grad():
            sweep = Sweep(job, e, c, bias).run()
        return reduce(job.weighted(sweep.per_row), rows, reduction, (e.shape[0],), ACC, denominator), sweep.stats
    if reduction != "none" and options.mode != "recompute" and not weight_grad:
        job = Job(plan, rows, chunk_size, accum_dtype, report, kernel, row_weight, denominator)
        loss, *stats = _EagerGradient.apply(e, c, bias, job, reduction)
        return loss, dict(zip(job.report, stats))
    job = Job(plan, rows, chunk_size, accum_dtype, report, kernel)
    per_row, *stats = _Recompute.apply(e, c, bias, job)
    if row_weight is not None:
        per_row = per_row * row_weight.to(ACC)  # autograd carries the weights' gradient
    return reduce(per_row, rows, reduction, (e.shape[0],), ACC, denominator), dict(zip(job.report, stats))
