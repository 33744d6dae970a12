"""The row-chunked engine: any loss of ``z = e @ c.T (+ bias)`` without the ``[N, V]`` logit matrix.

Rows are processed in chunks of ``chunk_size``; each chunk holds whole vocabulary rows, so every loss
works, whole-row ones included. Two modes (DESIGN.md, section 2):

* **eager gradient** (a scalar loss that will be differentiated): the upstream gradient of each row is
  known before the loop (``1 / denominator`` for ``mean``, ``1`` for ``sum``), so each chunk's logit
  gradient is formed in the forward pass and folded at once into ``grad_e`` (its rows) and ``grad_c`` /
  ``grad_bias`` (accumulated in place). Three matrix products in all; backward only rescales by the
  upstream scalar, in place, and not at all when it is 1.
* **recompute** (``reduction='none'``, or an upstream gradient unknown up front): the forward keeps
  per-row losses only; backward recomputes each chunk's logits (four matrix products).

Without gradients the same loop runs once and keeps nothing but ``[N]`` values.

Memory beyond inputs and gradients: one float32 ``[chunk, V]`` buffer, and ``[chunk, D]`` / ``[N]``
odds and ends; the generic and whole-row kernels add a few chunk-sized temporaries. bfloat16/float16
inputs keep the chunk in the input dtype instead, with a small float32 staging buffer for the kernel,
and accumulate ``grad_c`` transposed (``[D, V]``, float32 unless ``accum_dtype`` is the input dtype).
Rows whose target is ``ignore_index`` are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _frontend as fe
from ..rows import Rows
from ..stats import ACC, ARGMAX, LSE
from .chunk_grad import ChunkGrad, make_kernel
from .plan import Plan

#: The default chunk: at least ``SPEED_ROWS`` rows (the matrix products of a chunk read all of ``c``
#: and ``grad_c``; below a few hundred rows that traffic, not arithmetic, sets their speed), more rows
#: while the chunk takes under ``SMALL_BYTES`` (fewer, larger products for small vocabularies), and
#: never more than ``MAX_BYTES``. Half-precision inputs whose ``grad_c`` is summed in float32 pay one
#: more pass over that ``V x D`` accumulator per chunk: they aim for ``HALF_ACCUM_ROWS`` rows and may
#: take up to half the accumulator's bytes.
SPEED_ROWS = 512
HALF_ACCUM_ROWS = 1024
SMALL_BYTES = 32 * 2**20
MAX_BYTES = 192 * 2**20
MIN_CHUNK, MAX_CHUNK = 16, 8192

MODES = ("auto", "eager", "recompute")
_HALF_BLOCK_BYTES = 4 * 2**20
#: Float32 staging of half-precision chunks for the kernel: this many bytes of rows at a time.
_STAGE_BYTES = 32 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(
    num_classes: int, hidden: int = 0, dtype: torch.dtype = torch.float32, accum_dtype: torch.dtype | None = None
) -> int:
    """Rows per chunk for ``V = num_classes`` classes and ``D = hidden`` features.

    A row of a chunk costs ``V`` logits (float32, or the input dtype for bfloat16/float16, whose
    float32 copy is staged a few rows at a time) and a few ``D``-vectors. The chunk gets
    ``max(SPEED_ROWS, SMALL_BYTES / row)`` rows, capped at ``MAX_BYTES / row``, within ``[16, 8192]``
    and rounded down to a multiple of 16. For float32 and D = 1024: V = 32768 gives 512 rows (64 MiB
    of logits), V = 131072 gives 368 rows (184 MiB), V = 256000 gives 192 rows, V = 1000 gives 2048
    rows.

    ``accum_dtype``: the dtype in which ``c``'s gradient is summed over the chunks (``None``: no
    gradient for ``c``). Half-precision inputs with a float32 accumulator add each chunk's product to
    it in a separate pass (no CPU product of half inputs writes float32), so their chunk aims for
    ``HALF_ACCUM_ROWS`` rows, capped at ``MAX_BYTES`` or at ``D`` rows (logits of half the
    accumulator's ``4 V D`` bytes), whichever allows more: bfloat16 at V = 131072 and D = 1024 gives
    1024 rows (256 MiB beside a 512 MiB accumulator), against 512 without that accumulator.
    """
    row = max(1, num_classes * dtype.itemsize + 3 * hidden * 4)
    speed_rows, max_rows = SPEED_ROWS, MAX_BYTES // row
    if dtype.itemsize == 2 and accum_dtype is not None and accum_dtype.itemsize == 4:
        # D rows of half-precision logits take half the 4 V D bytes of the accumulator.
        speed_rows, max_rows = HALF_ACCUM_ROWS, max(max_rows, hidden)
    rows = min(max(speed_rows, SMALL_BYTES // row), max_rows)
    rows = max(MIN_CHUNK, min(MAX_CHUNK, rows))
    return rows - rows % MIN_CHUNK


def _take(rows: Rows, index: Tensor) -> Rows:
    """The rows at ``index`` (a gather; :meth:`Rows.select` covers contiguous blocks)."""

    def cut(t):
        return t.index_select(0, index) if isinstance(t, Tensor) and t.dim() > 0 else t

    return replace(
        rows, target=cut(rows.target), valid=rows.valid[index], probs=cut(rows.probs),
        extra={k: cut(v) for k, v in rows.extra.items()},
    )  # fmt: skip


def mean_denominator(rows: Rows, dtype: torch.dtype) -> Tensor:
    """The ``mean`` reduction's divisor, exactly as :func:`crossent._frontend.reduce` forms it (never 0)."""
    w = rows.target_weight()
    denom = rows.valid.sum().to(dtype) if w is None else torch.where(rows.valid, w, 0).sum().to(dtype)
    return torch.where(denom > 0, denom, torch.ones_like(denom))


@dataclass
class Job:
    """Everything about one call except the tensors that autograd tracks."""

    plan: Plan
    rows: Rows
    chunk_size: int
    extra_stats: tuple = ()
    accum_dtype: torch.dtype = torch.float32  # of the grad_c accumulator
    kernel: object = None

    def __post_init__(self):
        self.kernel = make_kernel(self.plan, self.rows, self.extra_stats)
        # Ignored rows contribute nothing; skip them unless their statistics were asked for.
        self.compact = not self.extra_stats and not bool(self.rows.valid.all())
        if self.compact:
            self.index = self.rows.valid.nonzero().squeeze(1)
            self.active_rows = _take(self.rows, self.index)
        else:
            self.index = None
            self.active_rows = self.rows

    def blocks(self):
        """``(selector, rows)`` per chunk: a slice of ``e``'s rows, or an index tensor when compacted."""
        n = self.active_rows.num_rows
        for start in range(0, n, self.chunk_size):
            part = slice(start, min(n, start + self.chunk_size))
            sel = part if self.index is None else self.index[part]
            yield sel, self.active_rows.select(part)


def _fold_target_(G: Tensor, a: Tensor | None, b: Tensor, target: Tensor) -> Tensor:
    """Fold ``b_i 1[j = y_i]`` into the matrix so that ``a_i G_ij`` alone is the gradient.

    ``G[i, y_i] += b_i / a_i``: one scatter of ``r`` elements instead of gathering ``c[y]`` for
    ``grad_e`` and scattering rows into ``grad_c`` (CPU ``index_add_`` is slow). Rows whose ``a_i`` is
    zero (or negligible next to ``b_i``) become ``b_i * onehot`` with ``a_i = 1``. Returns ``a``.
    """
    if a is None:
        G.scatter_add_(1, target[:, None], b[:, None].to(G.dtype))
        return None
    flat = a.abs() * 1e30 <= b.abs()
    if bool(flat.any()):
        rows = flat.nonzero().squeeze(1)
        G.index_fill_(0, rows, 0.0)
        a = a.masked_fill(flat, 1.0)
    G.scatter_add_(1, target[:, None], (b / a).to(G.dtype)[:, None])
    return a


def _logits_into(out: Tensor, e: Tensor, c: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(e, c.T, out=out)
    else:
        torch.addmm(bias, e, c.T, out=out)


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


class _Sweep:
    """One pass over the rows: per-row losses, requested statistics, and optionally gradients."""

    def __init__(self, job: Job, e: Tensor, c: Tensor, bias: Tensor | None, need=(False, False, False)):
        self.job, self.e, self.c, self.bias = job, e, c, bias
        self.need_e, self.need_c, self.need_b = need
        self.acc = accumulation_dtype(e.dtype)
        self.half = e.dtype != self.acc
        m, d, v = e.shape[0], e.shape[1], c.shape[0]
        kw = dict(device=e.device)
        # Per-row values are float64 like the statistics (``[N]`` only), as in the dense engine.
        self.per_row = torch.zeros(m, dtype=ACC, **kw)
        self.stats = {s: torch.zeros(m, dtype=torch.long if s == ARGMAX else ACC, **kw) for s in job.extra_stats}
        self.grad_e = (torch.zeros if job.compact else torch.empty)(m, d, dtype=e.dtype, **kw) if self.need_e else None
        # Written by the first chunk's product (no zero fill of V x D), accumulated by the next ones.
        # Half-precision inputs accumulate the transpose, [D, V] (see _half_weight_grad).
        c_shape = (d, v) if self.half else (v, d)
        self.grad_c = torch.empty(c_shape, dtype=job.accum_dtype, **kw) if self.need_c else None
        self.c_written = False
        self.ctmp = None
        self.grad_b = torch.zeros(v, dtype=self.acc, **kw) if self.need_b else None
        self.sums: dict = {}  # key -> [w, sum_i s_i e_i (D), sum_i s_i]
        self.col_sums: dict = {}  # key -> (c^T w, bias . w), see column_sums
        r = min(job.chunk_size, max(1, job.active_rows.num_rows))
        if self.half:
            # The products take the whole chunk in the input dtype; the kernel sees it a few rows at a
            # time through a small float32 staging buffer, so chunks can be long (fewer passes over
            # the grad_c accumulator) without a [chunk, V] float32 buffer.
            self.hbuf = torch.empty(r, v, dtype=e.dtype, **kw)
            self.stage_rows = min(r, max(MIN_CHUNK, _STAGE_BYTES // (4 * v)))
            self.buf = torch.empty(self.stage_rows, v, dtype=self.acc, **kw)
        else:
            self.buf = torch.empty(r, v, dtype=self.acc, **kw)

    def run(self, row_scale: Tensor | None = None):
        """``row_scale``: ``None`` (values only), a 0-dim tensor (same for every row) or ``[N]``."""
        for sel, rows in self.job.blocks():
            e_c = self.e[sel] if isinstance(sel, slice) else self.e.index_select(0, sel)
            scale = None
            if row_scale is not None:
                r = rows.num_rows
                scale = row_scale.to(ACC).expand(r) if row_scale.dim() == 0 else row_scale[sel].to(ACC)
            (self._half_chunk if self.half else self._chunk)(sel, rows, e_c, scale)
        self._finish_sums()
        return self

    def _kernel(self, z: Tensor, sel, rows: Rows, e_c: Tensor, scale) -> ChunkGrad | None:
        """Run the kernel on one block of logits; store its losses and statistics, return its gradient."""
        res = self.job.kernel(z, rows, scale, _ChunkSource(self, e_c))
        self._put(self.per_row, sel, res.loss)
        for s, out in self.stats.items():
            self._put(out, sel, res.values[s])
        return res.grad

    def _chunk(self, sel, rows: Rows, e_c: Tensor, scale) -> None:
        """A float32/float64 chunk: the kernel works on the logit buffer itself."""
        z = self.buf[: rows.num_rows]
        _logits_into(z, e_c, self.c, self.bias)
        grad = self._kernel(z, sel, rows, e_c, scale)
        if grad is not None:
            self._products(grad.matrix, self._fold_into_matrix(grad, rows), grad.sums, e_c, sel)

    def _half_chunk(self, sel, rows: Rows, e_c: Tensor, scale) -> None:
        """A bfloat16/float16 chunk: logits and gradient in the input dtype, the kernel on float32 blocks of rows."""
        r = rows.num_rows
        h = self.hbuf[:r]
        _logits_into(h, e_c, self.c, self.bias)
        row_factors, sums, factored = [], [], False
        for lo in range(0, r, self.stage_rows):
            part = slice(lo, min(r, lo + self.stage_rows))
            z = self.buf[: part.stop - lo]
            z.copy_(h[part])
            sub_sel = slice(sel.start + lo, sel.start + part.stop) if isinstance(sel, slice) else sel[part]
            sub_rows = rows.select(part)
            grad = self._kernel(z, sub_sel, sub_rows, e_c[part], None if scale is None else scale[part])
            if grad is None:  # values only
                continue
            a = self._fold_into_matrix(grad, sub_rows)
            h[part].copy_(grad.matrix)  # a plain cast: the row factors stay on the [r, D] operands
            factored = factored or a is not None
            row_factors.append(z.new_ones(z.shape[0]) if a is None else a)
            sums.append(grad.sums)
        if not row_factors:
            return
        a = torch.cat(row_factors) if factored else None
        merged = [(torch.cat([s[k][0] for s in sums]), w) for k, (_, w) in enumerate(sums[0])]
        self._products(h, a, merged, e_c, sel)

    def column_sums(self, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(c^T w, bias . w)`` (``w = None``: all ones), computed once per call.

        ``c^T w`` is accumulated in the accumulation dtype, like the logits it stands in for, and
        returned in float64 for the row sums.
        """
        key = None if w is None else id(w)
        entry = self.col_sums.get(key)
        if entry is None:
            cw = _column_weighted_sum(self.c, w, self.acc).to(ACC)
            bw = None
            if self.bias is not None:
                bias = self.bias.to(ACC)
                bw = bias.sum() if w is None else w.to(ACC) @ bias
            entry = self.col_sums[key] = (cw, bw)
        return entry

    @staticmethod
    def _put(out: Tensor, sel, value: Tensor) -> None:
        if isinstance(sel, slice):
            out[sel] = value
        else:
            out.index_copy_(0, sel, value.to(out.dtype))

    def _fold_into_matrix(self, g: ChunkGrad, rows: Rows) -> Tensor | None:
        """Fold the target term into ``g.matrix`` and add the chunk's ``grad_b``.

        Returns the row factors ``a``: the logit gradient is then ``a[:, None] * matrix`` (``a =
        None``: ones) plus the rank-1 terms ``g.sums``, which :meth:`_products` turns into ``grad_e``
        and ``grad_c``.
        """
        G, a, b = g.matrix, g.row_scale, g.target_coef
        if b is not None:
            a = _fold_target_(G, a, b, rows.target)
        if self.need_b:
            if a is None:
                self.grad_b += G.sum(0)
            else:
                self.grad_b.addmv_(G.T, a)
            for s, w in g.sums:
                self._sum_entry(w)[2] += s.sum()
        return a

    def _products(self, op: Tensor, a: Tensor | None, sums, e_c: Tensor, sel) -> None:
        """Add ``a[:, None] * op`` (plus the sum terms) to ``grad_e`` and ``grad_c`` through matrix products.

        ``op`` is in the input dtype; the row factors ``a`` go on the small ``[r, D]`` operands.
        """
        folded = a is None
        if self.need_e:
            ge = self.grad_e[sel] if isinstance(sel, slice) else e_c.new_empty(e_c.shape)
            torch.mm(op, self.c, out=ge)
            if not folded:
                ge.mul_(a[:, None])
            for s, w in sums:
                ge.addr_(s.to(ge.dtype), self.column_sums(w)[0].to(ge.dtype))
            if not isinstance(sel, slice):
                self.grad_e.index_copy_(0, sel, ge)
        if self.need_c:
            rhs = e_c if folded else (e_c * a[:, None]).to(op.dtype)
            if self.half:
                self._half_weight_grad(op, rhs)
            elif self.c_written:
                self.grad_c.addmm_(op.T, rhs)
            else:
                torch.mm(op.T, rhs, out=self.grad_c)
            self.c_written = True
            for s, w in sums:
                self._sum_entry(w)[1].addmv_(e_c.T.to(self.acc), s.to(self.acc))

    def _half_weight_grad(self, op: Tensor, e_c: Tensor) -> None:
        """``grad_c.T += e_c.T @ op``: half-precision products into the transposed accumulator.

        With the CPU's half-precision matrix units, ``e_c.T @ op`` (both operands in row-major
        order, the output ``[D, V]``) runs two to three times faster than ``op.T @ e_c``; the
        accumulator is transposed back once, in :meth:`grads`. CPUs have no half x half -> float32
        product in PyTorch, so a float32 accumulator takes the product over blocks of vocabulary
        columns into a cache-sized half buffer, each block added to it right away (a float32 product
        would forgo the half-precision units).
        """
        lhs = e_c.T.contiguous()
        acc = self.grad_c
        if acc.dtype == op.dtype:
            if self.c_written:
                acc.addmm_(lhs, op)
            else:
                torch.mm(lhs, op, out=acc)
            return
        d, v = acc.shape
        block = _column_block(d, op.dtype)
        if self.ctmp is None:
            self.ctmp = torch.empty(d, min(block, v), dtype=op.dtype, device=op.device)
        for start in range(0, v, block):
            stop = min(v, start + block)
            tmp = self.ctmp[:, : stop - start]
            torch.mm(lhs, op[:, start:stop], out=tmp)
            if self.c_written:
                acc[:, start:stop].add_(tmp)
            else:
                acc[:, start:stop].copy_(tmp)

    def _sum_entry(self, w: Tensor | None):
        key = None if w is None else id(w)
        entry = self.sums.get(key)
        if entry is None:
            d = self.c.shape[1]
            entry = [w, torch.zeros(d, dtype=self.acc, device=self.c.device), torch.zeros((), dtype=self.acc, device=self.c.device)]
            self.sums[key] = entry
        return entry

    def _finish_sums(self) -> None:
        """Sum-like statistics add ``w_j * s_i`` to every logit: one rank-1 update at the end."""
        if self.need_c and not self.c_written:
            self.grad_c.zero_()
        for w, u, total in self.sums.values():
            if self.need_c:
                gc = self.grad_c.T if self.half else self.grad_c  # [V, D] either way
                if w is None:
                    gc += u.to(gc.dtype)
                else:
                    gc.addr_(w.to(gc.dtype), u.to(gc.dtype))
            if self.need_b:
                self.grad_b += total if w is None else total * w.to(self.acc)

    def grads(self):
        """``(grad_e, grad_c, grad_b)`` in the inputs' dtypes; the sweep gives up its buffers."""
        # The chunk buffers go before the accumulator is turned into the gradient, so the two never
        # coexist with them: that moment is the pass's peak for half-precision inputs.
        self.hbuf = self.buf = self.ctmp = None
        gc, self.grad_c = self.grad_c, None
        if gc is not None and self.half:
            gc = _transpose_into(gc, self.c.dtype)
        elif gc is not None and gc.dtype != self.c.dtype:
            gc = gc.to(self.c.dtype)
        gb = self.grad_b
        if gb is not None and gb.dtype != self.bias.dtype:
            gb = gb.to(self.bias.dtype)
        return self.grad_e, gc, gb


def _column_block(rows: int, dtype: torch.dtype) -> int:
    """Columns of a cache-sized ``[rows, block]`` block of ``dtype`` (``_HALF_BLOCK_BYTES``, at least 256)."""
    return max(256, _HALF_BLOCK_BYTES // (dtype.itemsize * rows))


def _transpose_into(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """``acc.T`` (``acc`` is ``[D, V]``) as a contiguous ``[V, D]`` tensor of ``dtype``.

    Cast first, a cache-sized block of columns at a time, then transpose within one dtype: PyTorch
    transposes same-dtype 2-D copies in cache tiles, whereas a casting copy through transposed strides
    walks memory element by element (about 1.6x as long for a float32 ``[1024, 131072]`` accumulator).
    """
    d, v = acc.shape
    out = torch.empty(v, d, dtype=dtype, device=acc.device)
    if acc.dtype == dtype:
        return out.copy_(acc.T)
    block = _column_block(d, dtype)
    tmp = torch.empty(d * min(block, v), dtype=dtype, device=acc.device)
    for start in range(0, v, block):
        stop = min(v, start + block)
        part = tmp[: d * (stop - start)].view(d, stop - start)  # contiguous, so part.T tiles
        part.copy_(acc[:, start:stop])
        out[start:stop].copy_(part.T)
    return out


class _ChunkSource:
    """What a kernel may ask of a chunk besides its logits, answered from ``e`` and ``c`` directly."""

    def __init__(self, sweep: _Sweep, e_c: Tensor):
        self.sweep, self.e_c = sweep, e_c

    def logit_at(self, i: Tensor, j: Tensor) -> Tensor:
        """Raw logits ``z[i_k, j_k]`` of the chunk, one dot product each."""
        sw = self.sweep
        z = (self.e_c[i].to(sw.acc) * sw.c[j].to(sw.acc)).sum(1)
        return z if sw.bias is None else z + sw.bias[j].to(sw.acc)

    def row_sums(self, w: Tensor | None) -> Tensor:
        """``sum_j w_j z_ij`` (float64, ``[r]``) as ``e_i . (c^T w) + bias . w``: no pass over the chunk."""
        cw, bw = self.sweep.column_sums(w)
        sums = self.e_c.to(ACC) @ cw
        return sums if bw is None else sums + bw


class _EagerGradient(torch.autograd.Function):
    """Scalar loss; gradients formed during the forward pass, rescaled in backward."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job, reduction: str):
        need = tuple(ctx.needs_input_grad[:3])
        if reduction == "mean":
            scale = 1.0 / mean_denominator(job.rows, ACC)
        else:
            scale = torch.ones((), dtype=ACC, device=e.device)
        sweep = _Sweep(job, e, c, bias, need).run(scale)
        job.stat_values = sweep.stats
        ctx.grads = sweep.grads()
        return fe.reduce(sweep.per_row, job.rows, reduction, (e.shape[0],), ACC)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "linear_cross_entropy: the eager-gradient path can be differentiated once; for "
                "retain_graph=True use reduction='none' and reduce the result yourself"
            )
        # Scaling allocates nothing and is skipped when the upstream gradient is exactly 1 (loss.backward()).
        if grad.device.type != "cpu" or grad.item() != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(grad.to(g.dtype))
        return (*grads, None, None)


class _Recompute(torch.autograd.Function):
    """Per-row losses; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, e, c, bias, job: Job):
        sweep = _Sweep(job, e, c, bias).run()
        job.stat_values = sweep.stats
        ctx.save_for_backward(e, c, bias)
        ctx.job = job
        return sweep.per_row

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        e, c, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        sweep = _Sweep(ctx.job, e, c, bias, need).run(grad_rows)
        return (*sweep.grads(), None)


def chunked_loss(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    plan: Plan,
    rows: Rows,
    *,
    reduction: str,
    chunk_size: int | None = None,
    extra_stats: tuple = (),
    mode: str = "auto",
    accum_dtype: torch.dtype | None = None,
):
    """The loss of ``e @ c.T + bias`` (``e`` is ``[N, D]``) in float64, and statistics.

    Returns ``(loss, stats)``: ``loss`` is ``[N]`` for ``reduction='none'``, else a scalar;
    ``stats`` maps each of ``extra_stats`` (``LSE``, ``ARGMAX``) to its ``[N]`` values.
    ``mode``: ``"auto"`` (eager gradient for differentiated scalar losses, else recompute), or force
    ``"eager"`` / ``"recompute"`` (``"eager"`` needs a scalar reduction). ``accum_dtype``: dtype of the
    ``grad_c`` accumulator (``None``: float32, float64 for float64 inputs; or the input dtype).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "eager" and reduction == "none":
        raise ValueError("the eager-gradient mode needs reduction='mean' or 'sum'")
    tracked = [t for t in (e, c, bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    accum_dtype = accum_dtype or accumulation_dtype(e.dtype)
    if chunk_size is None:
        summed = accum_dtype if needs_grad and c.requires_grad else None
        chunk_size = default_chunk_size(c.shape[0], c.shape[1], e.dtype, summed)
    job = Job(plan, rows, int(chunk_size), tuple(extra_stats), accum_dtype)
    if not needs_grad:
        with torch.no_grad():
            sweep = _Sweep(job, e, c, bias).run()
        return fe.reduce(sweep.per_row, rows, reduction, (e.shape[0],), ACC), sweep.stats
    if reduction != "none" and mode != "recompute":
        loss = _EagerGradient.apply(e, c, bias, job, reduction)
    else:
        loss = fe.reduce(_Recompute.apply(e, c, bias, job), rows, reduction, (e.shape[0],), ACC)
    return loss, job.stat_values
