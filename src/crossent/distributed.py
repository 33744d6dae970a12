"""Vocabulary-parallel losses: each process holds a slice of the classes, none holds a whole row.

This is the layout of a tensor-parallel LM head (Megatron-style): rank ``r`` computes the logits of
classes ``[vocab_start, vocab_start + V_r)`` only. Every streamable crossent loss runs on it: each rank
computes the mergeable states of its columns, one all-gather of ``[N]``-sized states per statistic
combines them (in rank order, so every rank gets bit-identical values), the per-row formula runs
everywhere, and the backward pass needs no communication at all: each rank applies the coefficients
to its own columns. Whole-row losses are refused by name.

Works with any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU) and under DDP/FSDP; without
an initialised process group it runs as a single rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validation as V
from ._engine.plan import Plan
from ._engine.reduction import reduce
from ._engine.vocab_parallel import ENGINE, VocabParallelRowLoss, world
from ._rows import as_float, index_rows
from .losses._build import build_loss
from .transforms import Softcap

__all__ = ["vocab_parallel_cross_entropy"]


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
    gets the same loss, and the gradient of its own columns.

    Args:
        logits: ``[N, V_r]`` (or ``[..., V_r]``) logits of classes ``[vocab_start, vocab_start + V_r)``.
        target: ``[N]`` (or ``[...]``) global class indices, identical on every rank.
        vocab_start: first class index held by this rank.
        vocab_size: total number of classes ``C``; the sum of the ranks' ``V_r`` when omitted (one
            extra all-reduce).
        group: the process group over which the vocabulary is split (default: the world).
        weight: ``[C]`` global class weights, identical on every rank.
        loss, ignore_index, reduction, label_smoothing, z_loss, softcap, extra: as in
            :func:`crossent.cross_entropy`.

    Raises:
        ValueError: for a loss that needs whole rows (e.g. ``nfl``), naming it and this engine.

    Example (single process, which behaves as one rank holding every class):
        >>> import torch, crossent as xe
        >>> from crossent.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]), vocab_start=0)
        tensor(0.6216)
    """
    V.check_reduction(reduction)
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension: shape [..., V_r]")
    if target.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy takes class-index targets (class probabilities are not supported)")
    target = V.index_target(target, "integer class indices")
    vocab_start = V.count("vocab_start", vocab_start, 0)
    softcap = V.check_softcap(softcap)
    ignore_index = V.check_ignore_index(ignore_index)
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} for logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    world_size, _ = world(group)
    local = logits.shape[-1]
    if vocab_size is None:
        size = torch.tensor([local], device=logits.device)
        if world_size > 1:
            dist.all_reduce(size, group=group)
        vocab_size = int(size.item())
    if not 0 <= vocab_start <= vocab_size - local:
        raise ValueError(f"this rank's classes [{vocab_start}, {vocab_start + local}) do not fit in a vocabulary of {vocab_size}")
    loss_obj = build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss)
    class_weight = V.check_class_weight(weight, vocab_size, logits.device, as_float(logits[:0]).dtype)
    V.check_index_target(target, vocab_size, ignore_index, target.shape if target.dim() else (1,))
    rows = index_rows(target.reshape(-1), vocab_size, ignore_index, class_weight, V.flatten_extra(extra, target.shape))
    plan = Plan(loss_obj, rows, (Softcap(softcap),) if softcap is not None else ())
    plan.require_blockwise(ENGINE)
    cols = slice(vocab_start, vocab_start + local)
    per_row = VocabParallelRowLoss.apply(logits.reshape(-1, local), plan, rows, cols, group, world_size)
    return reduce(per_row, rows, reduction, target.shape, logits.dtype)
