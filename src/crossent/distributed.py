"""Vocabulary-parallel losses: each process holds a slice of the classes, none holds a whole row.

This is the layout of a tensor-parallel LM head (Megatron-style): rank ``r`` holds classes
``[vocab_start, vocab_start + V_r)`` only. Every streamable crossent loss runs on it: each rank
computes the mergeable states of its columns, one all-gather combines them (merged in the order of the
classes, so every rank gets bit-identical values), the per-row formula runs everywhere, and each rank
gets the gradient of its own columns. Whole-row and stateful losses are refused by name.

* :func:`vocab_parallel_cross_entropy`: from the ``[N, V_r]`` logits each rank holds;
* :func:`vocab_parallel_linear_cross_entropy`: from the hidden states and the rank's rows of the
  classifier, without the logits (at most one chunk of them);
* :func:`crossent.linear_cross_entropy` with a classifier that is a DTensor split ``Shard(0)`` over
  the vocabulary (``ColwiseParallel``) calls the latter by itself.

Before anything is merged, the ranks agree in one small all-gather per call, the call's first
collective: the shards must tile ``[0, vocab_size)`` exactly, and every rank must pass the same rows and
the same options (the loss and its hyperparameters, ``label_smoothing``, ``z_loss``, ``softcap``,
``weight``, ``shift``, the dtype and ``D``, ...); otherwise every rank raises the same error, naming
the classes or the options and the ranks. A rank whose arguments are rejected makes every rank raise,
never leaves the others waiting in a collective. Without an initialised process group a process is a
group of one and must hold every class.

Works with any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU) and under DDP/FSDP; see
``docs/distributed.md``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import _validation as V
from ._engine.options import LinearCrossEntropyOptions
from ._engine.plan import Plan, require_blockwise
from ._engine.reduction import reduce
from ._engine.shards import Claim, agree
from ._engine.vocab_parallel import ENGINE, VocabParallelRowLoss
from ._engine.vocab_parallel_linear import sharded_loss
from ._linear_call import check_normalizer, finish, linear_call, linear_inputs, prepare, resolve_options
from ._rows import compute_dtype, index_rows
from .losses._build import build_loss
from .transforms import Softcap

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def _index(name: str, value, *, optional: bool = False, minimum: int = 0) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _device(t) -> torch.device:
    return t.device if isinstance(t, Tensor) else torch.device("cpu")


def _transforms(softcap):
    softcap = V.check_softcap(softcap)  # math.inf: no capping
    return (Softcap(softcap),) if softcap is not None else ()


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    vocab_start: int,
    vocab_size: int | None = None,
    group=None,
    loss="ce",
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    extra: dict[str, Tensor] | None = None,
) -> Tensor:
    r"""Any streamable crossent loss over logits whose classes are split across processes.

    Every rank of ``group`` calls this with the same ``target`` and its own logit columns; every rank
    gets the same loss, and the gradient of its own columns. The ranks' classes must tile
    ``[0, vocab_size)``; a rank may hold none (``V_r = 0``).

    Args:
        logits: ``[N, V_r]`` (or ``[..., V_r]``) logits of classes ``[vocab_start, vocab_start + V_r)``.
        target: ``[N]`` (or ``[...]``) global class indices, identical on every rank.
        vocab_start: first class index held by this rank.
        vocab_size: total number of classes ``C``; the sum of the ranks' ``V_r`` when omitted.
        group: the process group over which the vocabulary is split (default: the world).
        weight: ``[C]`` global class weights, identical on every rank.
        loss, ignore_index, reduction, label_smoothing, z_loss, softcap, extra: as in
            :func:`crossent.cross_entropy`.

    Raises:
        ValueError: on every rank, when the shards do not tile the vocabulary or the ranks pass
            different rows or options (the loss, ``label_smoothing``, ``weight``, the dtype, ...: the
            error names each one that differs and which ranks pass which value); for a loss that
            needs whole rows (e.g. ``nfl``), naming it and this engine.
        RuntimeError: on every other rank, when one rank's arguments were rejected (that rank raises
            its own error).

    Example (single process, which behaves as one rank holding every class):
        >>> import torch, crossent as xe
        >>> from crossent.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]), vocab_start=0)
        tensor(0.6216)
    """
    who = "vocab_parallel_cross_entropy"

    def check():
        V.check_reduction(reduction)
        for name, t in (("logits", logits), ("target", target)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if logits.dim() < 1:
            raise ValueError("logits must have shape [..., V_r] (a class dimension last), got a 0-dim tensor")
        if target.is_floating_point():
            raise ValueError(f"{who} takes class-index targets (class probabilities are not supported)")
        V.index_target(target, "integer class indices")  # refuses bool and complex
        V.check_ignore_index(ignore_index)
        cap = V.check_softcap(softcap)
        if logits.shape[:-1] != target.shape:
            raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} for logits {tuple(logits.shape)}, got {tuple(target.shape)}")
        start = _index("vocab_start", vocab_start)
        size = _index("vocab_size", vocab_size, optional=True, minimum=1)
        loss_obj = build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss)
        require_blockwise(loss_obj, ENGINE)
        flat_extra = V.flatten_extra(extra, target.shape)
        claim = Claim(
            start, logits.shape[-1], size, target, ignore_index, loss=loss, label_smoothing=float(label_smoothing),
            z_loss=float(z_loss), softcap=cap, weight=weight, extra=extra or None, reduction=reduction,
            dtype=logits.dtype,
        )  # fmt: skip
        return claim, (loss_obj, flat_extra)

    (loss_obj, flat_extra), layout = agree(who, group, _device(logits), check)
    # Everything below depends on values the ranks agreed on: it raises on every rank alike, or on none.
    target = V.index_target(target, "integer class indices")
    num_classes = layout.vocab_size
    class_weight = V.check_class_weight(weight, num_classes, logits.device, compute_dtype(logits.dtype))
    V.check_index_target(target, num_classes, ignore_index, target.shape if target.dim() else (1,))
    rows = index_rows(target.reshape(-1), num_classes, ignore_index, class_weight, flat_extra)
    plan = Plan(loss_obj, rows, _transforms(softcap))
    per_row = VocabParallelRowLoss.apply(logits.reshape(rows.num_rows, logits.shape[-1]), plan, rows, layout.cols, layout)
    return reduce(per_row, rows, reduction, target.shape, logits.dtype)


@torch._disable_dynamo
def vocab_parallel_linear_cross_entropy(
    e: Tensor,
    c_shard: Tensor,
    target: Tensor,
    *,
    vocab_start: int,
    vocab_size: int | None = None,
    group=None,
    bias_shard: Tensor | None = None,
    loss="ce",
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_stats: bool | str | tuple[str, ...] = False,
    extra: dict[str, Tensor] | None = None,
    accum_dtype: torch.dtype | None = None,
    options: LinearCrossEntropyOptions | None = None,
):
    r"""Any streamable crossent loss of ``e @ c.T + bias`` where each rank holds a block of ``c``'s rows.

    Equals :func:`crossent.linear_cross_entropy` of the whole classifier (values and gradients) while
    each rank holds only its ``c_shard = c[vocab_start : vocab_start + V_r]`` and at most one
    ``[chunk_size, V_r]`` block of logits. Every rank of ``group`` passes the same ``e`` and ``target``
    (the input of a column-parallel ``lm_head``) and gets the same loss. Each chunk's statistics are
    merged over the group by one all-gather of ``[chunk_size, K]`` (``K``: the loss's state tensors,
    2 for cross-entropy), so that the chunk's gradient is formed while its logits are held: three
    matrix products per chunk, as in one process.

    Gradients follow Megatron-LM's column-parallel convention: ``c_shard`` and ``bias_shard`` get the
    gradient of their own rows; ``e``'s gradient is summed over the group in backward (one all-reduce
    of ``[N, D]``), so every rank gets the whole gradient of ``e``, as if the loss were computed once.

    Args:
        e: hidden states ``[..., D]``, identical on every rank.
        c_shard: ``[V_r, D]`` classifier rows of classes ``[vocab_start, vocab_start + V_r)``; ``V_r``
            may be 0.
        target: class indices ``[...]`` (``e`` without its last dim), global, identical on every rank.
        vocab_start: first class held by this rank.
        vocab_size: total number of classes ``C``; the sum of the ranks' ``V_r`` when omitted.
        group: the process group over which the vocabulary is split (default: the world).
        bias_shard: optional ``[V_r]`` bias of this rank's classes.
        weight: ``[C]`` global class weights, identical on every rank.
        loss, ignore_index, reduction, label_smoothing, z_loss, softcap, shift, backend, chunk_size,
            return_stats, extra, accum_dtype, options: as in :func:`crossent.linear_cross_entropy`;
            ``return_stats`` gives the merged ``lse``, the global ``argmax`` and the entropy. The default chunk size
            is sized by the widest shard, the same on every rank. The engine is the row-chunked one
            (``backend`` ``"auto"`` or ``"torch"``).

    Raises:
        ValueError: on every rank, when the shards do not tile the vocabulary or the ranks pass
            different rows or options (the loss, ``label_smoothing``, ``shift``, ``weight``, the
            dtype, ``D``, ...: the error names each one that differs and which ranks pass which
            value); for a loss that needs whole rows or keeps state (e.g. ``nfl``), by name.
        RuntimeError: on every other rank, when one rank's arguments were rejected (that rank raises
            its own error).

    Example (single process, which behaves as one rank holding every class):
        >>> import torch
        >>> from crossent.distributed import vocab_parallel_linear_cross_entropy
        >>> e = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
        >>> vocab_parallel_linear_cross_entropy(e, c, torch.tensor([0, 2, 1]), vocab_start=0)
        tensor(1.1575)
    """
    return sharded_linear_cross_entropy(
        "vocab_parallel_linear_cross_entropy", e, c_shard, target, vocab_start=vocab_start, vocab_size=vocab_size,
        group=group, bias_shard=bias_shard, loss=loss, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift, backend=backend,
        chunk_size=chunk_size, return_stats=return_stats, extra=extra, accum_dtype=accum_dtype, options=options,
    )  # fmt: skip


@torch._disable_dynamo
def sharded_linear_cross_entropy(
    who: str,
    e: Tensor,
    c_shard: Tensor,
    target: Tensor,
    *,
    vocab_start,
    vocab_size,
    group,
    bias_shard,
    loss,
    weight,
    ignore_index,
    reduction: str,
    label_smoothing,
    z_loss,
    softcap,
    shift,
    backend,
    chunk_size,
    return_stats,
    extra,
    accum_dtype,
    options,
    sample_weight=None,
    normalizer=None,
    layout_error: Exception | None = None,
    temperature: float = 1.0,
    finished: bool = True,
):
    """The fused vocabulary-parallel call behind :func:`vocab_parallel_linear_cross_entropy` and a DTensor
    classifier's :func:`crossent.linear_cross_entropy` (``who``, named in errors), which also passes
    ``sample_weight`` (refused) and ``normalizer`` (the divisor of the ``mean``): they are checked, and
    agreed on, with every other argument; ``layout_error`` (a DTensor argument laid out wrongly on this
    rank) is raised in the agreement, so that every rank raises. ``finished=False`` returns the engine's
    float64 ``(value, stats)`` over the flat rows (``crossent.linear_log_probs``), as ``finish`` takes them."""

    def check():
        if layout_error is not None:
            raise layout_error
        call = linear_call(
            e, c_shard, target, bias_shard, loss=loss, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, reduction=reduction, ignore_index=ignore_index, shift=shift, return_stats=return_stats,
            options=resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype),
            allow_no_classes=True, temperature=temperature,
        )  # fmt: skip
        opts = call.options
        if opts.backend == "triton" or opts.filter_eps is not None:
            raise ValueError(
                f"{who} runs the row-chunked engine on every rank; backend='triton' and filter_eps are not "
                f"available on it (got backend={opts.backend!r}, filter_eps={opts.filter_eps!r})"
            )
        if sample_weight is not None:
            raise ValueError(f"{who}: sample_weight is not available for a DTensor classifier")
        denominator = check_normalizer(normalizer, reduction, e.device)
        index_target = V.index_target(target, "integer class indices")  # uint8 read as the classes it holds
        start = _index("vocab_start", vocab_start)
        size = _index("vocab_size", vocab_size, optional=True, minimum=1)
        loss_obj = call.build_loss()
        require_blockwise(loss_obj, ENGINE)
        V.flatten_extra(extra, index_target.shape)  # its shapes, before the causal shift reads them
        inputs = linear_inputs(e, c_shard, bias_shard)
        opts.accumulator(inputs[0].dtype)  # checks accum_dtype against the input dtype
        # Which inputs need a gradient decides the chunk size (the grad_c accumulator) and the all-reduce of
        # e's gradient in backward: every rank must decide alike.
        grad = torch.is_grad_enabled()
        named = (("e", e), ("c_shard", c_shard), ("bias_shard", bias_shard))
        gradients = tuple(name for name, t in named if grad and t is not None and t.requires_grad)
        claim = Claim(
            start, c_shard.shape[0], size, index_target, call.ignore_index, loss=loss,
            label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=call.softcap,
            temperature=call.temperature, weight=weight,
            extra=extra or None, reduction=reduction, normalizer=denominator, return_stats=call.stats, shift=call.shift,
            dtype=inputs[0].dtype, hidden=e.shape[-1], bias=bias_shard is not None, gradients=gradients,
            chunk_size=opts.chunk_size, accum_dtype=opts.accum_dtype, mode=opts.mode,
        )  # fmt: skip
        return claim, (call, loss_obj, inputs, index_target, denominator)

    (call, loss_obj, (e_rows, c, bias, out_dtype), target, denominator), layout = agree(who, group, _device(e), check)
    # Everything below depends on values the ranks agreed on: it raises on every rank alike, or on none.
    flat = e_rows.reshape(-1, e_rows.shape[-1])
    plan, rows, _ = prepare(flat, c, target, weight, extra, None, loss_obj, call, num_classes=layout.vocab_size)
    with torch.autocast(flat.device.type, enabled=False):
        value, stats = sharded_loss(
            flat, c, bias, plan, rows, layout, reduction=reduction if denominator is None else "sum",
            options=call.options, report=call.report,
        )  # fmt: skip
    if denominator is not None:
        value = value / denominator
    if not finished:
        return value, stats
    return finish(value, stats, tuple(target.shape), call, out_dtype)
