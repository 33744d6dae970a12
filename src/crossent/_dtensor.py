"""``linear_cross_entropy`` with DTensor arguments: a classifier split over the vocabulary.

``ColwiseParallel`` makes an ``lm_head``'s weight (and bias) a DTensor sharded ``Shard(0)`` over one
mesh dimension: each rank holds the rows of a contiguous block of classes, split as ``torch.chunk``
splits (the last ranks may hold fewer, or none). :func:`crossent.linear_cross_entropy` hands such a
``c`` here, and it runs the fused vocabulary-parallel engine on the local rows, over that mesh
dimension's process group; the loss is a plain tensor, the same on every rank, and ``c``'s gradient a
DTensor laid out like ``c``. ``e`` and ``target`` must be replicated over that dimension (plain
tensors, or DTensors placed ``Replicate()``). A ``c`` replicated on every mesh dimension runs the
ordinary single-process engine on its local copy. Other layouts are refused by name.

Nothing here imports ``torch.distributed.tensor``: a tensor can only be a DTensor once that module is
loaded, so :func:`is_dtensor` looks it up in ``sys.modules``.
"""

from __future__ import annotations

import sys

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


def dtensor_linear_cross_entropy(e, c, target, *, bias=None, weight=None, **options):
    """:func:`crossent.linear_cross_entropy` for DTensor ``c`` (and ``e``, ``target``, ``bias``, ``weight``)."""
    from .distributed import vocab_parallel_linear_cross_entropy
    from ._linear import linear_cross_entropy

    if not is_dtensor(c):
        raise TypeError(
            f"{_WHO}: e is {_describe(e)} but c is a plain tensor; pass e.full_tensor() (or e.to_local() "
            "where every rank holds the same rows)"
        )
    mesh = c.device_mesh
    dim = _vocabulary_dim(c)
    e, target, weight = (_replicated_local(n, t, mesh) for n, t in (("e", e), ("target", target), ("weight", weight)))
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != tuple(c.placements):
            raise ValueError(f"{_WHO}: bias is {_describe(bias)}; it must be laid out like c, {_describe(c)}")
        bias = bias.to_local()
    if dim is None:
        return linear_cross_entropy(e, c.to_local(), target, bias=bias, weight=weight, **options)
    vocab_size = c.shape[0]
    ranks = mesh.size(dim)
    per_rank = -(-vocab_size // ranks)  # torch.chunk's split, as Shard(0) lays out the rows
    vocab_start = min(mesh.get_local_rank(dim) * per_rank, vocab_size)
    return vocab_parallel_linear_cross_entropy(
        e, c.to_local(), target, vocab_start=vocab_start, vocab_size=vocab_size, group=mesh.get_group(dim),
        bias_shard=bias, weight=weight, **options,
    )  # fmt: skip


__all__ = ["dtensor_linear_cross_entropy", "is_dtensor"]
