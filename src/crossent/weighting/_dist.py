"""The few collectives the strategies need, over any ``torch.distributed`` backend."""

from __future__ import annotations

import torch
from torch import Tensor


def active(group=None, enabled: bool | None = None) -> bool:
    """Whether to communicate: ``enabled=None`` means "when a process group is initialised"."""
    if enabled is False:
        return False
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if enabled and not available:
        raise RuntimeError("distributed=True but torch.distributed is not initialised (call init_process_group first)")
    return available


def world_size(group=None) -> int:
    return torch.distributed.get_world_size(group)


def rank(group=None) -> int:
    return torch.distributed.get_rank(group)


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    out = t.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def all_gather_rows(t: Tensor, group=None) -> tuple[Tensor, int, int]:
    """Concatenate every rank's 1-D ``t`` in rank order; also return where this rank's rows start
    and how many rows there are in all. Ranks may hold different numbers of rows."""
    n = world_size(group)
    size = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    torch.distributed.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, device=t.device, dtype=t.dtype)
    padded[: t.shape[0]] = t
    pieces = [torch.empty_like(padded) for _ in range(n)]
    torch.distributed.all_gather(pieces, padded, group=group)
    me = rank(group)
    gathered = torch.cat([p[:s] for p, s in zip(pieces, sizes)])
    return gathered, sum(sizes[:me]), sum(sizes)
