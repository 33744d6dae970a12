"""Row statistics: reductions over the class axis that can be computed chunk by chunk.

Every statistic states three things (DESIGN.md section 1):

* ``partial(z, rows, cols)``: its state over the columns ``cols`` of each row (``z`` is ``[N, width]``);
* ``merge(a, b)``: the state of two adjacent (or any two disjoint) column chunks combined;
* ``add_grad(grad, z, coef, values, rows, cols)``: ``grad += coef[:, None] * dS/dz`` on those columns,
  given the final values of every statistic of the row.

``compute(z, rows)`` is ``finalize(partial(...))`` over a whole row; it is written with differentiable
torch ops, so the same code also serves as an autograd reference.

A statistic may also declare its :class:`Form`: what it is, in terms a fused engine understands
(``lse``, the target logit, a class-weighted row sum, the sum of squares, the argmax, a tempered
``lse``, ``sum_j p_j z_j``, ``sum_j p_j^k``). The form fixes the value, the derivative and the layout of
the mergeable state, so an engine that knows the form computes the statistic and its gradient term in
its own fused way, without asking which class it is; a statistic without a form takes the generic
path (``partial`` / ``merge`` / ``add_grad``), which every engine also supports.

Precision: the elementwise work runs in the dtype of ``z`` (float32 for half inputs), but every
statistic's value and state is float64. They are only ``[N]`` tensors, and it keeps formulas such as
``lse - z_y`` free of cancellation at large logits (``lse`` of logits near 1e4 has a float32 spacing of
1e-3). The softmax is rebuilt as ``exp(z - hi) * exp(-lo)`` with ``lse = hi + lo`` split into a float32
head and a float64 tail, so it is as accurate as a max-subtracted softmax.

A statistic is a value object: two instances with the same ``key`` are the same statistic and are
computed once, however many terms of a composed loss ask for it.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import torch
from torch import Tensor

from ._rows import Rows, onehot_mask

State = tuple[Tensor, ...]


class Form(enum.Enum):
    """What a statistic is, for fused engines. Each form fixes the value, the derivative and the state.

    The state is what ``partial`` returns over a block of columns (and ``merge`` combines); an engine
    that computes a form's state itself hands it to the statistic's ``merge`` / ``finalize``. The first
    five forms are the terms of :class:`~crossent._engine.plan.Factors`; the last three have no factor
    there (engines that only read ``Factors`` take their generic path) but a kernel can compute them.
    """

    #: ``S = log sum_j exp z_j``; ``dS/dz_j = p_j`` (the softmax of the row). State ``(S,)``.
    LOG_SUM_EXP = "log_sum_exp"
    #: ``S = z_y``; ``dS/dz_j = 1[j = y]``. State ``(z_y or 0,)``.
    TARGET = "target"
    #: ``S = sum_j w_j z_j`` with ``w = stat.column_weights(rows)`` (``None``: ones); ``dS/dz_j = w_j``.
    #: State ``(S,)``.
    COLUMN_SUM = "column_sum"
    #: ``S = sum_j z_j^2``; ``dS/dz_j = 2 z_j``. State ``(S,)``.
    SQUARES = "squares"
    #: ``S = argmax_j z_j`` (first on ties); no derivative. State ``(max_j z_j, argmax_j z_j)``.
    ARGMAX = "argmax"
    #: ``S = t log sum_j exp(u_j)`` with ``u_j = (z_j + m 1[j != y]) / t``, ``t = stat.temperature``,
    #: ``m = stat.margin``; ``dS/dz_j = softmax(u)_j``. State ``(log sum_j exp u_j,)``.
    TEMPERED_LOG_SUM_EXP = "tempered_log_sum_exp"
    #: ``S = sum_j p_j z_j``; ``dS/dz_j = p_j (1 + z_j - S)``. State ``(lse, S)`` over the block.
    PROB_DOT_LOGIT = "prob_dot_logit"
    #: ``S = sum_j p_j^k`` with ``k = stat.power``; ``dS/dz_j = k (p_j^k - p_j S)``. State ``(lse, S)``
    #: over the block.
    SUM_PROB_POWER = "sum_prob_power"


class Statistic:
    """Base class. Subclasses set ``key`` (hashable, includes hyperparameters)."""

    differentiable: ClassVar[bool] = True
    #: statistics whose final values :meth:`add_grad` reads (computed alongside this one).
    requires: tuple[Statistic, ...] = ()

    def form(self, rows: Rows) -> Form | None:
        """The declared :class:`Form` (``None``: no structure a fused engine can use)."""
        return None

    def column_weights(self, rows: Rows) -> Tensor | None:
        """For :attr:`Form.COLUMN_SUM`: the ``[C]`` class vector ``w`` (``None`` stands for ones)."""
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Statistic) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        args = ", ".join(repr(a) for a in self.key[1:])
        return f"{type(self).__name__}({args})"

    # -- value --------------------------------------------------------------------------------
    def partial(self, z: Tensor, rows: Rows, cols: slice) -> State:
        raise NotImplementedError

    def merge(self, a: State, b: State) -> State:
        raise NotImplementedError

    def finalize(self, state: State) -> Tensor:
        return state[0]

    def compute(self, z: Tensor, rows: Rows) -> Tensor:
        return self.finalize(self.partial(z, rows, slice(0, z.shape[-1])))

    # -- derivative ---------------------------------------------------------------------------
    def add_grad(
        self, grad: Tensor | None, z: Tensor, coef: Tensor, values: dict, rows: Rows, cols: slice
    ) -> Tensor:
        """Return ``grad + coef[:, None] * dS/dz`` (``grad`` may be ``None``: start from zero).

        Implementations may update ``grad`` in place and return it.
        """
        raise NotImplementedError


ACC = torch.float64


def row_logsumexp(z: Tensor) -> Tensor:
    """``log sum_j exp z_j`` per row as float64, from a max-subtracted sum in ``z``'s dtype."""
    if z.shape[-1] == 0:
        return torch.full(z.shape[:-1], float("-inf"), dtype=ACC, device=z.device)
    m = z.amax(dim=-1, keepdim=True)
    s = (z - m).exp_().sum(-1)
    return m.squeeze(-1).to(ACC) + torch.log(s.to(ACC))


