"""The engine half of ``crossent.linear_cross_entropy``, in eager mode and under ``torch.compile``.

:func:`crossent.linear_cross_entropy` checks its arguments and gathers the non-tensor ones in a
:class:`LinearCall`; :func:`prepare` builds the rows and the plan (causal shift, checks that read the
target, class weights) and :func:`engine_call` runs the row-chunked engine, whose autograd functions
give the gradients.

Under ``torch.compile`` the compiler cannot trace the engine (a Python loop over chunks with in-place
buffers), and needs not: ``crossent::linear_cross_entropy`` is a custom operator that does
:func:`engine_call`'s work eagerly inside the compiled graph, as PyTorch's own ``linear_cross_entropy``
runs its chunked kernel, so ``fullgraph=True`` holds and values and gradients are eager mode's. Its
arguments are the tensors of the call and the fields of the :class:`LinearCall` as plain values; a loss
object travels as an opaque :class:`crossent._loss_ref.LossRef`. A differentiated ``mean``/``sum``
returns ``grad_e``, ``grad_c`` and ``grad_bias`` from the forward operator and the backward scales
them; otherwise the backward is a second operator that recomputes the chunks. Neither consumes its
buffers, so ``retain_graph=True`` works. A stateful loss would observe its rows again in that
recompute, so it is refused under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as V
from ._engine.chunked import (
    chunked_loss,
    forward_with_gradients,
    gradient_scale,
    make_job,
    recomputed_gradients,
    row_values,
)
from ._engine.options import LinearCrossEntropyOptions, accumulation_dtype
from ._engine.plan import Plan
from ._engine.reduction import reduce
from ._loss_ref import NO_LOSS, LossRef, ref_of
from ._rows import Rows, index_rows
from .losses._build import build_loss
from .stats import ACC, ARGMAX, LSE
from .transforms import Softcap

__all__ = ["LinearCall", "prepare", "engine_call", "compiled_call"]


@dataclass(frozen=True)
class LinearCall:
    """The arguments of one :func:`linear_cross_entropy` call that are not tensors, checked.

    Everything the engine half of a call needs besides the tensors; :func:`engine_call` (eager) and
    the custom operator behind ``torch.compile`` (below) both start from it.
    """

    loss: object  # a registered name or a Loss
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    ignore_index: int
    shift: bool
    return_stats: bool
    options: LinearCrossEntropyOptions

    def build_loss(self):
        return build_loss(self.loss, label_smoothing=self.label_smoothing, z_loss=self.z_loss)

    @property
    def report(self) -> tuple:
        return (LSE, ARGMAX) if self.return_stats else ()


def prepare(e: Tensor, c: Tensor, target: Tensor, weight, extra, loss_obj, call: LinearCall) -> tuple[Plan, Rows]:
    """The plan and rows of a call: the causal shift, the checks that read the target, class weights.

    ``e`` is ``[N, D]``; ``target`` has the rows' shape (``N`` elements, int64).
    """
    num_classes = c.shape[0]
    rows_shape = tuple(target.shape)
    if call.shift:
        V.check_index_target(target[..., 1:], num_classes, call.ignore_index, target[..., 1:].shape)
        target, extra = _shifted(target, call.ignore_index, extra)
    else:
        V.check_index_target(target, num_classes, call.ignore_index, target.shape if target.dim() else (1,))
    call.options.accumulator(e.dtype)  # checks accum_dtype against the input dtype
    class_weight = V.check_class_weight(weight, num_classes, e.device, accumulation_dtype(e.dtype))
    extra = V.flatten_extra(extra, rows_shape)
    rows = index_rows(target.reshape(-1), num_classes, call.ignore_index, class_weight, extra)
    plan = Plan(loss_obj, rows, (Softcap(call.softcap),) if call.softcap is not None else ())
    return plan, rows


def engine_call(e: Tensor, c: Tensor, target: Tensor, bias, weight, extra, loss_obj, call: LinearCall):
    """The engine half of an eager call: ``(loss, lse, argmax)``, the loss float64 (``[N]`` for
    ``reduction='none'``), ``lse`` / ``argmax`` ``[N]`` when ``call.return_stats``."""
    plan, rows = prepare(e, c, target, weight, extra, loss_obj, call)
    if e.device.type == "meta":
        return _meta_call(e, c, bias, plan, rows, call)
    with torch.autocast(e.device.type, enabled=False):
        value, stats = chunked_loss(
            e, c, bias, plan, rows, reduction=call.reduction, options=call.options, report=call.report
        )
    return value, stats.get(LSE), stats.get(ARGMAX)


def _meta_call(e: Tensor, c: Tensor, bias, plan: Plan, rows: Rows, call: LinearCall):
    """'meta' tensors hold no data (deferred initialisation, shape propagation): the logits cost nothing,
    so the formula on them gives the shapes, dtypes and autograd graph."""
    logits = e @ c.T if bias is None else torch.addmm(bias, e, c.T)
    per_row = plan.autograd_row_losses(logits.float() if logits.dtype != torch.float64 else logits, rows)
    value = reduce(per_row.to(ACC), rows, call.reduction, (e.shape[0],), ACC)
    if not call.return_stats:
        return value, None, None
    return value, e.new_empty(e.shape[0], dtype=ACC), e.new_empty(e.shape[0], dtype=torch.long)


def _shifted(target: Tensor, ignore_index: int, extra: dict | None):
    """Targets (and extras) of the causal shift laid over all positions: row t predicts t + 1.

    The last position of each sequence gets ``ignore_index``, so ``e`` is used as it is (a view, never
    copied) and those rows cost nothing (ignored rows are skipped).
    """
    shifted = torch.full_like(target, ignore_index)
    shifted[..., :-1] = target[..., 1:]
    if extra:
        moved = {}
        for k, v in extra.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"extra[{k!r}] must be a tensor, got {type(v).__name__}")
            w = torch.zeros_like(v)
            d = target.dim() - 1
            w.narrow(d, 0, v.shape[d] - 1).copy_(v.narrow(d, 1, v.shape[d] - 1))
            moved[k] = w
        extra = moved
    return shifted, extra

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
