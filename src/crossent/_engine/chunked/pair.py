"""The fused kernel of plans over two logit rows (the student's ``z`` and a teacher's ``t``, same classes).

A statistic of such a plan declares a :class:`~crossent.stats.PairForm`: a log-sum-exp of one side at
a scale, or an expectation under one side's softmax of a linear combination of both sides' logits.
Those two shapes cover forward and reverse KL and transformed teacher matching
(``crossent._distillation``), and fix both the value and the derivative with respect to ``z``, so
:class:`PairKernel` computes every softmax a plan needs once per chunk and the expectations as
row-by-row dot products, and applies the gradient that :meth:`Plan.factors` gives as a few per-row
scaled sums of those softmaxes, ``P (a + b z + c t)``, in place in their buffers.

The library's ``LOG_SUM_EXP`` and ``TARGET`` forms (cross-entropy mixed in) join as the student's
``lse`` at scale 1 and a one-hot term. The plan's logit transforms (a language model head's soft cap
and scale) apply to the student's chunk first; the gradient goes back through them at the end. Any
other plan takes the generic kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._rows import Rows
from ...stats import ACC, Form, PairForm, anchored
from ...transforms import backward_all
from ..plan import OWN, Factors, Plan, SoftmaxOf
from ..softmax import softmax_rows
from .kernels import ChunkResult

SIDES = ("student", "teacher")


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum_j x_ij y_ij`` per row in float64, without an ``[r, C]`` product."""
    return torch.bmm(x[:, None, :], y[:, :, None]).reshape(-1).to(ACC)


class PairKernel:
    """The kernel of a plan whose statistics are all :class:`~crossent.stats.PairForm` s, ``LOG_SUM_EXP`` or ``TARGET``.

    ``teacher_key``: the ``rows.extra`` entry with the second side's logits of the chunk's rows.
    """

    def __init__(self, plan: Plan, teacher_key: str):
        self.plan, self.teacher_key = plan, teacher_key
        by_form = plan.structure.by_form
        self.target = by_form.get(Form.TARGET)
        self.lse = by_form.get(Form.LOG_SUM_EXP)
        pairs = dict(plan.structure.pairs)
        own = PairForm(OWN.side, OWN.scale)  # the library's lse: the student's at scale 1
        self.forms = {s: own if s == self.lse else pairs[s] for s in plan.stats if s in pairs or s == self.lse}
        # Softmaxes kept for the gradient or the expectations; teacher scales read for their lse only need none.
        self.kept = {SoftmaxOf(f.side, f.scale) for f in self.forms.values() if f.of is not None or f.side == "student"}

    @staticmethod
    def supports(plan: Plan) -> bool:
        st = plan.structure
        if not plan.streamable or plan.stateful or st.columns:
            return False
        if any(f not in (Form.LOG_SUM_EXP, Form.TARGET) for f in st.by_form):
            return False
        declared = {*st.by_form.values(), *(s for s, _ in st.pairs)}
        return all(s in declared for s in plan.stats)

    @staticmethod
    def _softmax(x: Tensor, scale: float, keep: bool):
        """``(softmax(scale x) or None, lse(scale x))``: a pass for the maximum, one for the softmax.

        ``lse`` is the anchored float64 pair ``(max, log-sum)``."""
        xs = x * scale if scale != 1.0 else x
        peak, where = xs.max(1)
        if not keep:
            return None, anchored(peak, (xs - peak[:, None]).exp_().sum(1).to(ACC).log())
        p = softmax_rows(xs, None if xs is x else xs)
        # p at the row's maximum lies in [1/C, 1]: its log is well conditioned.
        return p, anchored(peak, -p.gather(1, where[:, None]).squeeze(1).to(ACC).log())

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None) -> ChunkResult:
        raw, cols = z, slice(0, z.shape[1])
        transforms = self.plan.transforms
        if transforms:
            z = self.plan.transform(raw, rows, cols)
        sides = {"student": z, "teacher": rows.extra[self.teacher_key].to(z.dtype)}
        soft: dict = {}
        for f in self.forms.values():
            key = SoftmaxOf(f.side, f.scale)
            if key not in soft:
                soft[key] = self._softmax(sides[f.side], f.scale, key in self.kept)
        values = {}
        for s, f in self.forms.items():
            p, lse = soft[SoftmaxOf(f.side, f.scale)]
            if f.of is None:  # the library's LSE keeps the anchored pair, the pair statistics a number
                values[s] = lse if s == self.lse else lse.sum(-1)
            else:
                values[s] = sum(w * _dot(p, sides[side]) for side, w in zip(SIDES, f.of) if w)
        if self.target is not None:
            values[self.target] = z.gather(1, rows.target[:, None]).squeeze(1).to(ACC)
        loss = self.plan.row_losses(values, rows)
        if row_scale is None:
            return ChunkResult(loss, values)
        f = self.plan.factors(values, self.plan.coefficients(values, rows, row_scale), rows)
        grad = self._grad(f, soft, sides)
        if f.onehot is not None:
            grad.scatter_add_(1, rows.target[:, None], f.onehot.to(z.dtype)[:, None])
        if transforms:
            del sides, soft, z
            grad = backward_all(transforms, grad, raw, rows, cols)
        return ChunkResult(loss, values, grad)

    @staticmethod
    def _grad(f: Factors, soft: dict, sides: dict) -> Tensor:
        """The softmax terms of ``f``, ``P (a + b z + c t)`` per softmax ``P``, written into the softmaxes' buffers."""
        z, t = sides["student"], sides["teacher"]
        grad = None
        for key, term in f.softmaxes.items():
            p = soft[key][0]
            a, b, c = term.const, term.logit, term.teacher
            if b is None and c is None:
                term = p.mul_(a.to(z.dtype)[:, None])
            else:
                term = z * b.to(z.dtype)[:, None] if b is not None else torch.zeros_like(z)
                if c is not None:
                    term.addcmul_(t, c.to(z.dtype)[:, None].expand_as(t))
                if a is not None:
                    term.add_(a.to(z.dtype)[:, None])
                term.mul_(p)
            grad = term if grad is None else grad.add_(term)
        return grad if grad is not None else torch.zeros_like(z)


__all__ = ["PairKernel"]
