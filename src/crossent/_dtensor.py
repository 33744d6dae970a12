"""``linear_cross_entropy``'s DTensor arguments unwrapped: local tensors, and where ``c``'s rows sit.

``ColwiseParallel`` makes an ``lm_head``'s weight (and bias) a DTensor sharded ``Shard(0)`` over one
mesh dimension: each rank holds the rows of a contiguous block of classes, split as ``torch.chunk``
splits (the last ranks may hold fewer, or none). :func:`local_arguments` turns such a call's arguments
into the rank's local tensors and a :class:`VocabularyShard` (the rank's first class, the vocabulary's
size and that mesh dimension's process group), with which :func:`crossent.linear_cross_entropy` runs
the fused vocabulary-parallel engine. ``e`` and ``target`` must be replicated over that dimension
(plain tensors, or DTensors placed ``Replicate()``). A ``c`` replicated on every mesh dimension has no
shard: its local copy takes the ordinary single-process path. Other layouts are refused by name.

Nothing here imports ``torch.distributed.tensor``: a tensor can only be a DTensor once that module is
loaded, so :func:`is_dtensor` looks it up in ``sys.modules``. Nothing here runs a loss either.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

_WHO = "linear_cross_entropy"


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _describe(t) -> str:
    return f"a DTensor placed {tuple(t.placements)} on {t.device_mesh}" if is_dtensor(t) else "a plain tensor"


def _vocabulary_dim(c) -> int | None:
    """The mesh dimension over which ``c`` is split by vocabulary rows; ``None`` when it is replicated."""
    from torch.distributed.tensor import Shard

    split = [i for i, p in enumerate(c.placements) if not p.is_replicate()]
    if not split:
        return None
    if len(split) == 1 and type(c.placements[split[0]]) is Shard and c.placements[split[0]].dim == 0:
        return split[0]
    raise ValueError(
        f"{_WHO}: c is {_describe(c)}; a DTensor classifier must be split by vocabulary rows over one mesh "
        "dimension, Shard(0), and replicated over the others (as ColwiseParallel makes of an lm_head), or "
        "replicated everywhere"
    )


def _replicated_local(name: str, t, mesh):
    """The local tensor of ``t`` (a plain tensor, or a DTensor replicated over ``mesh``)."""
    if t is None or not is_dtensor(t):
        return t
    if t.device_mesh != mesh or not all(p.is_replicate() for p in t.placements):
        raise ValueError(
            f"{_WHO}: {name} is {_describe(t)}, but it must be the same on every rank of c's mesh: pass a plain "
            f"tensor or a DTensor placed Replicate() on that mesh (e.g. {name}.redistribute(placements=[Replicate()]))"
        )
    return t.to_local()


class VocabularyShard(NamedTuple):
    """Where a rank's rows of a classifier split by vocabulary sit."""

    vocab_start: int  # the first class of the rank's rows
    vocab_size: int  # the classes of the whole classifier
    group: object  # the process group of the mesh dimension that splits it


class LocalArguments(NamedTuple):
    """The tensors of a DTensor call as the rank holds them; ``shard`` is ``None`` for a replicated ``c``."""

    e: object
    c: object
    target: object
    bias: object
    weight: object
    shard: VocabularyShard | None
    #: A layout error of this rank's other arguments when ``c`` is split by vocabulary: the caller raises
    #: it inside the ranks' agreement, since another rank may have laid its arguments out correctly and
    #: would otherwise wait in the agreement's collective.
    error: Exception | None = None


def local_arguments(e, c, target, bias=None, weight=None) -> LocalArguments:
    """The local tensors of a :func:`crossent.linear_cross_entropy` call with DTensor ``c`` (or ``e``), checked
    to be laid out as the vocabulary-parallel engine takes them."""
    if not is_dtensor(c):
        raise TypeError(
            f"{_WHO}: e is {_describe(e)} but c is a plain tensor; pass e.full_tensor() (or e.to_local() "
            "where every rank holds the same rows)"
        )
    mesh = c.device_mesh
    dim = _vocabulary_dim(c)  # c's placements are the same on every rank: an error here is every rank's
    try:
        e, target, weight = (
            _replicated_local(n, t, mesh) for n, t in (("e", e), ("target", target), ("weight", weight))
        )
        if bias is not None:
            if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != tuple(c.placements):
                raise ValueError(f"{_WHO}: bias is {_describe(bias)}; it must be laid out like c, {_describe(c)}")
            bias = bias.to_local()
    except ValueError as err:
        if dim is None:
            raise
        error = err
    else:
        error = None
    if dim is None:
        return LocalArguments(e, c.to_local(), target, bias, weight, None)
    vocab_size = c.shape[0]
    per_rank = -(-vocab_size // mesh.size(dim))  # torch.chunk's split, as Shard(0) lays out the rows
    vocab_start = min(mesh.get_local_rank(dim) * per_rank, vocab_size)
    shard = VocabularyShard(vocab_start, vocab_size, mesh.get_group(dim))
    return LocalArguments(e, c.to_local(), target, bias, weight, shard, error)

__all__ = ["LocalArguments", "VocabularyShard", "is_dtensor", "local_arguments"]
