"""Where the row-chunked engine's gradients accumulate: ``grad_e`` rows, ``c``'s and the bias's sums.

A chunk's logit gradient arrives as a matrix ``G``, whole or with the
:class:`~crossent._engine.plan.Factors` of a factored kernel: ``a[:, None] * G`` plus a target term and
rank-1 column-sum terms. :class:`Gradients` folds the target term into ``G``, puts the row factors
``a`` on the small ``[r, D]`` operands of the two matrix products (``grad_e = G @ c``,
``grad_c += G.T @ e``), and sums the rank-1 terms per statistic (:class:`ColumnTermSum`), added once,
at the end.

``c``'s gradient has two accumulators with one interface: :class:`WeightGrad` (``[V, D]``, float32 and
float64 inputs) and :class:`TransposedWeightGrad` (``[D, V]``, half-precision inputs, whose products run
fastest as ``e.T @ G`` on CPUs' half-precision units).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ...stats import ACC, Statistic
from ..options import Tuning
from ..plan import OWN, ColumnTerm, Factors, SoftmaxTerm


def column_block(rows: int, dtype: torch.dtype, block_bytes: int) -> int:
    """Columns of a cache-sized ``[rows, block]`` block of ``dtype`` (``block_bytes``, at least 256)."""
    return max(256, block_bytes // (dtype.itemsize * rows))


def transpose_into(acc: Tensor, dtype: torch.dtype, block_bytes: int) -> Tensor:
    """``acc.T`` (``acc`` is ``[D, V]``) as a contiguous ``[V, D]`` tensor of ``dtype``.

    Cast first, a block of columns of about ``block_bytes`` at a time, then transpose within one dtype:
    PyTorch transposes same-dtype 2-D copies in cache tiles, whereas a casting copy through transposed
    strides walks memory element by element (about 1.6x as long for a float32 ``[1024, 131072]``
    accumulator).
    """
    d, v = acc.shape
    out = torch.empty(v, d, dtype=dtype, device=acc.device)
    if acc.dtype == dtype:
        return out.copy_(acc.T)
    block = column_block(d, dtype, block_bytes)
    tmp = torch.empty(d * min(block, v), dtype=dtype, device=acc.device)
    for start in range(0, v, block):
        stop = min(v, start + block)
        part = tmp[: d * (stop - start)].view(d, stop - start)  # contiguous, so part.T tiles
        part.copy_(acc[:, start:stop])
        out[start:stop].copy_(part.T)
    return out


def fold_target_(G: Tensor, a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    """Fold ``b_i 1[j = y_i]`` into the matrix so that ``a_i G_ij`` alone is the gradient.

    ``G[i, y_i] += b_i / a_i``: one scatter of ``r`` elements instead of gathering ``c[y]`` for
    ``grad_e`` and scattering rows into ``grad_c`` (CPU ``index_add_`` is slow). Rows whose ``a_i`` is
    zero (or negligible next to ``b_i``) become ``b_i * onehot`` with ``a_i = 1``. Returns ``a``.
    """
    flat = a.abs() * 1e30 <= b.abs()
    if bool(flat.any()):
        rows = flat.nonzero().squeeze(1)
        G.index_fill_(0, rows, 0.0)
        a = a.masked_fill(flat, 1.0)
    G.scatter_add_(1, target[:, None], (b / a).to(G.dtype)[:, None])
    return a


def _column_weighted_sum(c: Tensor, w: Tensor | None, dtype: torch.dtype, block: int = 4096) -> Tensor:
    """``sum_j w_j c_j`` (``[D]``) accumulated in ``dtype`` without upcasting all of ``c`` at once."""
    if c.dtype == dtype:
        # One matrix-vector product: a single streaming read of c.
        return c.T.mv(torch.ones(c.shape[0], dtype=dtype, device=c.device) if w is None else w.to(dtype))
    out = torch.zeros(c.shape[1], dtype=dtype, device=c.device)
    for start in range(0, c.shape[0], block):
        part = c[start : start + block].to(dtype)
        out += part.sum(0) if w is None else w[start : start + block].to(dtype) @ part
    return out


class ColumnSums:
    """``(c^T w, bias . w)`` of each column-sum statistic's class vector ``w`` (``None``: ones), in float64.

    ``columns`` pairs the plan's column-sum statistics with their class vectors
    (:attr:`Structure.columns <crossent._engine.plan.Structure>`); each pair is computed once per call,
    when first asked for. ``c^T w`` is accumulated in the compute dtype, like the logits it stands in for.
    """

    def __init__(self, c: Tensor, bias: Tensor | None, compute: torch.dtype, columns=()):
        self.c, self.bias, self.compute = c, bias, compute
        self._weights = dict(columns)
        self._sums: dict[Statistic, tuple[Tensor, Tensor | None]] = {}

    def __getitem__(self, stat: Statistic) -> tuple[Tensor, Tensor | None]:
        entry = self._sums.get(stat)
        if entry is None:
            w = self._weights[stat]
            cw = _column_weighted_sum(self.c, w, self.compute).to(ACC)
            bw = None
            if self.bias is not None:
                bias = self.bias.to(ACC)
                bw = bias.sum() if w is None else w.to(ACC) @ bias
            entry = self._sums[stat] = (cw, bw)
        return entry


class ChunkSource:
    """What a kernel may ask of a chunk besides its logits, answered from ``e`` and ``c`` directly."""

    def __init__(self, e_c: Tensor, column_sums: ColumnSums):
        self.e_c, self.column_sums = e_c, column_sums
        self.c, self.bias, self.compute = column_sums.c, column_sums.bias, column_sums.compute

    def part(self, rows: slice) -> ChunkSource:
        """The source of some rows of the chunk."""
        return ChunkSource(self.e_c[rows], self.column_sums)

    def logit_at(self, i: Tensor, j: Tensor) -> Tensor:
        """Raw logits ``z[i_k, j_k]`` of the chunk, one dot product each."""
        compute = self.compute
        z = (self.e_c[i].to(compute) * self.c[j].to(compute)).sum(1)
        return z if self.bias is None else z + self.bias[j].to(compute)

    def row_sums(self, stat: Statistic) -> Tensor:
        """The column sum ``stat`` (float64, ``[r]``) as ``e_i . (c^T w) + bias . w``: no pass over the chunk."""
        cw, bw = self.column_sums[stat]
        sums = self.e_c.to(ACC) @ cw
        return sums if bw is None else sums + bw


class WeightGrad:
    """``grad_c`` (``[V, D]``) summed over chunks; written by the first product (no zero fill)."""

    def __init__(self, v: int, d: int, dtype: torch.dtype, device):
        self.acc = torch.empty(v, d, dtype=dtype, device=device)
        self.written = False

    def add_product(self, op: Tensor, rhs: Tensor) -> None:
        """``grad_c += op.T @ rhs`` (``op`` is ``[r, V]``, ``rhs`` ``[r, D]``)."""
        if self.written:
            self.acc.addmm_(op.T, rhs)
        else:
            torch.mm(op.T, rhs, out=self.acc)
        self.written = True

    def release_buffers(self) -> None:
        """Nothing beside the accumulator itself."""

    def rows_view(self) -> Tensor:
        """The accumulator as ``[V, D]`` (for rank-1 updates)."""
        if not self.written:
            self.acc.zero_()
            self.written = True
        return self.acc

    def result(self, dtype: torch.dtype) -> Tensor:
        gc = self.rows_view()
        self.acc = None
        return gc if gc.dtype == dtype else gc.to(dtype)


class TransposedWeightGrad:
    """``grad_c.T`` (``[D, V]``) summed over chunks, for half-precision inputs.

    With the CPU's half-precision matrix units, ``e_c.T @ op`` (both operands in row-major order, the
    output ``[D, V]``) runs two to three times faster than ``op.T @ e_c``; the accumulator is
    transposed back once, in :meth:`result`. CPUs have no half x half -> float32 product in PyTorch,
    so a float32 accumulator takes the product over blocks of vocabulary columns into a cache-sized
    half buffer (``block_bytes``), each block added to it right away (a float32 product would forgo
    the half units).
    """

    def __init__(self, v: int, d: int, dtype: torch.dtype, device, block_bytes: int):
        self.acc = torch.empty(d, v, dtype=dtype, device=device)
        self.written = False
        self.block_bytes = block_bytes
        self._block_buffer = None

    def add_product(self, op: Tensor, rhs: Tensor) -> None:
        lhs = rhs.T.contiguous()
        acc = self.acc
        if acc.dtype == op.dtype:
            if self.written:
                acc.addmm_(lhs, op)
            else:
                torch.mm(lhs, op, out=acc)
            self.written = True
            return
        d, v = acc.shape
        block = column_block(d, op.dtype, self.block_bytes)
        if self._block_buffer is None:
            self._block_buffer = torch.empty(d, min(block, v), dtype=op.dtype, device=op.device)
        for start in range(0, v, block):
            stop = min(v, start + block)
            tmp = self._block_buffer[:, : stop - start]
            torch.mm(lhs, op[:, start:stop], out=tmp)
            if self.written:
                acc[:, start:stop].add_(tmp)
            else:
                acc[:, start:stop].copy_(tmp)
        self.written = True

    def rows_view(self) -> Tensor:
        if not self.written:
            self.acc.zero_()
            self.written = True
        return self.acc.T

    def release_buffers(self) -> None:
        self._block_buffer = None

    def result(self, dtype: torch.dtype) -> Tensor:
        self.rows_view()
        acc, self.acc = self.acc, None
        return transpose_into(acc, dtype, self.block_bytes)


@dataclass
class ColumnTermSum:
    """A column-sum statistic's rank-1 gradient term ``s w^T`` over the chunks seen so far.

    ``e_sum = sum_i s_i e_i`` (``[D]``) and ``total = sum_i s_i`` (0-dim), in the compute dtype;
    :meth:`Gradients.finish` adds ``w e_sum^T`` to ``grad_c`` and ``total w`` to ``grad_bias``
    (``weights`` is ``w``; ``None``: ones).
    """

    weights: Tensor | None
    e_sum: Tensor
    total: Tensor


class Gradients:
    """The gradients of one sweep: ``grad_e`` rows, the ``grad_c`` accumulator, ``grad_bias``, rank-1 sums.

    Args:
        need: ``(e, c, bias)`` gradients wanted.
        accum_dtype: dtype of the ``grad_c`` accumulator.
        half: the inputs are bfloat16/float16 (transposed accumulator).
        compact: some rows of ``e`` are never visited (their ``grad_e`` rows must be zero).
        tuning: the block size of the transposed accumulator.
    """

    def __init__(self, e: Tensor, c: Tensor, bias: Tensor | None, column_sums: ColumnSums, *, need, accum_dtype,
                 half: bool, compact: bool, tuning: Tuning):  # fmt: skip
        self.e_dtype, self.c, self.bias, self.column_sums = e.dtype, c, bias, column_sums
        self.compute = column_sums.compute
        self.need_e, self.need_c, self.need_b = need
        m, d, v = e.shape[0], e.shape[1], c.shape[0]
        self.grad_e = (torch.zeros if compact else torch.empty)(m, d, dtype=e.dtype, device=e.device) if self.need_e else None
        if not self.need_c:
            self.grad_c = None
        elif half:
            self.grad_c = TransposedWeightGrad(v, d, accum_dtype, e.device, tuning.transpose_block_bytes)
        else:
            self.grad_c = WeightGrad(v, d, accum_dtype, e.device)
        self.grad_b = torch.zeros(v, dtype=self.compute, device=e.device) if self.need_b else None
        self.column_terms: dict[Statistic, ColumnTermSum] = {}

    @property
    def wanted(self) -> bool:
        return self.need_e or self.need_c or self.need_b

    def fold(self, matrix: Tensor, factors: Factors | None, target: Tensor) -> Factors | None:
        """Fold a chunk's target term into ``matrix`` and add its ``grad_bias``.

        ``factors``: ``None`` when ``matrix`` is the chunk's logit gradient, else the
        :class:`~crossent._engine.plan.Factors` whose softmax ``matrix`` holds. Returns what the
        matrix products take besides ``matrix``: ``None`` (nothing), or the factors left once the
        target term is in the matrix, in the matrix's dtype: the row factors (``softmax``) and the
        column terms.
        """
        if factors is None:
            if self.need_b:
                self.grad_b += matrix.sum(0)
            return None
        dtype = matrix.dtype
        a = factors.softmax.to(dtype) if factors.softmax is not None else matrix.new_zeros(matrix.shape[0])
        if factors.onehot is not None:
            a = fold_target_(matrix, a, factors.onehot.to(dtype), target)
        columns = tuple(replace(t, coef=t.coef.to(dtype)) for t in factors.columns)
        if self.need_b:
            self.grad_b.addmv_(matrix.T, a)
            for t in columns:
                self._column_term(t).total += t.coef.sum()
        return Factors({OWN: SoftmaxTerm(a)}, columns=columns)

    def add(self, op: Tensor, factors: Factors | None, e_c: Tensor, sel) -> None:
        """Add the gradient ``op`` with ``factors`` (from :meth:`fold`) to ``grad_e`` and ``grad_c``.

        ``op`` is in the input dtype; the row factors go on the small ``[r, D]`` operands of the
        matrix products, the column terms into their rank-1 sums.
        """
        a = None if factors is None else factors.softmax
        columns = () if factors is None else factors.columns
        if self.need_e:
            ge = self.grad_e[sel] if isinstance(sel, slice) else e_c.new_empty(e_c.shape)
            torch.mm(op, self.c, out=ge)
            if a is not None:
                ge.mul_(a[:, None])
            for t in columns:
                ge.addr_(t.coef.to(ge.dtype), self.column_sums[t.stat][0].to(ge.dtype))
            if not isinstance(sel, slice):
                self.grad_e.index_copy_(0, sel, ge)
        if self.need_c:
            rhs = e_c if a is None else (e_c * a[:, None]).to(op.dtype)
            self.grad_c.add_product(op, rhs)
            for t in columns:
                self._column_term(t).e_sum.addmv_(e_c.T.to(self.compute), t.coef.to(self.compute))

    def _column_term(self, term: ColumnTerm) -> ColumnTermSum:
        entry = self.column_terms.get(term.stat)
        if entry is None:
            kw = dict(dtype=self.compute, device=self.c.device)
            entry = ColumnTermSum(term.weights, torch.zeros(self.c.shape[1], **kw), torch.zeros((), **kw))
            self.column_terms[term.stat] = entry
        return entry

    def finish(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Add the rank-1 terms and return ``(grad_e, grad_c, grad_bias)`` in the inputs' dtypes."""
        for term in self.column_terms.values():
            w = term.weights
            if self.need_c:
                gc = self.grad_c.rows_view()
                if w is None:
                    gc += term.e_sum.to(gc.dtype)
                else:
                    gc.addr_(w.to(gc.dtype), term.e_sum.to(gc.dtype))
            if self.need_b:
                self.grad_b += term.total if w is None else term.total * w.to(self.compute)
        gc = None
        if self.grad_c is not None:
            self.grad_c.release_buffers()
            gc, self.grad_c = self.grad_c.result(self.c.dtype), None
        gb = self.grad_b
        if gb is not None and gb.dtype != self.bias.dtype:
            gb = gb.to(self.bias.dtype)
        return self.grad_e, gc, gb


__all__ = [
    "Gradients", "ChunkSource", "ColumnSums", "ColumnTermSum", "WeightGrad", "TransposedWeightGrad", "transpose_into",
    "fold_target_", "column_block",
]  # fmt: skip
