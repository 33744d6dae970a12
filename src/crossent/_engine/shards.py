"""Before a vocabulary-parallel call merges anything, its ranks agree on the layout and on the rows.

A vocabulary-parallel loss is right only if the ranks' shards tile ``[0, vocab_size)`` exactly and
every rank passes the same rows; and a collective completes only if every rank reaches it. One
all-gather of a few integers per rank and call settles both (:func:`agree`):

* each rank runs its own argument checks first and sends their outcome in the gather, so a rank that
  rejected its arguments makes every rank raise, instead of leaving the others waiting in the next
  collective;
* every rank then checks the same gathered table: the shards must tile the vocabulary (an error names
  the classes held by no rank or by several, and the ranks), and the values every rank must share
  (``vocab_size``, the number of rows, a fingerprint of the target, ``ignore_index``, the length of
  ``weight``, ``chunk_size``) must agree, so that every rank raises the same error, or none does.

Without an initialised process group a process is a group of one, and must hold every class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .vocab_parallel import gather_into, world


@dataclass(frozen=True)
class Claim:
    """What one rank says about its call: its shard of the classes and the values all ranks share.

    ``vocab_size``, ``weight`` (the length of the class weights) and ``chunk_size`` are ``None`` when
    not given; ``target`` is compared across ranks through a fingerprint.
    """

    vocab_start: int
    shard: int
    vocab_size: int | None
    target: Tensor
    ignore_index: int
    weight: int | None = None
    chunk_size: int | None = None


#: The gathered integers of a rank: a failure flag, its shard, then the values every rank must share.
_FIELDS = ("failed", "vocab_start", "shard", "vocab_size", "rows", "target", "ignore_index", "weight", "chunk_size")
_SHARED = {
    "vocab_size": "vocab_size",
    "rows": "the number of rows (target.numel())",
    "ignore_index": "ignore_index",
    "weight": "the length of weight",
    "chunk_size": "chunk_size",
}
_NONE = -1  # stands for None in the fields that may be omitted (never negative when given)
_OPTIONAL = ("vocab_size", "weight", "chunk_size")


@dataclass(frozen=True)
class Layout:
    """The agreed layout: ``starts[r]``, ``shards[r]``: the first class and the number of classes of rank ``r``."""

    group: Any
    rank: int
    vocab_size: int
    starts: tuple[int, ...]
    shards: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.starts)

    @property
    def order(self) -> tuple[int, ...]:
        """The ranks in the order of their classes: every rank merges their statistics in this order."""
        return tuple(sorted(range(self.size), key=lambda r: (self.starts[r], r)))

    @property
    def cols(self) -> slice:
        """This rank's classes."""
        start = self.starts[self.rank]
        return slice(start, start + self.shards[self.rank])

    @property
    def widest(self) -> int:
        """The largest shard: it sizes the chunks of every rank alike."""
        return max(self.shards)


def agree(who: str, group, device, check: Callable[[], tuple[Claim, Any]]) -> tuple[Any, Layout]:
    """Run ``check()`` (this rank's argument checks, returning ``(claim, result)``) and agree with the group.

    Returns ``result`` and the :class:`Layout`. Raises on every rank of ``group`` when any rank's
    ``check`` raised (that rank re-raises its own error, the others a ``RuntimeError`` quoting it), when
    the shards do not tile the vocabulary or when the ranks disagree on a shared value (``ValueError``).
    """
    size, rank = world(group)
    if size == 1:
        claim, result = check()
        table = [_encode(claim)]
        return result, _layout(who, table, group, rank, grouped=dist.is_available() and dist.is_initialized())
    error = None
    try:
        claim, result = check()
        row = torch.tensor(_encode(claim), dtype=torch.int64, device=device)
        row[_FIELDS.index("target")] = _fingerprint(claim.target)
    except Exception as err:  # noqa: BLE001 (re-raised below, once every rank has heard of it)
        error, result = err, None
        row = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
        row[0] = 1
    gathered = row.new_empty(size * len(_FIELDS))
    gather_into(gathered, row, group)
    table = gathered.view(size, len(_FIELDS)).tolist()
    failed = [r for r, t in enumerate(table) if t[0]]
    if failed:
        # Every rank saw the flag, so every rank takes part in this second gather (the error path only).
        messages: list = [None] * size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        raise RuntimeError(
            f"{who}: rank {failed[0]} of the vocabulary-parallel group rejected its arguments, so no rank "
            f"computes the loss. Rank {failed[0]}: {messages[failed[0]]}"
        )
    return result, _layout(who, table, group, rank, grouped=True)


