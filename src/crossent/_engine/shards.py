"""Before a vocabulary-parallel call merges anything, its ranks agree on the layout and on the call.

A vocabulary-parallel loss is right only if the ranks' shards tile ``[0, vocab_size)`` exactly and
every rank computes the same loss of the same rows; and a collective completes only if every rank
reaches it, with tensors of the same size. One all-gather of a few integers per rank and call, the
first collective of the call, settles all of it (:func:`agree`):

* each rank runs its own argument checks first and sends their outcome in the gather, so a rank that
  rejected its arguments makes every rank raise, instead of leaving the others waiting in the next
  collective;
* every option that must agree (a field of the :class:`Claim`: the loss and its options, the rows, the
  dtype and features, the class weights, the chunking, which inputs need a gradient...) travels as one
  integer, a fingerprint of its value. Every rank checks the same gathered table, so every rank raises
  the same error, naming each option that differs and which ranks hold which value, or none does;
* the shards must tile the vocabulary (an error names the classes held by no rank or by several, and
  the ranks).

Without an initialised process group a process is a group of one, and must hold every class.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .vocab_parallel import gather_into, world


@dataclass(frozen=True)
class Claim:
    """What one rank says about its call: its shard of the classes, and every option all ranks must share.

    ``vocab_start`` and ``shard`` place the rank's classes; every other field must be equal on every
    rank of the group (an entry point leaves the options it does not have at their defaults). Tensors
    (``target``, ``weight``, ``extra``'s values, ``normalizer``) are compared by their shape and a
    fingerprint of their values, computed on their device; a loss by its class and hyperparameters (or
    its registered name); anything else by its value.
    """

    vocab_start: int
    shard: int
    vocab_size: int | None
    target: Tensor
    ignore_index: int
    loss: object = "ce"  # as given: a registered name or a Loss
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0
    weight: Tensor | None = None
    extra: dict | None = None
    reduction: str = "mean"
    normalizer: Tensor | None = None
    return_stats: tuple = ()
    shift: bool = False
    dtype: torch.dtype | None = None  # the dtype the logits are computed in
    hidden: int | None = None  # D, the features of e and c
    bias: bool = False  # whether a bias shard is given
    gradients: tuple = ()  # the inputs that need a gradient
    chunk_size: int | None = None
    accum_dtype: torch.dtype | None = None
    mode: str | None = None


_PLACEMENT = ("vocab_start", "shard")
#: The fields every rank must share, in the order an error lists them.
_SHARED = tuple(f.name for f in fields(Claim) if f.name not in _PLACEMENT)
#: The gathered integers of a rank: a failure flag, the entry point, its shard, then the shared fields.
_COLUMNS = ("failed", "entry", *_PLACEMENT, *_SHARED)
#: What an error calls a column (its own name otherwise).
_NAMES = {
    "entry": "entry point",
    "weight": "weight (the class weights)",
    "dtype": "dtype (of the logits, or of e and c_shard as the products run)",
    "hidden": "D (the features of e and c_shard)",
    "bias": "bias_shard (given or not)",
    "gradients": "inputs that need a gradient",
}
_NONE = -1  # stands for an omitted vocab_size (never negative when given)


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
    the ranks' claims differ in a shared field or the shards do not tile the vocabulary (``ValueError``).
    """
    size, rank = world(group)
    if size == 1:
        claim, result = check()
        grouped = dist.is_available() and dist.is_initialized()
        return result, _layout(who, [claim.vocab_start], [claim.shard], claim.vocab_size, group, rank, grouped)
    error = claim = None
    try:
        claim, result = check()
        row = _row(who, claim, device)
    except Exception as err:  # noqa: BLE001 (re-raised below, once every rank has heard of it)
        error, result = err, None
        row = torch.zeros(len(_COLUMNS), dtype=torch.int64, device=device)
        row[0] = 1
    gathered = row.new_empty(size * len(_COLUMNS))
    gather_into(gathered, row, group)
    table = gathered.view(size, len(_COLUMNS)).tolist()
    failed = [r for r, t in enumerate(table) if t[0]]
    # Every rank holds the same table, so every rank takes the same branch below, and every rank takes
    # part in its second gather (on the error paths only).
    if failed:
        messages: list = [None] * size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        raise RuntimeError(
            f"{who}: rank {failed[0]} of the vocabulary-parallel group rejected its arguments, so no rank "
            f"computes the loss. Rank {failed[0]}: {messages[failed[0]]}"
        )
    column = {name: [t[i] for t in table] for i, name in enumerate(_COLUMNS)}
    differ = [name for name in ("entry", *_SHARED) if len(set(column[name])) > 1]
    if differ:
        mine = {name: repr(who) if name == "entry" else _describe(getattr(claim, name)) for name in differ}
        described: list = [None] * size
        dist.all_gather_object(described, mine, group=group)
        clauses = [_difference(name, column[name], [d[name] for d in described]) for name in differ]
        raise ValueError(f"{who}: every rank of the vocabulary-parallel group must pass the same " + "; ".join(clauses))
    vocab_size = column["vocab_size"][0]
    return result, _layout(
        who, column["vocab_start"], column["shard"], None if vocab_size == _NONE else vocab_size, group, rank, True
    )


def _row(who: str, claim: Claim, device) -> Tensor:
    """The table row of ``claim``: the placement as is, every shared field as a fingerprint.

    The fingerprints of tensors are computed on their device and written into the row there: no host
    synchronisation before the gather, which moves the whole row to the host at once.
    """
    values: list[int] = [0, _hash(repr(who)), int(claim.vocab_start), int(claim.shard)]
    on_device = {}
    for name in _SHARED:
        value = getattr(claim, name)
        if name == "vocab_size":  # read back as a number: the layout needs it
            values.append(_NONE if value is None else int(value))
            continue
        code = _code(value)
        if isinstance(code, Tensor):
            on_device[len(values)], code = code, 0
        values.append(code)
    row = torch.tensor(values, dtype=torch.int64, device=device)
    for i, code in on_device.items():
        row[i] = code
    return row


def _hash(text: str) -> int:
    """A signed 64-bit hash of ``text``, the same in every process (unlike ``hash``, salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _code(value) -> int | Tensor:
    """One int64 that differs, but for a vanishing chance, between two different values of an option.

    A tensor (and a dict's tensors) gives a 0-dim int64 tensor on its device; anything else an int.
    """
    if isinstance(value, Tensor):
        kind = "floating" if value.is_floating_point() else "integer"
        return _fingerprint(value) + _hash(f"{kind} {tuple(value.shape)}")
    if isinstance(value, dict):
        code = _hash(_key({k: None if isinstance(v, Tensor) else v for k, v in value.items()}))
        for k, v in value.items():
            if isinstance(v, Tensor):
                code = code + _code(v) * (_hash(repr(k)) | 1)  # int64 arithmetic wraps around
        return code
    return _hash(_key(value))


def _fingerprint(t: Tensor) -> Tensor:
    """One int64 that differs, but for a vanishing chance, between two tensors of a length with different values.

    Integers count by value (an int32 and an int64 target of the same classes agree), floating-point
    numbers by the bits of their float64 value.
    """
    t = t.detach().reshape(-1)
    t = t.to(torch.float64).view(torch.int64) if t.is_floating_point() else t.to(torch.int64)
    # Knuth's multiplicative hash of the position: a pseudo-random weight per entry (int64 wrap-around is
    # fine), formed in place: a class weight may have as many entries as the vocabulary.
    weight = torch.arange(t.numel(), device=t.device).mul_(2654435761).add_(40503).remainder_(2147483647)
    return weight.mul_(t).sum()


def _key(value) -> str:
    """A text that two processes' values share exactly when the values are equal.

    Numbers by value (``2`` and ``2.0`` agree; ``repr`` of a float round-trips), a loss by its class and
    hyperparameters, recursively (a sum of losses by its terms), a transform or any other object by its
    class and attributes, a tensor among them by its dtype, shape and bytes (read on the host: a loss's
    hyperparameter tensors are small).
    """
    if value is None or isinstance(value, (bool, str, torch.dtype)):
        return repr(value)
    if isinstance(value, numbers.Real):
        return repr(float(value)) if float(value) == value else repr(value)
    if isinstance(value, Tensor):
        data = value.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes()
        return f"tensor({value.dtype}, {tuple(value.shape)}, {hashlib.blake2b(data).hexdigest()})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_key, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_key(k)}: {_key(v)}" for k, v in value.items())) + "}"
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if callable(getattr(value, "hparams", None)):  # a loss
        return f"{kind}({_key(value.hparams())})"
    if hasattr(value, "__dict__") and not callable(value):
        return f"{kind}({_key({k: v for k, v in vars(value).items() if not k.startswith('_')})})"
    if hasattr(value, "__qualname__"):  # a function or a class: the same code in every process
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"{kind}({value!r})"


def _describe(value) -> str:
    """``value`` as an error shows it (read on the host: the error path only). It never raises: every
    rank must reach the gather of the descriptions."""
    try:
        if isinstance(value, Tensor):
            return f"tensor({value.item()!r})" if value.numel() == 1 else f"a tensor of shape {tuple(value.shape)}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
        return repr(value)
    except Exception:  # noqa: BLE001 (a repr that fails: the type must do)
        return f"a {type(value).__name__}"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _difference(name: str, codes: list[int], described: list[str]) -> str:
    """The clause of an error for a column whose ``codes`` differ: which ranks hold which value."""
    label = _NAMES.get(name, name)
    groups: dict = {}
    for r, code in enumerate(codes):
        groups.setdefault(code, []).append(r)
    shown = [described[g[0]] for g in groups.values()]
    if len(set(shown)) > 1:
        return f"{label} ({' / '.join(f'{_ranks(g)}: {text}' for g, text in zip(groups.values(), shown))})"
    # The values look alike (tensors of a shape): the ranks that hold equal ones are named together.
    clause = f"{label} (its values differ: {' / '.join(_ranks(g) for g in groups.values())})"
    if name == "target":
        clause += (
            "; the vocabulary-parallel group splits the classes of the same rows, and a data-parallel split of "
            "the rows is not a vocabulary split (a weight sharded by fully_shard is gathered inside the "
            "module's forward: compute the loss there)"
        )
    return clause


def _layout(who: str, starts, shards, vocab_size: int | None, group, rank: int, grouped: bool) -> Layout:
    """The agreed :class:`Layout`; raises unless the shards ``[starts[r], starts[r] + shards[r])`` tile
    ``[0, vocab_size)`` (``vocab_size`` omitted: the sum of the shards)."""
    starts, shards = tuple(starts), tuple(shards)
    vocab_size = sum(shards) if vocab_size is None else vocab_size
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
