"""``linear_cross_entropy`` under ``torch.compile``: the row-chunked engine as one custom operator.

The compiler cannot trace the engine (a Python loop over chunks with in-place buffers), and needs
not: ``crossent::linear_cross_entropy`` runs it eagerly inside the compiled graph, as PyTorch's own
``linear_cross_entropy`` runs its chunked kernel, so ``fullgraph=True`` holds and the values and
gradients are those of eager mode. The operator's arguments are the tensors of the call and its
checked non-tensor arguments (:class:`crossent.linear.LinearCall`, spelled out as plain values);
a loss object travels as an opaque :class:`crossent._loss_ref.LossRef`.

Gradients: a differentiated ``mean``/``sum`` (the eager-gradient mode) returns ``grad_e``, ``grad_c``
and ``grad_bias`` from the forward pass and the backward scales them; otherwise the backward is a
second operator that recomputes the chunks, as the eager engine does. Neither consumes its buffers,
so ``retain_graph=True`` works here. A stateful loss would observe its rows again in that recompute,
so it is refused under ``torch.compile``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._engine.chunked import forward_with_gradients, gradient_scale, make_job, recomputed_gradients, row_values
from ._engine.options import LinearCrossEntropyOptions
from ._engine.reduction import reduce
from ._loss_ref import NO_LOSS, LossRef, ref_of
from .linear import LinearCall, prepare
from .stats import ACC, ARGMAX, LSE

__all__ = ["compiled_call"]


def compiled_call(e: Tensor, c: Tensor, target: Tensor, bias, weight, extra, loss_obj, call: LinearCall):
    """What :func:`crossent.linear.engine_call` returns, through the custom operator (traceable)."""
    if LossRef is None:
        raise RuntimeError(
            "linear_cross_entropy under torch.compile needs a PyTorch whose custom operators take opaque objects"
        )
    if loss_obj.stateful:
        raise ValueError(
            f"linear_cross_entropy under torch.compile: the loss {loss_obj!r} keeps state, which the compiled "
            "call would update twice; call it outside the compiled region (torch.compiler.disable)"
        )
    if isinstance(call.loss, str):
        name, ref = call.loss, NO_LOSS
    else:
        name, ref = "", ref_of(call.loss)
        if ref is None:
            raise ValueError(
                f"linear_cross_entropy under torch.compile: the loss object {call.loss!r} was built inside the "
                "compiled code; build it outside (e.g. in the module's __init__) or give the loss by name"
            )
    keys = sorted(extra) if extra else []
    if any("\n" in k for k in keys):
        raise ValueError(f"extra keys must not contain a newline, got {keys!r}")
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (e, c, bias)]
    o = call.options
    out = _linear_cross_entropy(
        e, c, target, bias, weight, [extra[k] for k in keys], "\n".join(keys), name, ref, call.label_smoothing,
        call.z_loss, call.softcap, call.reduction, call.ignore_index, call.shift, call.return_stats, o.backend,
        o.chunk_size, o.accum_dtype, o.mode, need,
    )  # fmt: skip
    value, lse, argmax = out[:3]
    return value, (lse if call.return_stats else None), (argmax if call.return_stats else None)


def _call(loss_name, loss_ref, label_smoothing, z_loss, softcap, reduction, ignore_index, shift, return_stats,
          backend, chunk_size, accum_dtype, mode) -> LinearCall:  # fmt: skip
    options = LinearCrossEntropyOptions(backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype, mode=mode)
    loss = loss_ref.loss if loss_ref.loss is not None else loss_name
    return LinearCall(loss, label_smoothing, z_loss, softcap, reduction, ignore_index, shift, return_stats, options)


def _extra(keys: str, values: list) -> dict:
    """The ``extra`` dict from its keys (one string, newline-separated: an operator takes no list of
    strings) and values."""
    return dict(zip(keys.split("\n"), values)) if keys else {}


def _eager_gradient(reduction: str, mode: str, need) -> bool:
    return reduction != "none" and mode != "recompute" and any(need)


@contextlib.contextmanager
def _with_autograd():
    """Autograd inside an operator's implementation, which PyTorch runs below it: the engine takes the
    coefficients ``dL/dS`` by autograd on the ``[N]`` formula (and whole-row losses on the chunk)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)  # removes the functionality, for every backend
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