def softmax_from_lse(z: Tensor, lse: Tensor, power: float = 1.0) -> Tensor:
    """``exp(power * (z - lse))`` in ``z``'s dtype, accurate for any magnitude of ``lse`` (float64)."""
    hi = lse.to(z.dtype)
    lo = lse - hi.to(lse.dtype)
    out = torch.exp((z - hi[:, None]) * power) if power != 1.0 else torch.exp(z - hi[:, None])
    factor = torch.exp(-power * lo).to(z.dtype)[:, None]
    # In place unless autograd is tracing this (the whole-row reference path).
    return out * factor if out.requires_grad else out.mul_(factor)


def _coef(coef: Tensor, z: Tensor) -> Tensor:
    return coef.to(z.dtype)[:, None]


def _accumulate(grad: Tensor | None, term: Tensor) -> Tensor:
    if grad is None:
        return term
    return grad.add_(term)


def _rescaled(la: Tensor, lb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merged log-normaliser and the factors that bring each side's normalised sums onto it."""
    lse = torch.logaddexp(la, lb)
    # A chunk that saw only -inf logits has la = -inf; its weight is exp(-inf) = 0, never NaN.
    wa = torch.where(torch.isneginf(la), torch.zeros_like(la), torch.exp(la - lse))
    wb = torch.where(torch.isneginf(lb), torch.zeros_like(lb), torch.exp(lb - lse))
    return lse, wa, wb


class LogSumExp(Statistic):
    """``lse = log sum_j exp(z_j)``; merge by ``logaddexp``; ``d lse / d z_j = p_j``."""

    def form(self, rows):
        return Form.LOG_SUM_EXP

    def partial(self, z, rows, cols):
        return (row_logsumexp(z),)

    def merge(self, a, b):
        return (torch.logaddexp(a[0], b[0]),)

    def add_grad(self, grad, z, coef, values, rows, cols):
        term = softmax_from_lse(z, values[self]).mul_(_coef(coef, z))
        return _accumulate(grad, term)


class TargetLogit(Statistic):
    """``z_y``; merge by taking the chunk that holds ``y``; ``d z_y / d z_j = 1[j = y]``."""

    def form(self, rows):
        return Form.TARGET if rows.has_indices else None

    def partial(self, z, rows, cols):
        local, inside = onehot_mask(rows, cols, z.shape[-1])
        if z.shape[-1] == 0:
            return (z.new_zeros(z.shape[0], dtype=ACC),)
        picked = z.gather(-1, local[:, None]).squeeze(-1).to(ACC)
        return (torch.where(inside, picked, torch.zeros_like(picked)),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def add_grad(self, grad, z, coef, values, rows, cols):
        if grad is None:
            grad = torch.zeros_like(z)
        local, inside = onehot_mask(rows, cols, z.shape[-1])
        if z.shape[-1]:
            grad.scatter_add_(-1, local[:, None], torch.where(inside, coef, 0.0).to(grad.dtype)[:, None])
        return grad


class Sum(Statistic):
    """``sum_j z_j``; merge by adding; ``d / d z_j = 1``."""

    def form(self, rows):
        return Form.COLUMN_SUM

    def column_weights(self, rows):
        return None

    def partial(self, z, rows, cols):
        return (z.sum(-1).to(ACC),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def add_grad(self, grad, z, coef, values, rows, cols):
        if grad is None:
            return _coef(coef, z).expand_as(z).clone()
        return grad.add_(_coef(coef, z))


class SumSquares(Statistic):
    """``sum_j z_j^2``; merge by adding; ``d / d z_j = 2 z_j``."""

    def form(self, rows):
        return Form.SQUARES

    def partial(self, z, rows, cols):
        return ((z * z).sum(-1).to(ACC),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def add_grad(self, grad, z, coef, values, rows, cols):
        if grad is None:
            return z * _coef(2 * coef, z)
        return grad.addcmul_(z, _coef(2 * coef, z))


class SoftDot(Statistic):
    """``sum_j q_j z_j`` with ``q`` the class-probability target and/or the class weights.

    Args:
        source: ``"probs"`` for ``q = rows.probs`` (``[N, C]``), ``"ones"`` for ``q = 1``.
        class_weighted: multiply ``q`` by ``rows.class_weight`` when there is one.

    ``SoftDot("ones", True)`` is ``sum_j w_j z_j``, the weighted sum label smoothing needs.
    """

    def __init__(self, source: str = "probs", class_weighted: bool = False):
        if source not in ("probs", "ones"):
            raise ValueError(f"SoftDot source must be 'probs' or 'ones', got {source!r}")
        self.source = source
        self.class_weighted = class_weighted

    @property
    def key(self):
        return ("SoftDot", self.source, self.class_weighted)

    def form(self, rows):
        return Form.COLUMN_SUM if self.source == "ones" else None

    def column_weights(self, rows):
        return rows.class_weight if self.class_weighted else None

    def _q(self, rows: Rows, cols: slice, like: Tensor) -> Tensor:
        """``q`` over ``cols``: ``[N, width]`` or ``[width]``."""
        weight = rows.class_weight[cols].to(like.dtype) if (self.class_weighted and rows.class_weight is not None) else None
        if self.source == "probs":
            if rows.probs is None:
                raise ValueError("SoftDot('probs') needs class-probability targets")
            q = rows.probs[:, cols].to(like.dtype)
            return q * weight if weight is not None else q
        return weight if weight is not None else like.new_ones(like.shape[-1])

    def partial(self, z, rows, cols):
        q = self._q(rows, cols, z)
        return (((z @ q) if q.dim() == 1 else (z * q).sum(-1)).to(ACC),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def add_grad(self, grad, z, coef, values, rows, cols):
        q = self._q(rows, cols, z)
        term = _coef(coef, z) * q
        if grad is None:
            return term.expand_as(z).clone()
        return grad.add_(term)


class TemperedLogSumExp(Statistic):
    """``t * log sum_j exp((z_j + margin * 1[j != y]) / t)`` (LDR-KL, margin-tempered losses).

    Merge by ``logaddexp`` of the untempered-scale states; ``dS / d z_j = softmax((z + margin') / t)_j``.
    """

    def __init__(self, temperature: float = 1.0, margin: float = 0.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.margin = float(margin)

    @property
    def key(self):
        return ("TemperedLogSumExp", self.temperature, self.margin)

    def form(self, rows):
        return Form.TEMPERED_LOG_SUM_EXP if (rows.has_indices or not self.margin) else None

    def _scaled(self, z, rows, cols):
        zz = (z + self.margin) / self.temperature if self.margin else z / self.temperature
        if self.margin:
            local, inside = onehot_mask(rows, cols, z.shape[-1])
            if z.shape[-1]:
                shift = inside.to(zz.dtype) * (-self.margin / self.temperature)
                zz = zz.scatter_add(-1, local[:, None], shift[:, None])
        return zz

    def partial(self, z, rows, cols):
        return (row_logsumexp(self._scaled(z, rows, cols)),)

    def merge(self, a, b):
        return (torch.logaddexp(a[0], b[0]),)

    def finalize(self, state):
        return self.temperature * state[0]

    def add_grad(self, grad, z, coef, values, rows, cols):
        soft = softmax_from_lse(self._scaled(z, rows, cols), values[self] / self.temperature)
        if grad is None:
            return soft.mul_(_coef(coef, z))
        return grad.addcmul_(soft, _coef(coef, z))


LSE = LogSumExp()


class ProbDotLogit(Statistic):
    """``sum_j p_j z_j`` (so the entropy is ``lse - p_dot_z``).

    State ``(lse_chunk, sum_j softmax_chunk_j z_j)``; merge rescales both sides onto the merged
    normaliser. ``d / d z_j = p_j (1 + z_j - p_dot_z)``.
    """

    requires = (LSE,)

    def form(self, rows):
        return Form.PROB_DOT_LOGIT

    def partial(self, z, rows, cols):
        lse = row_logsumexp(z)
        return (lse, (softmax_from_lse(z, lse) * z).sum(-1).to(ACC))

    def merge(self, a, b):
        lse, wa, wb = _rescaled(a[0], b[0])
        return (lse, wa * a[1] + wb * b[1])

    def finalize(self, state):
        return state[1]

    def add_grad(self, grad, z, coef, values, rows, cols):
        p = softmax_from_lse(z, values[LSE])
        term = p.mul_(z + (1 - values[self]).to(z.dtype)[:, None]).mul_(_coef(coef, z))
        return _accumulate(grad, term)


class SumProbPower(Statistic):
    """``sum_j p_j^k``; state ``(lse_chunk, sum_j exp(k (z_j - lse_chunk)))``, merged by rescaling.

    ``d / d z_j = k (p_j^k - p_j * sum_i p_i^k)``.
    """

    requires = (LSE,)

    def __init__(self, power: float):
        self.power = float(power)

    @property
    def key(self):
        return ("SumProbPower", self.power)

    def form(self, rows):
        return Form.SUM_PROB_POWER

    def partial(self, z, rows, cols):
        lse = row_logsumexp(z)
        return (lse, softmax_from_lse(z, lse, self.power).sum(-1).to(ACC))

    def merge(self, a, b):
        lse, wa, wb = _rescaled(a[0], b[0])
        return (lse, wa.pow(self.power) * a[1] + wb.pow(self.power) * b[1])

    def finalize(self, state):
        return state[1]

    def add_grad(self, grad, z, coef, values, rows, cols):
        k = self.power
        p = softmax_from_lse(z, values[LSE])
        term = softmax_from_lse(z, values[LSE], k).sub_(p.mul_(values[self].to(z.dtype)[:, None]))
        return _accumulate(grad, term.mul_(_coef(k * coef, z)))


class ArgMax(Statistic):
    """Index of the largest logit (first one on ties); no gradient."""

    differentiable = False

    def form(self, rows):
        return Form.ARGMAX

    def partial(self, z, rows, cols):
        if z.shape[-1] == 0:
            return (z.new_full((z.shape[0],), float("-inf")), torch.zeros(z.shape[0], dtype=torch.long, device=z.device))
        value, index = z.max(dim=-1)
        return (value, index + cols.start)

    def merge(self, a, b):
        take_b = b[0] > a[0]
        return (torch.where(take_b, b[0], a[0]), torch.where(take_b, b[1], a[1]))

    def finalize(self, state):
        return state[1]


TARGET = TargetLogit()
SUM = Sum()
SUMSQ = SumSquares()
P_DOT_Z = ProbDotLogit()
ARGMAX = ArgMax()


def with_requirements(stats) -> list[Statistic]:
    """The statistics and everything their derivatives read, without duplicates, in a stable order."""
    out: dict[Statistic, None] = {}

    def visit(s):
        for r in s.requires:
            visit(r)
        out.setdefault(s, None)

    for s in stats:
        visit(s)
    return list(out)


def merge_states(stat: Statistic, states: list[State]) -> State:
    """Fold the states of several disjoint column chunks into one."""
    acc = states[0]
    for s in states[1:]:
        acc = stat.merge(acc, s)
    return acc


__all__ = [
    "Form", "Statistic", "State", "ACC",
    "LogSumExp", "TargetLogit", "Sum", "SumSquares", "SoftDot", "TemperedLogSumExp", "ProbDotLogit",
    "SumProbPower", "ArgMax",
    "LSE", "TARGET", "SUM", "SUMSQ", "P_DOT_Z", "ARGMAX",
    "row_logsumexp", "softmax_from_lse", "with_requirements", "merge_states",
]  # fmt: skip
