"""Which rows of ``e`` the row-chunked engine visits, and in which chunks.

Rows whose target is ``ignore_index`` contribute nothing, so they are skipped (the selection is
*compacted*) unless their statistics were asked for. A chunk is then addressed by a selector: a
slice of ``e``'s rows, or an index tensor into them when compacted.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from ..._rows import Rows


def take_rows(rows: Rows, index: Tensor) -> Rows:
    """The rows at ``index`` (a gather; :meth:`Rows.select` covers contiguous blocks)."""

    def cut(t):
        return t.index_select(0, index) if isinstance(t, Tensor) and t.dim() > 0 else t

    return replace(
        rows, target=cut(rows.target), valid=rows.valid[index], probs=cut(rows.probs),
        extra={k: cut(v) for k, v in rows.extra.items()},
    )  # fmt: skip


class RowSelection:
    """The visited rows (``active``) of a call's ``rows`` and their chunks of ``chunk_size``.

    Attributes:
        rows: all rows of the call.
        compact: ignored rows are skipped.
        index: ``[n_active]`` positions of the visited rows in ``e`` (``None``: all, in order).
        active: :class:`Rows` of the visited rows.
    """

    def __init__(self, rows: Rows, chunk_size: int, keep_all: bool = False):
        self.rows = rows
        self.chunk_size = chunk_size
        self.compact = not keep_all and not bool(rows.valid.all())
        self.index = rows.valid.nonzero().squeeze(1) if self.compact else None
        self.active = take_rows(rows, self.index) if self.compact else rows

    @property
    def num_active(self) -> int:
        return self.active.num_rows

    def chunks(self):
        """``(selector, part, rows)`` per chunk: rows of ``e`` (slice or index), positions among the active rows, their :class:`Rows`."""
        n = self.num_active
        for start in range(0, n, self.chunk_size):
            part = slice(start, min(n, start + self.chunk_size))
            sel = part if self.index is None else self.index[part]
            yield sel, part, self.active.select(part)

    def add_extra(self, values: dict) -> None:
        """Per-active-row tensors (``[n_active, ...]``) that every later chunk's :class:`Rows` carries."""
        self.active = replace(self.active, extra={**self.active.extra, **values})

    @staticmethod
    def gather(t: Tensor, sel) -> Tensor:
        return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)

    @staticmethod
    def put(out: Tensor, sel, value: Tensor) -> None:
        if isinstance(sel, slice):
            out[sel] = value
        else:
            out.index_copy_(0, sel, value.to(out.dtype))


def sub_selector(sel, part: slice):
    """The selector of rows ``part`` (positions within the chunk) of the chunk ``sel``."""
    if isinstance(sel, slice):
        return slice(sel.start + part.start, sel.start + part.stop)
    return sel[part]


def expand_scale(row_scale: Tensor | None, sel, num_rows: int, dtype) -> Tensor | None:
    """The upstream gradient of a chunk's rows: ``None``, a broadcast scalar or a gather of ``[N]``."""
    if row_scale is None:
        return None
    if row_scale.dim() == 0:
        return row_scale.to(dtype).expand(num_rows)
    return RowSelection.gather(row_scale, sel).to(dtype)


__all__ = ["RowSelection", "take_rows", "sub_selector", "expand_scale"]
