"""``crossent.linear_cross_entropy``: any crossent loss of ``e @ c.T + bias`` without the logit matrix."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validation as V
from ._engine.options import LinearCrossEntropyOptions
from ._linear_call import LinearCall, compiled_call, engine_call

__all__ = ["linear_cross_entropy", "LinearStats", "LinearCrossEntropyOptions"]


class LinearStats(NamedTuple):
    """Per-row by-products of :func:`linear_cross_entropy` (``return_stats=True``), shaped like the loss rows.

    ``lse``: log-sum-exp of the (transformed) logits, float32. ``argmax``: index of the largest logit
    (int64), so token accuracy is ``(argmax == target)`` over counted rows, without any logits.
    """

    lse: Tensor
    argmax: Tensor


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


def _check_tensors(e, c, target, bias) -> None:
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
    if c.shape[0] == 0:
        raise ValueError("c must have at least one class (row)")
    if target.is_floating_point():
        raise TypeError(
            f"target must hold integer class indices, got {target.dtype}; for class-probability targets "
            "materialise the logits and use crossent.cross_entropy"
        )
    V.index_target(target, "integer class indices")  # refuses bool and complex
    if tuple(target.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(e.shape[:-1])} (e without its last dim), got {tuple(target.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c.shape[0]):
        raise ValueError(f"bias must have shape [{c.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("c", c), ("target", target)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != e.device:
            raise ValueError(f"{name} is on {t.device} but e is on {e.device}")


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
    return_stats: bool = False,
    extra: dict[str, Tensor] | None = None,
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
            without copying ``e``.
        backend: ``"auto"`` or ``"torch"`` (the row-chunked engine; runs on any device).
        chunk_size: rows per chunk; the default (:func:`crossent.default_chunk_size`)
            takes 512 rows, fewer where that would exceed 192 MiB (V = 131072: 368 rows);
            bfloat16/float16 inputs with a float32 accumulator take 1024 rows where memory allows.
        return_stats: also return :class:`LinearStats` (per-row ``lse`` and ``argmax``).
        extra: per-row tensors that particular losses read, shaped like ``target`` (shifted with it).
        accum_dtype: dtype in which ``c``'s gradient is summed over the chunks. ``None`` (default):
            float32 (float64 for float64 inputs), whose error does not grow with the number of chunks.
            For bfloat16/float16 inputs, passing the input dtype halves the accumulator and skips a
            float32 pass over it per chunk (faster, less memory), at the price of one rounding to the
            input dtype per chunk (an error that grows with the batch; see ``docs/linear.md``).

    Returns:
        The loss in the dtype of ``e`` (float32 under ``torch.autocast``), or ``(loss, LinearStats)``.

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
    """
    options = resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)
    V.check_reduction(reduction)
    _check_tensors(e, c, target, bias)
    if shift and (target.dim() == 0 or target.shape[-1] == 0):
        raise ValueError(
            f"shift=True needs a sequence dimension (target [..., T] with T >= 1), got shape {tuple(target.shape)}"
        )
    if options.mode == "eager" and reduction == "none":
        raise ValueError("the eager-gradient mode needs reduction='mean' or 'sum'")
    call = LinearCall(
        loss=loss,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=V.check_softcap(softcap),
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else V.check_ignore_index(ignore_index),
        shift=bool(shift),
        return_stats=bool(return_stats),
        options=options,
    )
    loss_obj = call.build_loss()
    target = V.index_target(target)

    out_dtype = e.dtype
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

    rows_shape = tuple(target.shape)
    flat = e.reshape(math.prod(rows_shape), c.shape[1])
    run = compiled_call if torch.compiler.is_compiling() else engine_call
    value, lse, argmax = run(flat, c, target, bias, weight, extra, loss_obj, call)

    def per_row(t: Tensor) -> Tensor:
        t = t.reshape(rows_shape)
        return t[..., :-1] if shift else t

    value = (per_row(value) if reduction == "none" else value).to(out_dtype)
    if not return_stats:
        return value
    return value, LinearStats(per_row(lse).float(), per_row(argmax))