if LossRef is not None:

    @torch.library.custom_op("crossent::linear_cross_entropy", mutates_args=())
    def _linear_cross_entropy(
        e: Tensor,
        c: Tensor,
        target: Tensor,
        bias: Tensor | None,
        weight: Tensor | None,
        extra: list[Tensor],
        extra_keys: str,
        loss_name: str,
        loss_ref: LossRef,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        reduction: str,
        ignore_index: int,
        shift: bool,
        return_stats: bool,
        backend: str,
        chunk_size: int | None,
        accum_dtype: torch.dtype | None,
        mode: str,
        need: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(loss, lse, argmax, grad_e, grad_c, grad_bias)``: the float64 loss (``[N]`` or a scalar);
        ``lse`` / ``argmax`` empty unless ``return_stats``; the gradients empty unless formed here."""
        call = _call(loss_name, loss_ref, label_smoothing, z_loss, softcap, reduction, ignore_index, shift,
                     return_stats, backend, chunk_size, accum_dtype, mode)  # fmt: skip
        with _with_autograd():
            plan, rows = prepare(e, c, target, weight, _extra(extra_keys, extra), call.build_loss(), call)
            job = make_job(e, c, plan, rows, call.options, call.report, c_grad=need[1])
            grads = (None, None, None)
            if _eager_gradient(reduction, mode, need):
                value, grads = forward_with_gradients(e, c, bias, job, reduction, need)
            else:
                value = reduce(row_values(e, c, bias, job), rows, reduction, (e.shape[0],), ACC)
        stats = job.stat_values
        lse, argmax = (stats[LSE], stats[ARGMAX]) if return_stats else (_empty(value), _empty(target))
        return (value, lse, argmax, *(g if g is not None else _empty(e) for g in grads))

    @_linear_cross_entropy.register_fake
    def _(e, c, target, bias, weight, extra, extra_keys, loss_name, loss_ref, label_smoothing, z_loss, softcap,
          reduction, ignore_index, shift, return_stats, backend, chunk_size, accum_dtype, mode, need):  # fmt: skip
        n = e.shape[0]
        value = e.new_empty((n,) if reduction == "none" else (), dtype=ACC)
        lse = e.new_empty((n,) if return_stats else (0,), dtype=ACC)
        argmax = target.new_empty((n,) if return_stats else (0,))
        formed = _eager_gradient(reduction, mode, need)
        grads = [
            torch.empty_like(t) if formed and wanted else _empty(e) for t, wanted in zip((e, c, bias), need)
        ]  # bias is None only when need[2] is False
        return (value, lse, argmax, *grads)

    @torch.library.custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
    def _linear_cross_entropy_backward(
        grad: Tensor,
        e: Tensor,
        c: Tensor,
        target: Tensor,
        bias: Tensor | None,
        weight: Tensor | None,
        extra: list[Tensor],
        extra_keys: str,
        loss_name: str,
        loss_ref: LossRef,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        reduction: str,
        ignore_index: int,
        shift: bool,
        backend: str,
        chunk_size: int | None,
        accum_dtype: torch.dtype | None,
        mode: str,
        need: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad_e, grad_c, grad_bias)`` (empty where not needed), recomputing every chunk."""
        call = _call(loss_name, loss_ref, label_smoothing, z_loss, softcap, reduction, ignore_index, shift,
                     False, backend, chunk_size, accum_dtype, mode)  # fmt: skip
        with _with_autograd():
            plan, rows = prepare(e, c, target, weight, _extra(extra_keys, extra), call.build_loss(), call)
            job = make_job(e, c, plan, rows, call.options, c_grad=need[1])
            grad_rows = grad if reduction == "none" else grad.to(ACC) * gradient_scale(job, reduction, e.device)
            grads = recomputed_gradients(e, c, bias, job, grad_rows, need)
        return tuple(g if g is not None else _empty(e) for g in grads)

    @_linear_cross_entropy_backward.register_fake
    def _(grad, e, c, target, bias, weight, extra, extra_keys, loss_name, loss_ref, label_smoothing, z_loss,
          softcap, reduction, ignore_index, shift, backend, chunk_size, accum_dtype, mode, need):  # fmt: skip
        return tuple(torch.empty_like(t) if wanted else _empty(e) for t, wanted in zip((e, c, bias), need))

    def _setup_context(ctx, inputs, output):
        e, c, target, bias, weight, extra, *static = inputs
        (extra_keys, loss_name, loss_ref, label_smoothing, z_loss, softcap, reduction, ignore_index, shift,
         _return_stats, backend, chunk_size, accum_dtype, mode, need) = static  # fmt: skip
        ctx.need, ctx.num_extra = need, len(extra)
        ctx.formed = _eager_gradient(reduction, mode, need)
        if ctx.formed:
            ctx.save_for_backward(*output[3:])
        else:
            ctx.save_for_backward(e, c, target, bias, weight, *extra)
            ctx.static = (extra_keys, loss_name, loss_ref, label_smoothing, z_loss, softcap, reduction, ignore_index,
                          shift, backend, chunk_size, accum_dtype, mode, need)  # fmt: skip

    def _backward(ctx, grad, *_unused):
        if ctx.formed:
            grads = [g * grad.to(g.dtype) if wanted else None for g, wanted in zip(ctx.saved_tensors, ctx.need)]
        else:
            e, c, target, bias, weight, *extra = ctx.saved_tensors
            out = _linear_cross_entropy_backward(grad, e, c, target, bias, weight, extra, *ctx.static)
            grads = [g if wanted else None for g, wanted in zip(out, ctx.need)]
        # One entry per operator input; ``extra`` (a list) gets a list.
        return (grads[0], grads[1], None, grads[2], None, [None] * ctx.num_extra) + (None,) * 15

    _linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
