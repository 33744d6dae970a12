"""``crossent.linear_cross_entropy``: any crossent loss of ``e @ c.T + bias`` without the logit matrix."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validation as V
from ._dtensor import dtensor_linear_cross_entropy, is_dtensor
from ._engine.options import LinearCrossEntropyOptions, accumulation_dtype
from ._linear_call import STAT_SOURCES as _STAT_SOURCES
from ._linear_call import LinearCall, compiled_call, engine_call
from .stats import ARGMAX, LSE, P_DOT_Z

__all__ = ["linear_cross_entropy", "LinearStats", "LinearCrossEntropyOptions"]


class LinearStats(NamedTuple):
    """Per-row by-products of :func:`linear_cross_entropy` (``return_stats``), shaped like the loss rows.

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
    unknown = [n for n in names if n not in _STAT_SOURCES]
    if unknown or not names:
        raise ValueError(
            f"return_stats must be a bool or names among {tuple(_STAT_SOURCES)}, got {return_stats!r}"
        )
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


def _check_sample_weight(sample_weight, target: Tensor, device) -> Tensor | None:
    """``sample_weight``: one finite float per target, on ``e``'s device (returned as given)."""
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, Tensor):
        raise TypeError(f"sample_weight must be a tensor or None, got {type(sample_weight).__name__}")
    if not sample_weight.is_floating_point():
        raise TypeError(f"sample_weight must be floating point, got {sample_weight.dtype}")
    if tuple(sample_weight.shape) != tuple(target.shape):
        raise ValueError(
            f"sample_weight must have the target's shape {tuple(target.shape)} (one weight per row), "
            f"got {tuple(sample_weight.shape)}"
        )
    if sample_weight.device != device:
        raise ValueError(f"sample_weight is on {sample_weight.device} but e is on {device}")
    return sample_weight


def _check_normalizer(normalizer, reduction: str, device) -> Tensor | None:
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


def linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    loss="ce",
    weight: Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_stats: bool | str | tuple[str, ...] = False,
    extra: dict[str, Tensor] | None = None,
    sample_weight: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    accum_dtype: torch.dtype | None = None,
    options: LinearCrossEntropyOptions | None = None,
):
    r"""Any crossent loss of the logits ``e @ c.T + bias``, computed without materialising them.

    Equals ``crossent.cross_entropy(e @ c.T + bias, target, ...)`` (values and gradients of ``e``,
    ``c`` and ``bias``) while holding at most one ``[chunk_size, V]`` block of logits: for a language
    model's head, ``e`` are the final hidden states and ``c`` is ``lm_head.weight``. For a differentiated
    ``mean``/``sum`` the gradients are formed during the forward pass (three matrix products in all, as
    many as the naive path); otherwise the backward pass recomputes the logits. See ``docs/linear.md``.

    Args:
        e: hidden states ``[..., D]``; float32, bfloat16, float16 (float32 accumulation) or float64.
        c: classifier ``[V, D]`` (an ``nn.Linear`` weight), same dtype as ``e``.
        target: class indices ``[...]`` (``e`` without its last dim).
        bias: optional ``[V]`` classifier bias.
        loss: a registered name or a :class:`crossent.losses.Loss`; whole-row losses work too.
        weight: ``[V]`` class weights (PyTorch's ``weight``).
        ignore_index: target value that contributes nothing; such rows are skipped (``None``: -100,
            as in ``torch.nn.functional.linear_cross_entropy``).
        reduction: ``"mean"`` (weighted mean over counted rows), ``"sum"`` or ``"none"`` (loss per row,
            shape of ``target``, or of ``target[..., 1:]`` with ``shift``).
        label_smoothing: smoothing of ``loss="ce"``.
        z_loss: adds ``z_loss * lse**2`` per row.
        softcap: logits pass through ``softcap * tanh(z / softcap)`` first (``None`` or ``math.inf``:
            no capping).
        shift: causal-LM shift along the sequence dim (``target``'s last): position ``t`` predicts
            ``target[..., t + 1]``; the last position of ``e`` and the first of ``target`` are dropped
            without copying ``e``. ``target`` is the *unshifted* labels, over the same positions as
            ``e``; targets already shifted (``target[..., t]`` follows position ``t``, as transformers'
            ``shift_labels``) take ``shift=False``. A target one position shorter than ``e`` is an error.
        backend: ``"auto"``, ``"torch"`` (the row-chunked engine; runs on any device) or ``"triton"``
            (tiled GPU kernels for every streamable loss, docs/triton.md). ``"auto"`` takes
            ``"triton"`` for CUDA inputs when Triton is installed and the loss streams, else ``"torch"``.
        chunk_size: rows per chunk; the default (:func:`crossent.default_chunk_size`)
            takes 512 rows, fewer where that would exceed 192 MiB (V = 131072: 368 rows);
            bfloat16/float16 inputs with a float32 accumulator take 1024 rows where memory allows.
        return_stats: also return :class:`LinearStats`: ``True`` for per-row ``lse`` and ``argmax``
            (the predicted token), or names among ``"lse"``, ``"argmax"``, ``"entropy"`` (entropy takes
            the generic kernel: one more pass over each chunk).
        extra: per-row tensors that particular losses read, shaped like ``target`` (shifted with it).
        sample_weight: a float per row, shaped like ``target`` (shifted with it), multiplying its loss;
            ``mean`` still divides by the counted rows' class weights (their number without ``weight``),
            not by the sample weights (a weighted average divides by ``normalizer=sample_weight[counted].sum()``).
            Constant weights keep the three-product path; weights that require grad get their gradient
            through the recompute path.
        normalizer: the divisor of ``reduction="mean"`` instead of the counted rows: a number or a
            one-element tensor, e.g. transformers' ``num_items_in_batch`` (the counted tokens of every
            micro-batch of an optimizer step, on every rank), so that micro-batches summed over
            gradient accumulation equal one large batch. The loss is ``sum / normalizer``.
        accum_dtype: dtype in which ``c``'s gradient is summed over the chunks. ``None`` (default):
            float32 (float64 for float64 inputs), whose error does not grow with the number of chunks.
            For bfloat16/float16 inputs, passing the input dtype halves the accumulator and skips a
            float32 pass over it per chunk (faster, less memory), at the price of one rounding to the
            input dtype per chunk (an error that grows with the batch; see ``docs/linear.md``).

    Returns:
        The loss, or ``(loss, LinearStats)``. The loss is float32 for float32, bfloat16 and float16
        inputs (and under ``torch.autocast``), float64 for float64 ones: it is summed in float64 and
        only rounded at the end, as ``loss.float()`` of a float32 evaluation would be; gradients come
        back in the inputs' dtypes.

    Under ``torch.compile`` (``fullgraph=True`` too) the engine runs as one custom operator of the
    graph, with the same values and gradients as eager mode. Its loss must be a registered name, or an
    object built outside the compiled code (any module attribute), and must keep no state.

    Example:
        >>> import torch, crossent as xe
        >>> e = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
        >>> target = torch.tensor([0, 2, 1])
        >>> xe.linear_cross_entropy(e, c, target)
        tensor(1.1575)
        >>> xe.cross_entropy(e @ c.T, target)
        tensor(1.1575)
        >>> loss, stats = xe.linear_cross_entropy(e, c, target, z_loss=1e-2, reduction="none", return_stats=True)
        >>> loss
        tensor([0.4274, 2.3129, 0.8347])
        >>> stats.lse, stats.argmax
        (tensor([1.4076, 0.8064, 2.7586]), tensor([0, 0, 1]))
        >>> xe.linear_cross_entropy(e, c, target, sample_weight=torch.tensor([1.0, 0.5, 0.0]), normalizer=4)
        tensor(0.3902)
        >>> _, stats = xe.linear_cross_entropy(e, c, target, return_stats=("argmax", "entropy"))
        >>> stats.entropy
        tensor([0.8324, 0.7520, 0.8854])
    """
    if is_dtensor(c) or is_dtensor(e):  # a vocabulary-sharded head: the vocabulary-parallel engine
        return _dtensor_call(locals())
    options = resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)
    V.check_reduction(reduction)
    _check_tensors(e, c, target, bias, shift=shift)
    call = LinearCall(
        loss=loss,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=V.check_softcap(softcap),
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else V.check_ignore_index(ignore_index),
        shift=bool(shift),
        stats=_stat_names(return_stats),
        options=options,
    )
    loss_obj = call.build_loss()
    target = V.index_target(target, "integer class indices")  # uint8 read as the classes it holds
    sample_weight = _check_sample_weight(sample_weight, target, e.device)
    denominator = _check_normalizer(normalizer, reduction, e.device)
    e, c, bias, out_dtype = _compute_inputs(e, c, bias)

    rows_shape = tuple(target.shape)
    flat = e.reshape(math.prod(rows_shape), c.shape[1])
    run = compiled_call if torch.compiler.is_compiling() else engine_call
    value, stats = run(flat, c, bias, target, weight, extra, sample_weight, denominator, loss_obj, call)
    return _finish(value, stats, rows_shape, shift, reduction, out_dtype, return_stats)


