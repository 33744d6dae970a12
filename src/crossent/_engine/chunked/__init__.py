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


def gradient_scale(job: Job, reduction: str, device) -> Tensor:
    """The upstream gradient of every row of a reduced loss: ``1 / denominator`` (mean) or 1 (sum)."""
    if reduction == "mean":
        return 1.0 / mean_denominator(job.rows, ACC)
    return torch.ones((), dtype=ACC, device=device)


def forward_with_gradients(e: Tensor, c: Tensor, bias: Tensor | None, job: Job, reduction: str, need) -> tuple:
    """A reduced loss and ``(grad_e, grad_c, grad_bias)`` for an upstream gradient of 1, in one sweep."""
    sweep = Sweep(job, e, c, bias, tuple(need)).run(gradient_scale(job, reduction, e.device))
    return reduce(sweep.per_row, job.rows, reduction, (e.shape[0],), ACC), sweep.grads()


def recomputed_gradients(e: Tensor, c: Tensor, bias: Tensor | None, job: Job, grad_rows: Tensor, need) -> tuple:
    """``(grad_e, grad_c, grad_bias)`` for per-row upstream gradients ``grad_rows`` (``[N]`` or 0-dim)."""
    return Sweep(job, e, c, bias, tuple(need)).run(grad_rows).grads()


def row_values(e: Tensor, c: Tensor, bias: Tensor | None, job: Job) -> Tensor:
    """``[N]`` float64 per-row losses without gradients (reported statistics land on ``job``)."""
    with torch.no_grad():
        return Sweep(job, e, c, bias).run().per_row


def make_job(
    e: Tensor, c: Tensor, plan: Plan, rows: Rows, options: LinearCrossEntropyOptions, report=(), *, c_grad: bool
) -> Job:
    """The untracked half of a call; ``c_grad``: whether ``c``'s gradient is summed (it sizes the chunk)."""
    accum_dtype = options.accumulator(e.dtype)
    chunk_size = options.chunk_rows(c.shape[0], c.shape[1], e.dtype, accum_dtype if c_grad else None)
    return Job(plan, rows, chunk_size, accum_dtype, report)


class _EagerGradient(torch.autograd.Function):
    """Scalar loss; gradients formed during the forward pass, rescaled in backward."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job, reduction: str):
        loss, ctx.grads = forward_with_gradients(e, c, bias, job, reduction, ctx.needs_input_grad[:3])
        return loss

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
        per_row = row_values(e, c, bias, job)
        ctx.save_for_backward(e, c, bias)
        ctx.job = job
        return per_row

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        e, c, bias = ctx.saved_tensors
        return (*recomputed_gradients(e, c, bias, ctx.job, grad_rows, ctx.needs_input_grad[:3]), None)


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
):
    """The loss of ``e @ c.T + bias`` (``e`` is ``[N, D]``) in float64, and reported statistics.

    Returns ``(loss, stats)``: ``loss`` is ``[N]`` for ``reduction='none'``, else a scalar; ``stats``
    maps each statistic of ``report`` (e.g. ``LSE``, ``ARGMAX``) to its ``[N]`` values. The chunk size,
    the ``grad_c`` accumulator's dtype and the mode come from ``options``.
    """
    if options.mode == "eager" and reduction == "none":
        raise ValueError("the eager-gradient mode needs reduction='mean' or 'sum'")
    tracked = [t for t in (e, c, bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    job = make_job(e, c, plan, rows, options, report, c_grad=needs_grad and c.requires_grad)
    if not needs_grad:
        return reduce(row_values(e, c, bias, job), rows, reduction, (e.shape[0],), ACC), job.stat_values
    if reduction != "none" and options.mode != "recompute":
        loss = _EagerGradient.apply(e, c, bias, job, reduction)
    else:
        loss = reduce(_Recompute.apply(e, c, bias, job), rows, reduction, (e.shape[0],), ACC)
    return loss, job.stat_values
