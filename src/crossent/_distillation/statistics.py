"""Row statistics of a student's logits against a teacher's: what the streamable divergences read.

The student's logits are the engine's ``z``; the teacher's logits of the same rows travel in
``rows.extra[TEACHER]`` (``[N, C]``; the dense entry point passes them, the row-chunked engine forms
them chunk by chunk), so they are sliced with the rows and read column block by column block like
``z``. Both sides are scaled first: ``u = a z`` (student, ``a = 1 / temperature``) and ``v = k t``
(teacher, ``k = gamma / temperature``); ``p = softmax(u)`` and ``q = softmax(v)``.

Two statistics cover forward KL, reverse KL, TTM and WTTM:

* :class:`ScaledLogSumExp`: ``lse(u)`` or ``lse(v)``; state ``(max, log-sum)``, merged as ``LSE``'s.
* :class:`Expectation`: ``E_p[f]`` or ``E_q[f]`` of ``f = cs u + ct v``; state ``(lse of the
  weighting side over the block, the block's expectation under its own softmax)``, merged by
  rescaling both sides onto the merged normaliser (as ``ProbDotLogit``). One exponential per
  element.

Both merge over column blocks, so a divergence written over them streams on any engine that feeds
the teacher's columns beside the student's. Both declare a :class:`~crossent.stats.PairForm`, from
which :meth:`Plan.factors <crossent._engine.plan.Plan.factors>` forms their gradient and the
row-chunked engine's fused pair kernel (:mod:`crossent._engine.chunked.pair`) computes them in a few
passes per chunk. Only the student gets a gradient: a statistic of the teacher alone is not
differentiable, and ``d/dz_j`` of the others is

* ``lse(u)``: ``a p_j``;
* ``E_q[f]``: ``cs a q_j``;
* ``E_p[f]``: ``a p_j (f_j - E_p[f] + cs)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import ACC, LSE, PairForm, Statistic, lse_state, merge_lse, softmax_from_lse

#: ``rows.extra`` key of the teacher's logits (``[N, C]``, any floating dtype, no gradient).
TEACHER = "teacher_logits"
SIDES = ("student", "teacher")


def teacher_block(rows, cols: slice, like: Tensor) -> Tensor:
    """The teacher's raw logits of ``cols`` in ``like``'s dtype."""
    t = rows.extra.get(TEACHER)
    if t is None:
        raise ValueError("a distillation statistic needs the teacher's logits; use crossent.distillation")
    return t[:, cols].to(like.dtype)


def _check_side(name: str, side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"{name} must be one of {SIDES}, got {side!r}")
    return side


class _Scaled(Statistic):
    """Shared by both statistics: the scales and the scaled logits of each side."""

    def __init__(self, student_scale: float, teacher_scale: float):
        self.a, self.k = float(student_scale), float(teacher_scale)

    def side(self, which: str, z: Tensor, rows, cols: slice) -> Tensor:
        if which == "student":
            return z * self.a if self.a != 1.0 else z
        t = teacher_block(rows, cols, z)
        return t * self.k if self.k != 1.0 else t


class ScaledLogSumExp(_Scaled):
    """``lse(a z)`` (``side="student"``) or ``lse(k t)`` (``side="teacher"``, no gradient)."""

    def __init__(self, side: str, scale: float):
        self.on = _check_side("side", side)
        super().__init__(scale, scale)

    @property
    def key(self):
        return ("ScaledLogSumExp", self.on, self.a)

    @property
    def differentiable(self):  # type: ignore[override]
        return self.on == "student"

    def pair_form(self) -> PairForm:
        return PairForm(self.on, self.a)

    def partial(self, z, rows, cols):
        return lse_state(self.side(self.on, z, rows, cols))

    def merge(self, x, y):
        return merge_lse(x, y)

    def finalize(self, state):
        # One number per row: the divergences read it as it is (it declares no shift to anchor by).
        head, tail = state
        return head + tail

    def add_grad(self, grad, z, coef, values, rows, cols):
        u = self.side("student", z, rows, cols)
        term = softmax_from_lse(u, values[self]).mul_((coef * self.a).to(z.dtype)[:, None])
        return term if grad is None else grad.add_(term)


def log_sum_exp(side: str, scale: float) -> Statistic:
    """``lse`` of one scaled side; the student's at scale 1 is the library's ``LSE`` (computed once)."""
    if side == "student" and scale == 1.0:
        return LSE
    return ScaledLogSumExp(side, scale)


class Expectation(_Scaled):
    """``E_w[f] = sum_j softmax(w)_j f_j`` with ``w`` one scaled side and ``f = cs * (a z) + ct * (k t)``.

    Args:
        under: ``"student"`` (``w = a z``) or ``"teacher"`` (``w = k t``).
        of: ``(cs, ct)``, the weights of the scaled student and teacher logits in ``f``.
        student_scale: ``a``. teacher_scale: ``k``.

    ``KL(q || p) = E_q[v - u] - lse(v) + lse(u)`` reads ``Expectation("teacher", (-1, 1))``.
    """

    def __init__(self, under: str, of: tuple, student_scale: float = 1.0, teacher_scale: float = 1.0):
        self.under = _check_side("under", under)
        self.cs, self.ct = (float(w) for w in of)
        # A side that does not take part keeps scale 1, so equal statistics share one key.
        uses_student = under == "student" or self.cs != 0.0
        uses_teacher = under == "teacher" or self.ct != 0.0
        super().__init__(student_scale if uses_student else 1.0, teacher_scale if uses_teacher else 1.0)
        self.requires = (log_sum_exp(under, self.a if under == "student" else self.k),)

    @property
    def key(self):
        return ("Expectation", self.under, self.cs, self.ct, self.a, self.k)

    @property
    def differentiable(self):  # type: ignore[override]
        return self.under == "student" or self.cs != 0.0

    def pair_form(self) -> PairForm:
        return PairForm(self.under, self.a if self.under == "student" else self.k, (self.cs * self.a, self.ct * self.k))

    def _f(self, w: Tensor, z: Tensor, rows, cols: slice) -> Tensor:
        """``f`` over ``cols`` as a new tensor (``w``: the weighting side, reused when ``f`` is it)."""
        x = {self.under: w}
        for side, weight in (("student", self.cs), ("teacher", self.ct)):
            if weight and side not in x:
                x[side] = self.side(side, z, rows, cols)
        if self.cs and self.ct:
            if self.ct == 1.0:
                return torch.add(x["teacher"], x["student"], alpha=self.cs)
            return torch.add(x["student"] * self.cs, x["teacher"], alpha=self.ct)
        if self.cs or self.ct:
            side, weight = ("student", self.cs) if self.cs else ("teacher", self.ct)
            return x[side] * weight
        return torch.zeros_like(w)

    def partial(self, z, rows, cols):
        w = self.side(self.under, z, rows, cols)
        if w.shape[-1] == 0:
            empty = torch.full(w.shape[:-1], float("-inf"), dtype=ACC, device=w.device)
            return (empty, torch.zeros_like(empty))
        peak = w.amax(-1, keepdim=True)
        # A block whose weighting side is all -inf (masked classes) weighs nothing: measure it from 0.
        weights = (w - torch.nan_to_num(peak, nan=float("nan"), neginf=0.0)).exp_()
        total = weights.sum(-1).to(ACC)
        # A class of weight 0 adds 0 whatever f is there: a masked class (-inf logit) has f = +-inf.
        f = self._f(w, z, rows, cols).masked_fill_(weights == 0, 0.0)
        # A row-by-row dot product: no second [N, width] product is formed.
        dot = torch.bmm(weights[:, None, :], f[:, :, None]).reshape(-1).to(ACC)
        mean = torch.where(total > 0, dot / total, torch.zeros_like(dot))
        return (peak.squeeze(-1).to(ACC) + total.log(), mean)

    def merge(self, x, y):
        lse = torch.logaddexp(x[0], y[0])
        wx = torch.where(torch.isneginf(x[0]), torch.zeros_like(lse), torch.exp(x[0] - lse))
        wy = torch.where(torch.isneginf(y[0]), torch.zeros_like(lse), torch.exp(y[0] - lse))
        return (lse, wx * x[1] + wy * y[1])

    def finalize(self, state):
        return state[1]

    def add_grad(self, grad, z, coef, values, rows, cols):
        dtype = z.dtype
        w = self.side(self.under, z, rows, cols)
        soft = softmax_from_lse(w, values[self.requires[0]])
        if self.under == "teacher":  # cs a q_j
            term = soft.mul_((coef * self.cs * self.a).to(dtype)[:, None])
        else:  # a p_j (f_j - E_p[f] + cs), 0 where p_j = 0 (f_j may be infinite there: a masked class)
            term = self._f(w, z, rows, cols).sub_((values[self] - self.cs).to(dtype)[:, None])
            term.mul_(soft).masked_fill_(soft == 0, 0.0).mul_((coef * self.a).to(dtype)[:, None])
        return term if grad is None else grad.add_(term)


__all__ = ["TEACHER", "Expectation", "ScaledLogSumExp", "log_sum_exp", "teacher_block"]