def _compute_inputs(e: Tensor, c: Tensor, bias: Tensor | None):
    """``(e, c, bias, out_dtype)``: the inputs in the dtype the products run in, and the loss's dtype
    (float32 for float32 and half-precision inputs, float64 for float64)."""
    out_dtype = accumulation_dtype(e.dtype)
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


def _finish(value: Tensor, stats: dict, rows_shape, shift: bool, reduction: str, out_dtype, return_stats):
    """The engine's float64 result as the entry point returns it: per-row shape, dtype, optional stats."""

    def per_row(t: Tensor) -> Tensor:
        t = t.reshape(rows_shape)
        return t[..., :-1] if shift else t

    value = (per_row(value) if reduction == "none" else value).to(out_dtype)
    stat_names = _stat_names(return_stats)
    if not stat_names:
        return value
    fields = {
        "lse": lambda: per_row(stats[LSE]).float(),
        "argmax": lambda: per_row(stats[ARGMAX]),
        "entropy": lambda: per_row(stats[LSE] - stats[P_DOT_Z]).float(),
    }
    return value, LinearStats(**{name: fields[name]() if name in stat_names else None for name in fields})


def _dtensor_call(args: dict):
    """The DTensor path with the trainer options it supports: ``normalizer`` divides its sum."""
    sample_weight, normalizer = args.pop("sample_weight"), args.pop("normalizer")
    if sample_weight is not None:
        raise ValueError("linear_cross_entropy: sample_weight is not available for a DTensor classifier")
    if not isinstance(args["return_stats"], bool):
        raise ValueError("linear_cross_entropy: a DTensor classifier reports return_stats=True (lse, argmax) only")
    if normalizer is None:
        return dtensor_linear_cross_entropy(**args)
    device = args["e"].device
    denominator = _check_normalizer(normalizer, args["reduction"], device)
    out = dtensor_linear_cross_entropy(**{**args, "reduction": "sum"})
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss = (loss.double() / denominator).to(loss.dtype)
    return loss if stats is None else (loss, stats)

