"""The row-chunked engine: any loss of ``z = e @ c.T (+ bias)`` without the ``[N, V]`` logit matrix.

Rows are processed in chunks of ``chunk_size``; each chunk holds whole vocabulary rows, so every loss
works, whole-row ones included. Two modes (DESIGN.md, section 2):

* **eager gradient** (a scalar loss that will be differentiated): the upstream gradient of each row is
  known before the loop (``1 / denominator`` for ``mean``, ``1`` for ``sum``), so each chunk's logit
  gradient is formed in the forward pass and folded at once into ``grad_e`` (its rows) and ``grad_c`` /
  ``grad_bias`` (accumulated in place). Three matrix products in all; backward only rescales by the
  upstream scalar, in place, and not at all when it is 1.
* **recompute** (``reduction='none'``, or an upstream gradient unknown up front): the forward keeps
  per-row losses only; backward recomputes each chunk's logits (four matrix products).

Without gradients the same loop runs once and keeps nothing but ``[N]`` values.

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
from torch.autograd.function import once_differentiable

from ..._rows import Rows
from ...stats import ACC
from ..options import LinearCrossEntropyOptions
from ..plan import Plan
from ..reduction import mean_denominator, reduce
from .sweep import Job, Sweep


class _EagerGradient(torch.autograd.Function):
    """Scalar loss; gradients formed during the forward pass, rescaled in backward."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job, reduction: str):
        need = tuple(ctx.needs_input_grad[:3])
        if reduction == "mean":
            scale = 1.0 / mean_denominator(job.rows, ACC)
        else:
            scale = torch.ones((), dtype=ACC, device=e.device)
        sweep = Sweep(job, e, c, bias, need).run(scale)
        ctx.grads = sweep.grads()
        return reduce(sweep.per_row, job.rows, reduction, (e.shape[0],), ACC)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
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
    """Per-row losses; backward recomputes each chunk's logits (a stateful loss is not observed again)."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job):
        sweep = Sweep(job, e, c, bias).run()
        ctx.save_for_backward(e, c, bias)
        ctx.job = job
        return sweep.per_row

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        e, c, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        sweep = Sweep(ctx.job, e, c, bias, need).run(grad_rows)
        return (*sweep.grads(), None)


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
    wrap=None,
):
    """The loss of ``e @ c.T + bias`` (``e`` is ``[N, D]``) in float64, and reported statistics.

    Returns ``(loss, stats)``: ``loss`` is ``[N]`` for ``reduction='none'``, else a scalar; ``stats``
    maps each statistic of ``report`` (e.g. ``LSE``, ``ARGMAX``) to its ``[N]`` values. The chunk size,
    the ``grad_c`` accumulator's dtype and the mode come from ``options``; ``wrap`` (optional,
    ``kernel -> kernel``) wraps the plan's chunk kernel (:class:`Job`).
    """
    if options.mode == "eager" and reduction == "none":
        raise ValueError("the eager-gradient mode needs reduction='mean' or 'sum'")
    tracked = [t for t in (e, c, bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    accum_dtype = options.accumulator(e.dtype)
    summed = accum_dtype if needs_grad and c.requires_grad else None
    chunk_size = options.chunk_rows(c.shape[0], c.shape[1], e.dtype, summed)
    job = Job(plan, rows, chunk_size, accum_dtype, report, wrap)
    if not needs_grad:
        with torch.no_grad():
            sweep = Sweep(job, e, c, bias).run()
        return reduce(sweep.per_row, rows, reduction, (e.shape[0],), ACC), sweep.stats
    if reduction != "none" and options.mode != "recompute":
        loss = _EagerGradient.apply(e, c, bias, job, reduction)
    else:
        loss = reduce(_Recompute.apply(e, c, bias, job), rows, reduction, (e.shape[0],), ACC)
    return loss, job.stat_values