def _encode(claim: Claim) -> list[int]:
    """The table row of ``claim``, its target fingerprint left at 0 (one rank needs none)."""

    def given(v):
        return _NONE if v is None else int(v)

    return [
        0, int(claim.vocab_start), int(claim.shard), given(claim.vocab_size), int(claim.target.numel()), 0,
        int(claim.ignore_index), given(claim.weight), given(claim.chunk_size),
    ]  # fmt: skip


def _fingerprint(target: Tensor) -> Tensor:
    """One int64 that differs, but for a vanishing chance, between any two different targets of a length."""
    t = target.reshape(-1).to(torch.int64)
    # Knuth's multiplicative hash of the position: a pseudo-random weight per row (int64 wrap-around is fine).
    weight = (torch.arange(t.numel(), device=t.device) * 2654435761 + 40503) % 2147483647
    return (t * weight).sum()


def _layout(who: str, table: list[list[int]], group, rank: int, grouped: bool) -> Layout:
    column = {name: [t[i] for t in table] for i, name in enumerate(_FIELDS)}
    disagree = []
    for name, what in _SHARED.items():
        values = column[name]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {None if v == _NONE and name in _OPTIONAL else v}" for r, v in enumerate(values))
            disagree.append(f"{what} ({shown})")
    if len(set(column["rows"])) == 1 and len(set(column["target"])) > 1:
        groups: dict = {}
        for r, v in enumerate(column["target"]):
            groups.setdefault(v, []).append(r)
        shown = " / ".join("ranks " + ", ".join(map(str, g)) if len(g) > 1 else f"rank {g[0]}" for g in groups.values())
        disagree.append(
            f"target (its values differ: {shown}); the vocabulary-parallel group splits the classes of the "
            "same rows, and a data-parallel split of the rows is not a vocabulary split (a weight sharded "
            "by fully_shard is gathered inside the module's forward: compute the loss there)"
        )
    if disagree:
        raise ValueError(f"{who}: every rank of the vocabulary-parallel group must pass the same " + "; ".join(disagree))

    starts, shards = tuple(column["vocab_start"]), tuple(column["shard"])
    given = column["vocab_size"][0]
    vocab_size = sum(shards) if given == _NONE else given
    problems, strays = _tiling(starts, shards, vocab_size)
    if problems:
        held = "" if strays else " (" + ", ".join(f"rank {r} holds [{s}, {s + n})" for r, (s, n) in enumerate(zip(starts, shards))) + ")"
        hint = (
            ""
            if grouped
            else ". No process group is initialised, so this process must hold every class: call "
            "torch.distributed.init_process_group first (or pass the whole vocabulary)"
        )
        raise ValueError(
            f"{who}: the ranks' classes do not tile the vocabulary [0, {vocab_size}): " + "; ".join(problems) + f"{held}{hint}"
        )
    return Layout(group, rank, vocab_size, starts, shards)


def _tiling(starts, shards, vocab_size: int) -> tuple[list[str], bool]:
    """What keeps the shards ``[start, start + shard)`` from tiling ``[0, vocab_size)``, and whether it is strays.

    Strays (classes outside the vocabulary) are reported alone; otherwise gaps and overlaps.
    """
    if vocab_size < 1:
        return [f"the vocabulary is empty (vocab_size={vocab_size})"], True
    problems = []
    for r, (s, n) in enumerate(zip(starts, shards)):
        if s < 0 or s + n > vocab_size:
            problems.append(f"rank {r}'s classes [{s}, {s + n}) fall outside [0, {vocab_size})")
    if problems:
        return problems, True
    reach, owner = 0, None
    for s, n, r in sorted((s, n, r) for r, (s, n) in enumerate(zip(starts, shards)) if n > 0):
        if s > reach:
            problems.append(f"classes [{reach}, {s}) are held by no rank")
        elif s < reach:
            problems.append(f"classes [{s}, {min(s + n, reach)}) are held by ranks {owner} and {r}")
        if s + n > reach:
            reach, owner = s + n, r
    if reach < vocab_size:
        problems.append(f"classes [{reach}, {vocab_size}) are held by no rank")
    return problems, False


__all__ = ["Claim", "Layout", "agree"]
