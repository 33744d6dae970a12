"""The one call path of the fused linear loss, for every entry point that runs it.

:func:`crossent.linear_cross_entropy` (plain tensors, or a DTensor classifier once unwrapped) and
:func:`crossent.distributed.vocab_parallel_linear_cross_entropy` take the same steps:
:func:`linear_call` checks the arguments and gathers the non-tensor ones in a :class:`LinearCall`;
:func:`linear_inputs` casts the tensors to the dtype the products run in; :func:`prepare` builds the
rows and the plan (the causal shift, the checks that read the target, class and sample weights); an
engine runs; :func:`finish` gives the result its shape, dtype and :class:`LinearStats`. The engine of
a plain call is the one the options choose (row-chunked or Triton), run by :func:`engine_call`; a
vocabulary-parallel call runs the fused vocabulary-parallel engine on the same plan.

Under ``torch.compile`` the compiler cannot trace an engine (a Python loop over chunks with in-place
buffers, or GPU kernels), and needs not: ``crossent::linear_cross_entropy`` is a custom operator that
runs :func:`engine_call` eagerly inside the compiled graph, as PyTorch's own ``linear_cross_entropy``
runs its chunked kernel, so ``fullgraph=True`` holds and the values and gradients are eager mode's.
Its arguments are the tensors of the call and the fields of the :class:`LinearCall` as plain values,
except the float hyperparameters that a schedule may change every step (``label_smoothing``,
``z_loss``, ``softcap``, ``temperature``): they travel as one tensor, so that a new value does not recompile the graph;
a loss object travels as an opaque :class:`crossent._loss_ref.LossRef`. A differentiated ``mean`` /
``sum`` (the engines' eager-gradient mode) returns the gradients from the forward operator and the
backward scales them; otherwise a second operator runs :func:`engine_call` again with the upstream
gradient (one more forward sweep than eager mode). Neither consumes its buffers, so
``retain_graph=True`` works. A stateful loss would observe its rows again in that second run, so it is
refused under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validation as V
from ._engine.backend import linear_engine
from ._engine.options import LinearCrossEntropyOptions
from ._engine.plan import Plan
from ._engine.reduction import reduce
from ._loss_ref import NO_LOSS, LossRef, ref_of
from ._rows import Rows, as_float, compute_dtype, index_rows
from .losses._build import build_loss
from .stats import ACC, ARGMAX, LSE, P_DOT_Z
from .transforms import head_transforms

__all__ = [
    "LinearCall",
    "LinearStats",
    "STAT_SOURCES",
    "check_normalizer",
    "check_target",
    "compiled_call",
    "engine_call",
    "finish",
    "linear_call",
    "linear_inputs",
    "prepare",
    "resolve_options",
    "shifted",
]

#: What each name of ``return_stats`` makes the engine compute (the entropy is ``lse - p_dot_z``).
STAT_SOURCES = {"lse": (LSE,), "argmax": (ARGMAX,), "entropy": (LSE, P_DOT_Z)}
#: The statistics an engine may report, in the operator's output order.
_REPORTABLE = (LSE, ARGMAX, P_DOT_Z)

#: The key under which ``sample_weight`` rides along the causal shift with the extras.
_SAMPLE_WEIGHT = "__sample_weight__"


@dataclass(frozen=True)
class LinearCall:
    """The arguments of one fused linear call that are not tensors, checked (:func:`linear_call`).

    Everything the engine half of a call needs besides the tensors; :func:`engine_call` (eager), the
    custom operator behind ``torch.compile`` (below) and the vocabulary-parallel entry point all start
    from it. A new option of ``linear_cross_entropy`` is a field here and an argument of the operator.
    """

    loss: object  # a registered name or a Loss
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    ignore_index: int
    shift: bool
    stats: tuple  # names among STAT_SOURCES
    options: LinearCrossEntropyOptions
    temperature: float = 1.0  # the logits are divided by it after the softcap

    def build_loss(self):
        return build_loss(self.loss, label_smoothing=self.label_smoothing, z_loss=self.z_loss)

    @property
    def report(self) -> tuple:
        """The statistics the engine reports for :attr:`stats`."""
        return tuple(dict.fromkeys(s for name in self.stats for s in STAT_SOURCES[name]))


class LinearStats(NamedTuple):
    """Per-row by-products of :func:`crossent.linear_cross_entropy` (``return_stats``), shaped like the loss rows.

    ``lse``: log-sum-exp of the (transformed) logits, float32. ``argmax``: the predicted token, the
    index of the largest logit (int64), so token accuracy is ``(argmax == target)`` over counted rows,
    without any logits. ``entropy``: ``-sum_j p_j log p_j`` of the softmax, float32. A field that was
    not asked for is ``None``. :attr:`z_loss` is the z-loss term ``lse ** 2``.
    """

    lse: Tensor | None
    argmax: Tensor | None
    entropy: Tensor | None = None

    @property
    def z_loss(self) -> Tensor:
        """``lse ** 2`` per row: the term that ``z_loss=`` weighs (needs ``lse``)."""
        if self.lse is None:
            raise ValueError("z_loss is lse ** 2: ask for 'lse' in return_stats")
        return self.lse.square()


def _stat_names(return_stats) -> tuple[str, ...]:
    """The fields of :class:`LinearStats` that ``return_stats`` asks for."""
    if return_stats is True:
        return ("lse", "argmax")
    if return_stats is False or return_stats is None:
        return ()
    names = (return_stats,) if isinstance(return_stats, str) else tuple(return_stats)
    unknown = [n for n in names if n not in STAT_SOURCES]
    if unknown or not names:
        raise ValueError(f"return_stats must be a bool or names among {tuple(STAT_SOURCES)}, got {return_stats!r}")
    return names


def resolve_options(
    options: LinearCrossEntropyOptions | None, *, backend: str = "auto", chunk_size=None, accum_dtype=None
) -> LinearCrossEntropyOptions:
    """``options`` with the keyword shortcuts applied; a shortcut that contradicts ``options`` is an error."""
    if options is None:
        return LinearCrossEntropyOptions(backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)
    if not isinstance(options, LinearCrossEntropyOptions):
        raise TypeError(f"options must be a crossent.LinearCrossEntropyOptions, got {type(options).__name__}")
    given = {"backend": (backend, "auto"), "chunk_size": (chunk_size, None), "accum_dtype": (accum_dtype, None)}
    changes = {}
    for name, (value, default) in given.items():
        if value != default:
            if getattr(options, name) not in (default, value):
                raise ValueError(f"{name}={value!r} contradicts options.{name}={getattr(options, name)!r}; give one")
            changes[name] = value
    return options.replace(**changes) if changes else options


def _check_tensors(e, c, target, bias, allow_no_classes: bool = False, shift: bool = False) -> None:
    """The shapes, dtypes and devices of ``e``, ``c``, ``target`` and ``bias`` (``c`` may have no rows
    where ``allow_no_classes``: a rank's shard of the vocabulary)."""
    for name, t in (("e", e), ("c", c), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if not e.is_floating_point() or not c.is_floating_point():
        raise TypeError(f"e and c must be floating point, got {e.dtype} and {c.dtype}")
    if e.dim() < 1:
        raise ValueError("e must have shape [..., D]")
    if c.dim() != 2:
        raise ValueError(f"c must be a [V, D] matrix (an nn.Linear weight), got shape {tuple(c.shape)}")
    if c.shape[1] != e.shape[-1]:
        raise ValueError(f"e has {e.shape[-1]} features but c has {c.shape[1]} (shapes {tuple(e.shape)}, {tuple(c.shape)})")
    if c.shape[0] == 0 and not allow_no_classes:
        raise ValueError("c must have at least one class (row)")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices, got {target.dtype}; for class-probability targets "
            "materialise the logits and use crossent.cross_entropy"
        )
    if shift and (target.dim() == 0 or target.shape[-1] == 0):
        raise ValueError(
            f"shift=True needs a sequence dimension (target [..., T] with T >= 1), got shape {tuple(target.shape)}"
        )
    if tuple(target.shape) != tuple(e.shape[:-1]):
        if shift and e.dim() >= 2 and tuple(target.shape[:-1]) == tuple(e.shape[:-2]):
            raise ValueError(
                f"shift=True takes e and target over the same {e.shape[-2]} positions (it drops the last row "
                f"of e and the first target itself), got target of shape {tuple(target.shape)} for e of shape "
                f"{tuple(e.shape)}; for targets already shifted (target[..., t] is the token after position t) "
                "pass shift=False with e cut to the same positions"
            )
        raise ValueError(f"target must have shape {tuple(e.shape[:-1])} (e without its last dim), got {tuple(target.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c.shape[0]):
        raise ValueError(f"bias must have shape [{c.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("c", c), ("target", target)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != e.device:
            raise ValueError(f"{name} is on {t.device} but e is on {e.device}")


def check_normalizer(normalizer, reduction: str, device) -> Tensor | None:
    """The ``mean`` divisor as a float64 0-dim tensor on ``device``; its value is checked where that costs
    no device synchronisation (numbers, CPU tensors)."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the divisor of reduction='mean'; it cannot be used with reduction={reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.requires_grad:
            raise ValueError("normalizer is a constant (a count of rows); it must not require grad")
        value = normalizer.reshape(()).to(device=device, dtype=torch.float64)
        V.data_check(~(value > 0), "normalizer must be > 0", lambda: f"normalizer must be > 0, got {value.item():g}")
        return value
    return torch.tensor(V.positive("normalizer", normalizer), dtype=torch.float64, device=device)


def linear_call(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    bias: Tensor | None,
    *,
    loss,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    ignore_index: int | None,
    shift: bool,
    return_stats,
    options: LinearCrossEntropyOptions,
    allow_no_classes: bool = False,
    temperature: float = 1.0,
) -> LinearCall:
    """The checked :class:`LinearCall` of an entry point's arguments; raises on the first mistake.

    ``options`` has its shortcuts applied (:func:`resolve_options`); ``ignore_index=None`` is -100, as
    in ``torch.nn.functional.linear_cross_entropy``.
    """
    V.check_reduction(reduction)
    _check_tensors(e, c, target, bias, allow_no_classes=allow_no_classes, shift=shift)
    return LinearCall(
        loss=loss,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=V.check_softcap(softcap),
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else V.check_ignore_index(ignore_index),
        shift=bool(shift),
        stats=_stat_names(return_stats),
        options=options,
        temperature=V.check_temperature(temperature),
    )


def linear_inputs(e: Tensor, c: Tensor, bias: Tensor | None):
    """``(e, c, bias, out_dtype)``: the inputs in the dtype the products run in, and the loss's dtype
    (float32 for float32 and half-precision inputs, float64 for float64)."""
    out_dtype = compute_dtype(e.dtype)
    device_type = e.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        # Match ``autocast(e @ c.T)`` followed by a float32 loss, as the naive path computes it.
        dtype = torch.get_autocast_dtype(device_type)
        e, c = e.to(dtype), c.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        out_dtype = torch.float32
    if c.dtype != e.dtype or (bias is not None and bias.dtype != e.dtype):
        raise TypeError(
            f"e, c and bias must share one dtype, got {e.dtype}, {c.dtype}"
            + (f", {bias.dtype}" if bias is not None else "")
        )
    return e, c, bias, out_dtype


def check_target(target: Tensor, num_classes: int, ignore_index: int, shift: bool) -> None:
    if shift:
        V.check_index_target(target[..., 1:], num_classes, ignore_index, target[..., 1:].shape)
    else:
        V.check_index_target(target, num_classes, ignore_index, target.shape if target.dim() else (1,))


def shifted(target: Tensor, ignore_index: int, extra: dict | None):
    """Targets (and extras) of the causal shift laid over all positions: row t predicts t + 1.

    The last position of each sequence gets ``ignore_index``, so ``e`` is used as it is (a view, never
    copied) and those rows cost nothing (ignored rows are skipped). Extras move with the targets and
    are 0 at the last position.
    """
    if target.dim() == 0 or target.shape[-1] == 0:
        raise ValueError("shift=True needs a sequence dimension (target [..., T] with T >= 1)")
    moved_target = torch.full_like(target, ignore_index)
    moved_target[..., :-1] = target[..., 1:]
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
    return moved_target, extra


def prepare(
    e: Tensor, c: Tensor, target: Tensor, weight, extra, sample_weight, loss_obj, call: LinearCall, *, num_classes=None
):
    """``(plan, rows, row_weight)`` of a call: the causal shift, the checks that read the target, class
    weights; ``row_weight`` is ``sample_weight`` shifted with the targets and flat (or ``None``).

    ``e`` is ``[N, D]``; ``target`` has the rows' shape (``N`` elements, int64). ``num_classes``: the
    whole vocabulary's size where ``c`` holds a rank's shard of it (default: ``c``'s rows).
    """
    num_classes = c.shape[0] if num_classes is None else num_classes
    rows_shape = tuple(target.shape)
    check_target(target, num_classes, call.ignore_index, call.shift)
    if call.shift:
        if sample_weight is not None:
            extra = {**(extra or {}), _SAMPLE_WEIGHT: sample_weight}
        target, extra = shifted(target, call.ignore_index, extra)
        if sample_weight is not None:
            sample_weight = extra.pop(_SAMPLE_WEIGHT)
    call.options.accumulator(e.dtype)  # checks accum_dtype against the input dtype
    class_weight = V.check_class_weight(weight, num_classes, e.device, compute_dtype(e.dtype))
    extra = V.flatten_extra(extra, rows_shape)
    rows = index_rows(target.reshape(-1), num_classes, call.ignore_index, class_weight, extra)
    plan = Plan(loss_obj, rows, head_transforms(call.softcap, call.temperature))
    return plan, rows, None if sample_weight is None else sample_weight.reshape(-1)


def engine_call(e: Tensor, c: Tensor, bias, target, weight, extra, sample_weight, denominator, loss_obj, call):
    """The engine half of a call: ``(loss, stats)``, the loss in float64 (``[N]`` for
    ``reduction='none'``), ``stats`` the ``[N]`` values of :attr:`LinearCall.report`."""
    plan, rows, row_weight = prepare(e, c, target, weight, extra, sample_weight, loss_obj, call)
    engine = linear_engine(call.options, e, plan)  # on 'meta' tensors too: it checks an explicit backend
    if e.device.type == "meta":
        return _meta_call(e, c, bias, plan, rows, row_weight, denominator, call)
    with torch.autocast(e.device.type, enabled=False):
        return engine(
            e, c, bias, plan, rows, reduction=call.reduction, options=call.options, report=call.report,
            row_weight=row_weight, denominator=denominator,
        )  # fmt: skip


def _meta_call(e: Tensor, c: Tensor, bias, plan: Plan, rows: Rows, row_weight, denominator, call: LinearCall):
    """'meta' tensors hold no data (deferred initialisation, shape propagation): the logits cost nothing,
    so the formula on them gives the shapes, dtypes and autograd graph."""
    logits = e @ c.T if bias is None else torch.addmm(bias, e, c.T)
    per_row = plan.autograd_row_losses(as_float(logits), rows).to(ACC)
    if row_weight is not None:
        per_row = per_row * row_weight.to(ACC)
    value = reduce(per_row, rows, call.reduction, (e.shape[0],), ACC, denominator)
    stats = {s: e.new_empty(e.shape[0], dtype=torch.long if s is ARGMAX else ACC) for s in call.report}
    return value, stats


def finish(value: Tensor, stats: dict, rows_shape, call: LinearCall, out_dtype) -> Tensor | tuple[Tensor, LinearStats]:
    """An engine's float64 result as the entry points return it: per-row shape, dtype, the asked-for stats."""

    def per_row(t: Tensor) -> Tensor:
        t = t.reshape(rows_shape)
        return t[..., :-1] if call.shift else t

    value = (per_row(value) if call.reduction == "none" else value).to(out_dtype)
    if not call.stats:
        return value
    fields = {
        "lse": lambda: per_row(stats[LSE]).float(),
        "argmax": lambda: per_row(stats[ARGMAX]),
        "entropy": lambda: per_row(stats[LSE] - stats[P_DOT_Z]).float(),
    }
    return value, LinearStats(**{name: fields[name]() if name in call.stats else None for name in fields})


# -- under torch.compile: the custom operator ---------------------------------------------------------

#: The fields of LinearCrossEntropyOptions, each an argument of the operator (checked below).
_OPTION_FIELDS = ("backend", "chunk_size", "accum_dtype", "mode", "filter_eps")


def compiled_call(e: Tensor, c: Tensor, bias, target, weight, extra, sample_weight, denominator, loss_obj, call):
    """What :func:`engine_call` returns, through the custom operator (traceable by ``torch.compile``)."""
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
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (e, c, bias, sample_weight)]
    o = call.options
    out = _linear_cross_entropy(
        e, c, bias, target, weight, [extra[k] for k in keys], "\n".join(keys), sample_weight, denominator,
        _hyperparameters(call), name, ref, call.reduction, call.ignore_index, call.shift, ",".join(call.stats),
        o.backend, o.chunk_size, o.accum_dtype, o.mode, o.filter_eps, need,
    )  # fmt: skip
    stats = dict(zip(_REPORTABLE, out[1:4]))
    return out[0], {s: stats[s] for s in call.report}


def _hyperparameters(call: LinearCall) -> Tensor:
    """``label_smoothing``, ``z_loss``, ``softcap`` (0: none) and ``temperature`` as one float64 tensor of the graph.

    These may change every step (a schedule). A float argument of a custom operator is a constant of
    the compiled graph, compiled anew for every value; a tensor's value is not. Each value is added to
    a zero tensor because a float that ``torch.compile`` traces symbolically stays symbolic through
    tensor arithmetic, where ``torch.tensor(value)`` would specialise the graph to it.
    """
    zero = torch.zeros((), dtype=torch.float64)
    softcap = 0.0 if call.softcap is None else call.softcap
    return torch.stack([zero + call.label_smoothing, zero + call.z_loss, zero + softcap, zero + call.temperature])


def _call(hyperparameters: Tensor, loss_name, loss_ref, reduction, ignore_index, shift, stats,
          backend, chunk_size, accum_dtype, mode, filter_eps) -> LinearCall:  # fmt: skip
    options = LinearCrossEntropyOptions(
        backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype, mode=mode, filter_eps=filter_eps
    )
    loss = loss_ref.loss if loss_ref.loss is not None else loss_name
    names = tuple(stats.split(",")) if stats else ()
    label_smoothing, z_loss, softcap, temperature = hyperparameters.tolist()
    softcap = softcap if softcap else None
    return LinearCall(loss, label_smoothing, z_loss, softcap, reduction, ignore_index, shift, names, options, temperature)


def _extra(keys: str, values: list) -> dict | None:
    """The ``extra`` dict from its keys (one string, newline-separated: an operator takes no list of
    strings) and values."""
    return dict(zip(keys.split("\n"), values)) if keys else None


def _gradients_in_forward(reduction: str, mode: str, need) -> bool:
    """The engines' eager-gradient mode: a differentiated mean or sum of constant-weighted rows."""
    return reduction != "none" and mode != "recompute" and any(need[:3]) and not need[3]


@contextlib.contextmanager
def _with_autograd():
    """Autograd inside an operator's implementation, which PyTorch runs below it: the engines are
    autograd functions, and take the coefficients ``dL/dS`` by autograd on the ``[N]`` formula."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)  # removes the functionality, for every backend
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _run(tensors: tuple, extra: list, extra_keys: str, static: tuple, need, upstream=None):
    """:func:`engine_call` on detached leaves: ``(value, stats, grads)``, the gradients of the leaves in
    ``need`` for the upstream gradient ``upstream`` (``None``: 1, or no gradient when none is needed)."""
    e, c, bias, target, weight, sample_weight, denominator, hyperparameters = tensors
    call = _call(hyperparameters, *static)
    leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((e, c, bias, sample_weight), need)]
    grads = [None] * 4
    with _with_autograd():
        value, stats = engine_call(
            leaves[0], leaves[1], leaves[2], target, weight, _extra(extra_keys, extra), leaves[3], denominator,
            call.build_loss(), call,
        )  # fmt: skip
        wanted = [t for t, n in zip(leaves, need) if n]
        if wanted:
            up = torch.ones_like(value) if upstream is None else upstream.to(value.dtype)
            found = iter(torch.autograd.grad(value, wanted, up))
            grads = [next(found) if n else None for n in need]
    return value.detach(), stats, grads


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


if LossRef is not None:
    # Every option reaches the operator: a field added to the options must be added here too.
    assert tuple(f.name for f in dataclasses.fields(LinearCrossEntropyOptions)) == _OPTION_FIELDS

    @torch.library.custom_op("crossent::linear_cross_entropy", mutates_args=())
    def _linear_cross_entropy(
        e: Tensor,
        c: Tensor,
        bias: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        extra: list[Tensor],
        extra_keys: str,
        sample_weight: Tensor | None,
        denominator: Tensor | None,
        hyperparameters: Tensor,
        loss_name: str,
        loss_ref: LossRef,
        reduction: str,
        ignore_index: int,
        shift: bool,
        stats: str,
        backend: str,
        chunk_size: int | None,
        accum_dtype: torch.dtype | None,
        mode: str,
        filter_eps: float | None,
        need: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(loss, lse, argmax, p_dot_z, grad_e, grad_c, grad_bias, grad_sample_weight)``: the float64
        loss (``[N]`` or a scalar); statistics empty unless reported; gradients empty unless formed here."""
        static = (loss_name, loss_ref, reduction, ignore_index, shift, stats, backend, chunk_size, accum_dtype, mode,
                  filter_eps)  # fmt: skip
        tensors = (e, c, bias, target, weight, sample_weight, denominator, hyperparameters)
        formed = _gradients_in_forward(reduction, mode, need)
        if formed:
            value, values, grads = _run(tensors, extra, extra_keys, static, need)
        else:
            with torch.no_grad():
                value, values, grads = _run(tensors, extra, extra_keys, static, [False] * 4)
        reported = [values[s] if s in values else _empty(target if s is ARGMAX else value) for s in _REPORTABLE]
        return (value, *reported, *(g if g is not None else _empty(e) for g in grads))

    @_linear_cross_entropy.register_fake
    def _(e, c, bias, target, weight, extra, extra_keys, sample_weight, denominator, hyperparameters, loss_name,
          loss_ref, reduction, ignore_index, shift, stats, backend, chunk_size, accum_dtype, mode, filter_eps,
          need):  # fmt: skip
        n = e.shape[0]
        value = e.new_empty((n,) if reduction == "none" else (), dtype=ACC)
        names = stats.split(",") if stats else []
        report = {s for name in names for s in STAT_SOURCES[name]}
        reported = [
            value.new_empty((n,) if s in report else (0,), dtype=torch.long if s is ARGMAX else ACC)
            for s in _REPORTABLE
        ]
        formed = _gradients_in_forward(reduction, mode, need)
        grads = [
            torch.empty_like(t) if formed and wanted else _empty(e)
            for t, wanted in zip((e, c, bias, sample_weight), need)
        ]  # a tensor is None only where it is not needed
        return (value, *reported, *grads)

    @torch.library.custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
    def _linear_cross_entropy_backward(
        grad: Tensor,
        e: Tensor,
        c: Tensor,
        bias: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        extra: list[Tensor],
        extra_keys: str,
        sample_weight: Tensor | None,
        denominator: Tensor | None,
        hyperparameters: Tensor,
        loss_name: str,
        loss_ref: LossRef,
        reduction: str,
        ignore_index: int,
        shift: bool,
        stats: str,
        backend: str,
        chunk_size: int | None,
        accum_dtype: torch.dtype | None,
        mode: str,
        filter_eps: float | None,
        need: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(grad_e, grad_c, grad_bias, grad_sample_weight)`` for the upstream ``grad`` (empty where
        not needed), running the engine again."""
        static = (loss_name, loss_ref, reduction, ignore_index, shift, "", backend, chunk_size, accum_dtype, mode,
                  filter_eps)  # fmt: skip
        tensors = (e, c, bias, target, weight, sample_weight, denominator, hyperparameters)
        _, _, grads = _run(tensors, extra, extra_keys, static, need, upstream=grad)
        return tuple(g if g is not None else _empty(e) for g in grads)

    @_linear_cross_entropy_backward.register_fake
    def _(grad, e, c, bias, target, weight, extra, extra_keys, sample_weight, denominator, hyperparameters,
          loss_name, loss_ref, reduction, ignore_index, shift, stats, backend, chunk_size, accum_dtype, mode,
          filter_eps, need):  # fmt: skip
        return tuple(
            torch.empty_like(t) if wanted else _empty(e) for t, wanted in zip((e, c, bias, sample_weight), need)
        )

    def _setup_context(ctx, inputs, output):
        e, c, bias, target, weight, extra, extra_keys, sample_weight, denominator, hyperparameters, *static, need = (
            inputs
        )
        ctx.need, ctx.num_extra, ctx.num_inputs = need, len(extra), len(inputs)
        _loss_name, _loss_ref, reduction, *_, mode, _filter_eps = static
        ctx.formed = _gradients_in_forward(reduction, mode, need)
        if ctx.formed:
            ctx.save_for_backward(*output[4:])
        else:
            ctx.save_for_backward(e, c, bias, target, weight, sample_weight, denominator, hyperparameters, *extra)
            ctx.static = (extra_keys, *static, need)

    def _backward(ctx, grad, *_unused):
        if ctx.formed:
            grads = [g * grad.to(g.dtype) if wanted else None for g, wanted in zip(ctx.saved_tensors, ctx.need)]
        else:
            e, c, bias, target, weight, sample_weight, denominator, hyperparameters, *extra = ctx.saved_tensors
            extra_keys, *static, need = ctx.static
            out = _linear_cross_entropy_backward(
                grad, e, c, bias, target, weight, extra, extra_keys, sample_weight, denominator, hyperparameters,
                *static, need,
            )  # fmt: skip
            grads = [g if wanted else None for g, wanted in zip(out, ctx.need)]
        # One entry per operator input; ``extra`` (a list) gets a list.
        g_e, g_c, g_bias, g_sample_weight = grads
        head = (g_e, g_c, g_bias, None, None, [None] * ctx.num_extra, None, g_sample_weight)
        return head + (None,) * (ctx.num_inputs - len(head))

    _linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
