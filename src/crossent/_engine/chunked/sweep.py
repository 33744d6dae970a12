"""One pass of the row-chunked engine over the rows: per-row losses, reported statistics, gradients.

A :class:`Job` is everything about a call that autograd does not track (plan, rows, kernel, options);
a :class:`Sweep` runs it once over ``e`` and ``c``: for each chunk of rows a producer
(:mod:`.chunks`) forms the logits and runs the kernel, the results are recorded, and the gradient
operands go to :class:`~crossent._engine.chunked.gradients.Gradients`.

A stateful loss observes each row in the first sweep of a call only; the observations are kept on the
job's row selection, so a recompute sweep in backward reads them instead of observing again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._rows import Rows, compute_dtype
from ...stats import ACC, Form, number
from ..options import tuning
from ..plan import Plan
from .chunks import FloatChunks, HalfChunks
from .gradients import ChunkSource, ColumnSums, Gradients
from .kernels import ChunkResult, make_kernel
from .selection import RowSelection, expand_scale


class Job:
    """The untracked half of one call: plan, kernel, row selection, accumulator dtype, reported statistics.

    ``kernel(plan, report)`` builds the chunk kernel (``None``: :func:`~.kernels.make_kernel`; an engine
    may bring its own, as the vocabulary-parallel one does).

    Attributes:
        row_weight: ``[N]`` per-row factors of the loss (float64, detached), or ``None``.
        denominator: the ``mean`` divisor given by the caller (0-dim), or ``None``.
        tuning: the engine's :class:`~crossent._engine.options.Tuning` when the call started (every
            sweep of the call, backward ones included, uses it).
    """

    def __init__(
        self, plan: Plan, rows: Rows, chunk_size: int, accum_dtype: torch.dtype, report=(), kernel=None,
        row_weight: Tensor | None = None, denominator: Tensor | None = None,
    ):  # fmt: skip
        self.row_weight = None if row_weight is None else row_weight.detach().to(ACC)
        self.denominator = denominator
        self.report = tuple(report)
        self.plan = plan.with_statistics(self.report, rows)
        self.kernel = (kernel or make_kernel)(self.plan, self.report)
        # Ignored rows contribute nothing; they are visited only when their statistics are reported.
        self.selection = RowSelection(rows, chunk_size, keep_all=bool(self.report))
        self.accum_dtype = accum_dtype
        self.observed = not self.plan.stateful
        self.tuning = tuning()

    @property
    def rows(self) -> Rows:
        return self.selection.rows

    def weighted(self, per_row: Tensor) -> Tensor:
        """``per_row`` times the row weights (as it is without them)."""
        return per_row if self.row_weight is None else per_row * self.row_weight


class Sweep:
    """One pass over the rows of ``e`` (``[N, D]``) against ``c`` (``[V, D]``) and ``bias``.

    ``need``: which of ``(e, c, bias)`` get gradients. After :meth:`run`: ``per_row`` (``[N]`` float64
    weighted losses, zero on skipped rows), ``stats`` (``{stat: [N] values}`` of the reported
    statistics), and :meth:`grads`.
    """

    def __init__(self, job: Job, e: Tensor, c: Tensor, bias: Tensor | None, need=(False, False, False)):
        self.job, self.e = job, e
        compute = compute_dtype(e.dtype)
        half = e.dtype != compute
        n, v, device = e.shape[0], c.shape[0], e.device
        # Per-row values are float64 like the statistics (``[N]`` only), as in the dense engine.
        self.per_row = torch.zeros(n, dtype=ACC, device=device)
        self.stats = {
            s: torch.zeros(n, dtype=torch.long if s.form(job.rows) is Form.ARGMAX else ACC, device=device)
            for s in job.report
        }
        self.column_sums = ColumnSums(c, bias, compute, job.plan.structure.columns)
        self.gradients = Gradients(
            e, c, bias, self.column_sums, need=need, accum_dtype=job.accum_dtype, half=half,
            compact=job.selection.compact, tuning=job.tuning,
        )  # fmt: skip
        r = min(job.selection.chunk_size, max(1, job.selection.num_active))
        if half:
            self.chunks = HalfChunks(r, v, e.dtype, compute, device, job.tuning.stage_bytes)
        else:
            self.chunks = FloatChunks(r, v, compute, device)
        self._observe_rows = not job.observed
        self._observations: dict = {}

    def run(self, row_scale: Tensor | None = None) -> Sweep:
        """``row_scale``: ``None`` (values only), a 0-dim tensor (same for every row) or ``[N]``."""
        job, selection = self.job, self.job.selection
        for sel, part, rows in selection.chunks():
            e_c = selection.gather(self.e, sel)
            scale = expand_scale(row_scale, sel, rows.num_rows, ACC)
            source = ChunkSource(e_c, self.column_sums)
            kernel = self._observing(job.kernel, part.start) if self._observe_rows else job.kernel
            ops = self.chunks.run(sel, rows, e_c, scale, kernel, source, self._record, self.gradients)
            if ops is not None:
                self.gradients.add(*ops, e_c, sel)
        if self._observe_rows:
            selection.add_extra(self._observations)
            job.plan.commit(selection.active)
            job.observed = True
        return self

    def _observing(self, kernel, start: int):
        """``kernel`` preceded by the plan's observation of each block of whole rows (stateful losses).

        Producers run the kernel on consecutive blocks of the chunk, from active row ``start`` on.
        """
        plan = self.job.plan
        n_active = self.job.selection.num_active
        offset = start

        def run(z, rows, scale, source):
            nonlocal offset
            block = slice(offset, offset + rows.num_rows)
            offset += rows.num_rows
            observed = plan.observe(z, rows)
            for k, v in observed.extra.items():
                if k not in rows.extra:
                    buf = self._observations.get(k)
                    if buf is None:
                        buf = self._observations[k] = v.new_zeros((n_active, *v.shape[1:]))
                    buf[block] = v
            return kernel(z, observed, scale, source)

        return run

    def _record(self, sel, rows: Rows, res: ChunkResult) -> None:
        RowSelection.put(self.per_row, sel, res.loss)
        for s, out in self.stats.items():
            RowSelection.put(out, sel, number(s, res.values[s], rows))

    def grads(self):
        """``(grad_e, grad_c, grad_bias)`` in the inputs' dtypes; the sweep gives up its buffers.

        The chunk buffers go before the accumulator is turned into the gradient, so the two never
        coexist with them: that moment is the pass's peak for half-precision inputs.
        """
        self.chunks.release()
        return self.gradients.finish()
