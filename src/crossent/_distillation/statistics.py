"""Row statistics of a student's logits against a teacher's: what the streamable divergences read.

The student's logits are the engine's ``z``; the teacher's logits of the same rows travel in
``rows.extra[TEACHER]`` (``[N, C]``; the dense entry point passes them, the row-chunked engine forms
them chunk by chunk), so they are sliced with the rows and read column block by column block like
``z``. Both sides are scaled first: ``u = a z`` (student, ``a = 1 / temperature``) and ``v = k t``
(teacher, ``k = gamma / temperature``); ``p = softmax(u)`` and ``q = softmax(v)``.

Two statistics cover forward KL, reverse KL, TTM and WTTM:

* :class:`ScaledLogSumExp`: ``lse(u)`` or ``lse(v)``; merge by ``logaddexp``.
* :class:`Expectation`: ``E_p[u]``, ``E_p[v]``, ``E_q[u]`` or ``E_q[v]``; state ``(lse of the
  weighting side over the block, the block's expectation under its own softmax)``, merged by
  rescaling both sides onto the merged normaliser (as ``ProbDotLogit``).

Both merge over column blocks, so a divergence written over them streams on any engine that feeds
the teacher's columns beside the student's. Only the student gets a gradient: a statistic of the
teacher alone is not differentiable, and ``d/dz_j`` of the others is

* ``lse(u)``: ``a p_j``;
* ``E_q[u]``: ``a q_j``;
* ``E_p[f]``: ``a p_j (f_j - E_p[f]) + a p_j [f = u]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import ACC, LSE, Statistic, row_logsumexp, softmax_from_lse

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

    def partial(self, z, rows, cols):
        return (row_logsumexp(self.side(self.on, z, rows, cols)),)

    def merge(self, x, y):
        return (torch.logaddexp(x[0], y[0]),)

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
    """``E_w[f] = sum_j softmax(w)_j f_j`` with ``w`` and ``f`` each the scaled student or teacher logits.

    Args:
        under: ``"student"`` (``w = a z``) or ``"teacher"`` (``w = k t``).
        of: ``"student"`` (``f = a z``) or ``"teacher"`` (``f = k t``).
        student_scale: ``a``. teacher_scale: ``k``.
    """

    def __init__(self, under: str, of: str, student_scale: float = 1.0, teacher_scale: float = 1.0):
        self.under, self.of = _check_side("under", under), _check_side("of", of)
        # A side that does not take part keeps scale 1, so equal statistics share one key.
        sides = (under, of)
        super().__init__(student_scale if "student" in sides else 1.0, teacher_scale if "teacher" in sides else 1.0)
        scale = self.a if under == "student" else self.k
        self.requires = (log_sum_exp(under, scale),)

    @property
    def key(self):
        return ("Expectation", self.under, self.of, self.a, self.k)

    @property
    def differentiable(self):  # type: ignore[override]
        return "student" in (self.under, self.of)

    def partial(self, z, rows, cols):
        w = self.side(self.under, z, rows, cols)
        f = w if self.of == self.under else self.side(self.of, z, rows, cols)
        lse = row_logsumexp(w)
        weights = softmax_from_lse(w, lse)
        # A row-by-row dot product: no [N, width] product is formed.
        dot = torch.bmm(weights[:, None, :], f[:, :, None]).reshape(-1)
        return (lse, dot.to(ACC))

    def merge(self, x, y):
        lse = torch.logaddexp(x[0], y[0])
        wx = torch.where(torch.isneginf(x[0]), torch.zeros_like(lse), torch.exp(x[0] - lse))
        wy = torch.where(torch.isneginf(y[0]), torch.zeros_like(lse), torch.exp(y[0] - lse))
        return (lse, wx * x[1] + wy * y[1])

    def finalize(self, state):
        return state[1]

    def add_grad(self, grad, z, coef, values, rows, cols):
        dtype = z.dtype
        if self.under == "teacher":  # of == "student": a q_j
            v = self.side("teacher", z, rows, cols)
            term = softmax_from_lse(v, values[self.requires[0]]).mul_((coef * self.a).to(dtype)[:, None])
            return term if grad is None else grad.add_(term)
        u = self.side("student", z, rows, cols)
        f = u if self.of == "student" else self.side("teacher", z, rows, cols)
        # a p_j (f_j - E_p[f] + [f = u]): the constant folds into one per-row shift.
        shift = values[self] - (1.0 if self.of == "student" else 0.0)
        term = f - shift.to(dtype)[:, None]
        term.mul_(softmax_from_lse(u, values[self.requires[0]])).mul_((coef * self.a).to(dtype)[:, None])
        return term if grad is None else grad.add_(term)


__all__ = ["TEACHER", "ScaledLogSumExp", "Expectation", "log_sum_exp", "teacher_block"]
