"""``crossent.linear_cross_entropy``: any crossent loss of ``e @ c.T + bias`` without the logit matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as V
from ._dtensor import VocabularyShard, is_dtensor, local_arguments
from ._engine.options import LinearCrossEntropyOptions
from ._linear_call import (
    check_normalizer,
    compiled_call,
    engine_call,
    finish,
    linear_call,
    linear_inputs,
    resolve_options,
)

__all__ = ["linear_cross_entropy"]


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
    temperature: float = 1.0,
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
        temperature: the (capped) logits are divided by it, as a sampler's temperature: the loss is
            that of ``softcap(e @ c.T + bias) / temperature``.
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
    if is_dtensor(c) or is_dtensor(e):
        e, c, target, bias, weight, shard, layout_error = local_arguments(e, c, target, bias, weight)
        if shard is not None:  # a head split by vocabulary: the fused vocabulary-parallel engine
            return _vocabulary_parallel(
                e, c, target, shard, bias=bias, layout_error=layout_error, loss=loss, weight=weight,
                ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                temperature=temperature, shift=shift, backend=backend, chunk_size=chunk_size, return_stats=return_stats, extra=extra,
                sample_weight=sample_weight, normalizer=normalizer, accum_dtype=accum_dtype, options=options,
            )  # fmt: skip
    call = linear_call(
        e, c, target, bias, loss=loss, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction=reduction, ignore_index=ignore_index, shift=shift, return_stats=return_stats,
        options=resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype),
        temperature=temperature,
    )  # fmt: skip
    loss_obj = call.build_loss()
    target = V.index_target(target, "integer class indices")  # uint8 read as the classes it holds
    sample_weight = _check_sample_weight(sample_weight, target, e.device)
    denominator = check_normalizer(normalizer, reduction, e.device)
    e, c, bias, out_dtype = linear_inputs(e, c, bias)

    rows_shape = tuple(target.shape)
    flat = e.reshape(math.prod(rows_shape), c.shape[1])
    run = compiled_call if torch.compiler.is_compiling() else engine_call
    value, stats = run(flat, c, bias, target, weight, extra, sample_weight, denominator, loss_obj, call)
    return finish(value, stats, rows_shape, call, out_dtype)


def _vocabulary_parallel(e: Tensor, c_shard: Tensor, target, shard: VocabularyShard, *, bias, **arguments):
    """The call of a head split by vocabulary (a ``Shard(0)`` DTensor), given its local tensors: the
    fused vocabulary-parallel call, which checks every argument (``sample_weight`` and ``normalizer``
    included) in its agreement across the ranks."""
    from .distributed import sharded_linear_cross_entropy

    return sharded_linear_cross_entropy(
        "linear_cross_entropy", e, c_shard, target, vocab_start=shard.vocab_start, vocab_size=shard.vocab_size,
        group=shard.group, bias_shard=bias, **arguments,
    )  # fmt: skip
