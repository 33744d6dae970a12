"""Row statistics: reductions over the class axis that can be computed chunk by chunk.

Every statistic states three things (docs/design.md, "How gradients are formed"):

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
its own fused way, without asking which class it is. A statistic of a pair of logit rows (a student's
and a teacher's) declares a :class:`PairForm` instead. A statistic without either takes the generic
path (``partial`` / ``merge`` / ``add_grad``), which every engine also supports.

Precision: the elementwise work runs in the dtype of ``z`` (float32 for half inputs), but every
statistic's value and state is float64, and values that move with the logits are *anchored*: a value
is either one float64 number per row (``[N]``) or the pair ``(r, x)`` (``[N, 2]``) standing for
``x + d r``, with ``r`` a logit-scale reference of the row (its maximum) and ``d`` the statistic's
:meth:`Statistic.shift`. ``lse`` is the pair ``(max, log sum_j exp(z_j - max))``; column sums are
measured from the row's maximum. A formula that declares itself shift-invariant then reads every value
relative to one anchor per row (:func:`formula_values`), so ``lse - z_y`` is ``log sum - (z_y - max)``
with no cancellation for any finite logits (ties at 1e30 included), and the softmax is rebuilt as
``exp(z - hi) * exp(-lo)`` from the pair (:func:`split_lse`), as accurate as a max-subtracted softmax.

A statistic is a value object: two instances with the same ``key`` are the same statistic and are
computed once, however many terms of a composed loss ask for it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import _validation as V
from ._rows import Rows, onehot_mask

State = tuple[Tensor, ...]


class Form(enum.Enum):
    """What a statistic is, for fused engines. Each form fixes the value, the derivative and the state.

    The state is what ``partial`` returns over a block of columns (and ``merge`` combines); an engine
    that computes a form's state itself hands it to the statistic's ``merge`` / ``finalize``. Every
    form's derivative is a term of :class:`~crossent._engine.plan.Factors`.
    """

    #: ``S = log sum_j exp z_j``; ``dS/dz_j = p_j`` (the softmax of the row). State and value: the
    #: anchored pair ``(max_j z_j, log sum_j exp(z_j - max))`` (``(-inf, -inf)`` for a block of ``-inf``).
    LOG_SUM_EXP = "log_sum_exp"
    #: ``S = z_y``; ``dS/dz_j = 1[j = y]``. State ``(z_y or 0,)``.
    TARGET = "target"
    #: ``S = sum_j w_j z_j`` with ``w = stat.column_weights(rows)`` (``None``: ones); ``dS/dz_j = w_j``.
    #: State ``(r, sum_j w_j (z_j - r), sum_j w_j)`` with ``r`` the block's row maximum (:func:`measured_sum`;
    #: ``(0, S, 0)`` is a plain sum); value: the pair ``(r, x)`` or the plain number ``S``.
    COLUMN_SUM = "column_sum"
    #: ``S = sum_j z_j^2``; ``dS/dz_j = 2 z_j``. State ``(S,)``.
    SQUARES = "squares"
    #: ``S = argmax_j z_j`` (first on ties); no derivative. State ``(max_j z_j, argmax_j z_j)``.
    ARGMAX = "argmax"
    #: ``S = t log sum_j exp(u_j)`` with ``u_j = v_j / t``, ``v_j = z_j + m 1[j != y]``, ``t = stat.temperature``,
    #: ``m = stat.margin``; ``dS/dz_j = softmax(u)_j``. State: ``(max_j v_j, log sum_j exp((v_j - max) / t))``
    #: (the maximum in logit units, so no temperature overflows it); value: ``(max, t * log-sum)``.
    TEMPERED_LOG_SUM_EXP = "tempered_log_sum_exp"
    #: ``S = sum_j p_j z_j``; ``dS/dz_j = p_j (1 + z_j - S)``. State over the block: its ``(max, log-sum)``
    #: pair and ``sum_j p_j (z_j - max)`` with the block's softmax ``p``; value: the pair ``(max, that sum)``.
    PROB_DOT_LOGIT = "prob_dot_logit"
    #: ``S = sum_j p_j^k`` with ``k = stat.power``; ``dS/dz_j = k (p_j^k - p_j S)``. State over the block:
    #: its ``(max, log-sum)`` pair and ``S`` with the block's softmax.
    SUM_PROB_POWER = "sum_prob_power"


@dataclass(frozen=True)
class PairForm:
    """What a statistic of a pair of logit rows is: ``lse(scale * x_side)`` (``of=None``) or ``E_P[f]``.

    The pair is the student's raw logits ``z`` (the engine's, differentiated) and a teacher's ``t``
    over the same classes; ``P = softmax(scale * x_side)`` and ``f = of[0] * z + of[1] * t``. The
    derivatives in ``z``: ``lse`` of the student ``scale * P_j``, of the teacher none; ``E_Q[f]`` under
    the teacher ``of[0] * Q_j``; ``E_P[f]`` under the student ``scale * P_j (f_j - E_P[f]) + of[0] * P_j``.
    """

    side: str
    scale: float
    of: tuple[float, float] | None = None


class Statistic:
    """Base class. Subclasses set ``key`` (hashable, includes hyperparameters)."""

    differentiable: ClassVar[bool] = True
    #: statistics whose final values :meth:`add_grad` reads (computed alongside this one).
    requires: tuple[Statistic, ...] = ()

    def form(self, rows: Rows) -> Form | None:
        """The declared :class:`Form` (``None``: no structure a fused engine can use)."""
        return None

    def pair_form(self) -> PairForm | None:
        """The declared :class:`PairForm` of a statistic of a student's and a teacher's logits (``None``: none)."""
        return None

    def column_weights(self, rows: Rows) -> Tensor | None:
        """For :attr:`Form.COLUMN_SUM`: the ``[C]`` class vector ``w`` (``None`` stands for ones)."""
        raise NotImplementedError

    def shift(self, rows: Rows) -> float | Tensor | None:
        """How the value moves when a constant ``t`` is added to every logit of a row.

        Returns ``d`` with ``S(z + t) = S(z) + d t`` (a number, or one per row), or ``None`` when the
        statistic does not move that way (a sum of squares) or does not say. The default follows the
        form: ``lse`` and the target logit move by ``t``, a column sum by ``sum_j w_j t``, the argmax not.
        An anchored pair value ``(r, x)`` stands for ``x + d r``.
        """
        form = self.form(rows)
        if form in (Form.LOG_SUM_EXP, Form.TARGET, Form.TEMPERED_LOG_SUM_EXP, Form.PROB_DOT_LOGIT):
            return 1.0
        if form is Form.COLUMN_SUM:
            w = self.column_weights(rows)
            return float(rows.num_classes) if w is None else w.to(ACC).sum()
        if form in (Form.ARGMAX, Form.SUM_PROB_POWER):
            return 0.0
        return None

    @property
    def key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Statistic) and self.key == other.key

    def __hash__(self) -> int:
        return V.key_hash(self.key)

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
_NEG_INF = float("-inf")


# -- anchored values -------------------------------------------------------------------------------
def anchored(r: Tensor, x: Tensor) -> Tensor:
    """The pair ``(r, x)`` as one ``[N, 2]`` float64 value, standing for ``x + d r`` (``d``: the shift)."""
    return torch.stack((r.to(ACC), x.to(ACC)), -1)


def number(stat: Statistic, value: Tensor, rows: Rows) -> Tensor:
    """The value as one number per row: ``x + d r`` for an anchored pair, the value itself otherwise."""
    return value if value.dim() < 2 else _absolute(value, stat.shift(rows))


def relative(stat: Statistic, value: Tensor, rows: Rows, anchor: Tensor) -> Tensor:
    """``S - d * anchor`` (``anchor``: one logit-scale number per row), without forming ``S`` first."""
    return _relative(value, stat.shift(rows), anchor)


def _absolute(value: Tensor, d) -> Tensor:
    r, x = value.unbind(-1)
    return x + r if isinstance(d, float) and d == 1.0 else x + d * r


def _relative(value: Tensor, d, anchor: Tensor) -> Tensor:
    unit = isinstance(d, float) and d == 1.0
    if value.dim() < 2:
        if isinstance(d, float) and d == 0.0:
            return value
        return value - anchor if unit else value - d * anchor
    r, x = value.unbind(-1)
    return x + (r - anchor) if unit else x + d * (r - anchor)


def anchor_of(values: dict, rows: Rows) -> Tensor | None:
    """The per-row anchor of :func:`formula_values`: the head of ``lse`` (the row maximum), else the
    target logit; ``None`` when the values hold neither."""
    return _anchor(values, rows)[1]


def _anchor(values: dict, rows: Rows) -> tuple[Statistic | None, Tensor | None]:
    target = None
    for s, v in values.items():
        form = s.form(rows)
        if form is Form.LOG_SUM_EXP:
            return s, (v[:, 0] if v.dim() == 2 else v)
        if form is Form.TARGET and target is None:
            target = (s, v)
    return target if target is not None else (None, None)


def formula_values(values: dict, rows: Rows, shift_invariant: bool) -> dict:
    """The numbers a loss formula reads (``[N]`` per statistic) from the statistics' values.

    A shift-invariant formula (one whose value does not change when a constant is added to every logit
    of a row) reads each value relative to one anchor per row, ``S - d * anchor``: for such a formula
    the result is the same and nothing large cancels, however large the logits. Any other formula, or
    one reading a statistic that does not state its :meth:`~Statistic.shift`, reads the values
    themselves. Non-differentiable statistics (the argmax) pass through.
    """
    if shift_invariant:
        source, anchor = _anchor(values, rows)
        if anchor is not None:
            anchor = anchor.detach()
            out = {}
            for s, v in values.items():
                if not s.differentiable:
                    out[s] = v
                    continue
                d = s.shift(rows)
                if d is None:
                    break
                if s is source and v.dim() == 2 and not v.requires_grad:
                    out[s] = v[:, 1]  # measured from its own head: the tail, exactly
                else:
                    out[s] = _relative(v, d, anchor)
            else:
                return out
    return {s: _absolute(v, s.shift(rows)) if v.dim() == 2 and s.differentiable else v for s, v in values.items()}


# -- log-sum-exp and the softmax ---------------------------------------------------------------------
def row_logsumexp(z: Tensor, peak: Tensor | None = None) -> Tensor:
    """``log sum_j exp z_j`` per row as the anchored pair ``(max, log sum_j exp(z_j - max))``, float64.

    ``peak`` (optional): the row maxima, when already known. A row of ``-inf`` only (or no columns) is
    ``(-inf, -inf)``: it adds nothing when merged with other columns.
    """
    return anchored(*lse_state(z, peak))


def lse_state(z: Tensor, peak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`row_logsumexp` as the state ``(max, log-sum)`` of two float64 ``[N]`` tensors."""
    if z.shape[-1] == 0:
        empty = torch.full(z.shape[:-1], _NEG_INF, dtype=ACC, device=z.device)
        return empty, empty
    m = z.amax(dim=-1) if peak is None else peak.to(z.dtype)
    safe = torch.nan_to_num(m, nan=float("nan"), posinf=float("inf"), neginf=0.0)  # -inf rows: measure from 0
    s = (z - safe[..., None]).exp_().sum(-1)
    return m.to(ACC), torch.log(s.to(ACC))


def merge_lse(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Two ``(max, log-sum)`` states of disjoint columns combined (``-inf`` heads add nothing).

    ``temperature``: the log-sums are of ``exp((z - max) / temperature)`` (the maxima in logit units).
    """
    (ha, ta), (hb, tb) = a, b
    h = torch.maximum(ha, hb)
    if temperature == 1.0:
        ta = torch.where(ha == _NEG_INF, ha, ta + (ha - h))
        tb = torch.where(hb == _NEG_INF, hb, tb + (hb - h))
    else:
        ta = torch.where(ha == _NEG_INF, ha, ta + (ha - h) / temperature)
        tb = torch.where(hb == _NEG_INF, hb, tb + (hb - h) / temperature)
    return h, torch.logaddexp(ta, tb)


def split_lse(lse: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lse = hi + lo``: ``hi`` in ``dtype`` next to ``lse``, ``lo`` the float64 rest.

    ``lse`` is an anchored pair ``(head, tail)`` or a plain number per row. From the pair, ``lo`` is
    ``(head - hi) + tail``: exact however large ``head`` is next to ``tail``.
    """
    if lse.dim() == 2:
        head, tail = lse.unbind(-1)
        hi = (head + tail).to(dtype)
        return hi, (head - hi.to(ACC)) + tail
    hi = lse.to(dtype)
    return hi, lse - hi.to(ACC)


def softmax_from_lse(z: Tensor, lse: Tensor, power: float = 1.0) -> Tensor:
    """``exp(power * (z - lse))`` in ``z``'s dtype, accurate for any magnitude (``lse`` as :func:`split_lse`)."""
    hi, lo = split_lse(lse, z.dtype)
    out = torch.exp((z - hi[:, None]) * power) if power != 1.0 else torch.exp(z - hi[:, None])
    factor = torch.exp(-power * lo).to(z.dtype)[:, None]
    # In place unless autograd is tracing this (the whole-row reference path).
    return out * factor if out.requires_grad else out.mul_(factor)


# -- weighted row sums, measured from the row maximum -------------------------------------------------
def measured_sum(z: Tensor, q: Tensor | None, peak: Tensor | None) -> State:
    """State ``(r, sum_j q_j (z_j - r), sum_j q_j)`` of a block: a weighted row sum measured from ``r``.

    ``q`` is ``[N, width]``, ``[width]`` or ``None`` (ones); ``r`` the row maximum (``peak`` when
    given), or 0 where it is not finite. Measured from the maximum, the sum of a row of near-ties is
    exact (``sum_j z_j`` itself would round at the size of the logits).
    """
    n, width = z.shape[0], z.shape[-1]
    if width == 0:
        zero = torch.zeros(n, dtype=ACC, device=z.device)
        return (zero, zero, zero)
    r = z.detach().amax(-1) if peak is None else peak.to(z.dtype)
    r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite maximum: measure from 0
    diff = z - r[:, None]
    if q is None:
        x, d = diff.sum(-1), torch.full((n,), float(width), dtype=ACC, device=z.device)
    elif q.dim() == 1:
        x, d = diff @ q, q.to(ACC).sum().expand(n)
    else:
        x, d = (diff * q).sum(-1), q.to(ACC).sum(-1)
    return (r.to(ACC), x.to(ACC), d)


def merge_measured(a: State, b: State) -> State:
    """Two :func:`measured_sum` states of disjoint columns, measured from one reference."""
    (ra, xa, da), (rb, xb, db) = a, b
    r = torch.where(da == 0, rb, ra)
    return (r, xa + da * (ra - r) + xb + db * (rb - r), da + db)


def _coef(coef: Tensor, z: Tensor) -> Tensor:
    return coef.to(z.dtype)[:, None]


def _accumulate(grad: Tensor | None, term: Tensor) -> Tensor:
    if grad is None:
        return term
    return grad.add_(term)


def _rescaled(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]):
    """Merged ``(max, log-sum)`` of two chunks and the factors that bring each side's normalised sums onto it."""
    h, t = merge_lse(a, b)

    def weight(side):
        hs, ts = side
        # A chunk that saw only -inf logits has weight exp(-inf) = 0, never NaN.
        return torch.where(hs == _NEG_INF, torch.zeros_like(ts), torch.exp((hs - h) + (ts - t)))

    return (h, t), weight(a), weight(b)


class LogSumExp(Statistic):
    """``lse = log sum_j exp(z_j)`` as the pair ``(max, log sum_j exp(z_j - max))``; ``d lse / d z_j = p_j``.

    State and value are that pair (:func:`row_logsumexp`); chunks merge by :func:`merge_lse`.
    """

    def form(self, rows):
        return Form.LOG_SUM_EXP

    def partial(self, z, rows, cols):
        return lse_state(z, rows.peak)

    def merge(self, a, b):
        return merge_lse(a, b)

    def finalize(self, state):
        return anchored(*state)

    def add_grad(self, grad, z, coef, values, rows, cols):
        # Whole rows: the max-subtracted softmax itself (one rounding less than rebuilding it from lse).
        p = torch.softmax(z, -1) if z.shape[-1] == rows.num_classes else softmax_from_lse(z, values[self])
        return _accumulate(grad, p.mul_(_coef(coef, z)))


class TargetLogit(Statistic):
    """``z_y``; merge by taking the chunk that holds ``y``; ``d z_y / d z_j = 1[j = y]``."""

    def form(self, rows):
        return Form.TARGET if rows.has_indices else None

    def shift(self, rows):
        return 1.0

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
    """``sum_j z_j``, measured from the row maximum (:func:`measured_sum`); ``d / d z_j = 1``."""

    def form(self, rows):
        return Form.COLUMN_SUM

    def column_weights(self, rows):
        return None

    def partial(self, z, rows, cols):
        return measured_sum(z, None, rows.peak)

    def merge(self, a, b):
        return merge_measured(a, b)

    def finalize(self, state):
        return anchored(state[0], state[1])

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

    ``SoftDot("ones", True)`` is ``sum_j w_j z_j``, the weighted sum label smoothing needs. Measured from
    the row maximum (:func:`measured_sum`); it moves by ``sum_j q_j t`` when every logit moves by ``t``.
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

    def shift(self, rows):
        if self.source == "ones":
            return super().shift(rows)
        q = rows.probs.to(ACC)
        if self.class_weighted and rows.class_weight is not None:
            q = q * rows.class_weight.to(ACC)
        return q.sum(-1)

    def _q(self, rows: Rows, cols: slice, like: Tensor) -> Tensor | None:
        """``q`` over ``cols``: ``[N, width]``, ``[width]`` or ``None`` (ones)."""
        weight = rows.class_weight[cols].to(like.dtype) if (self.class_weighted and rows.class_weight is not None) else None
        if self.source == "probs":
            if rows.probs is None:
                raise ValueError("SoftDot('probs') needs class-probability targets")
            q = rows.probs[:, cols].to(like.dtype)
            return q * weight if weight is not None else q
        return weight

    def partial(self, z, rows, cols):
        return measured_sum(z, self._q(rows, cols, z), rows.peak)

    def merge(self, a, b):
        return merge_measured(a, b)

    def finalize(self, state):
        return anchored(state[0], state[1])

    def add_grad(self, grad, z, coef, values, rows, cols):
        q = self._q(rows, cols, z)
        term = _coef(coef, z) if q is None else _coef(coef, z) * q
        if grad is None:
            return term.expand_as(z).clone()
        return grad.add_(term)


def tempered_dtype(dtype: torch.dtype, temperature: float) -> torch.dtype:
    """The dtype in which to divide logit differences by ``temperature``: ``dtype`` itself, or float64
    where ``temperature`` lies outside ``[sqrt(tiny), sqrt(max)]`` of ``dtype``.

    Inside that range neither the temperature nor the products autograd forms with it (``t * p`` and
    ``1 / t`` for probabilities ``p`` down to about ``sqrt(tiny)``) leave the normal numbers of ``dtype``.
    """
    info = torch.finfo(dtype)
    return dtype if math.sqrt(info.tiny) <= temperature <= math.sqrt(info.max) else torch.float64


class TemperedLogSumExp(Statistic):
    """``t * log sum_j exp((z_j + margin * 1[j != y]) / t)`` (LDR-KL, margin-tempered losses).

    State: ``(max_j v_j, log sum_j exp((v_j - max) / t))`` of the margined logits
    ``v = z + margin * 1[j != y]``, merged by :func:`merge_lse` at temperature ``t``; value: the pair
    ``(max, t * log-sum)`` (it moves by ``s`` when every logit moves by ``s``);
    ``dS / d z_j = softmax(v / t)_j``. Only differences ``v_j - max`` are divided by ``t`` (in float64
    where ``t`` is extreme for the logits' dtype, :func:`tempered_dtype`), so no temperature, however
    small or large, overflows: as ``t -> 0`` the value tends to ``max_j v_j`` (the hinge).
    """

    def __init__(self, temperature: float = 1.0, margin: float = 0.0):
        self.temperature = V.positive("temperature", temperature)
        self.margin = V.real(None, "margin", margin)

    @property
    def key(self):
        return ("TemperedLogSumExp", self.temperature, self.margin)

    def form(self, rows):
        return Form.TEMPERED_LOG_SUM_EXP if (rows.has_indices or not self.margin) else None

    def shift(self, rows):
        return 1.0

    def _margined(self, z, rows, cols):
        """``v = z + margin`` off each row's target column, ``z`` itself on it (exactly); in float64 for a
        margin beyond the range of ``z``'s dtype."""
        if not self.margin or not z.shape[-1]:
            return z
        if abs(self.margin) > torch.finfo(z.dtype).max / 4:
            z = z.to(ACC)
        local, inside = onehot_mask(rows, cols, z.shape[-1])
        v = z + self.margin
        column = local[:, None]
        at_target = torch.where(inside[:, None], z.gather(-1, column), v.gather(-1, column))
        return v.scatter(-1, column, at_target)

    def _scaled(self, differences: Tensor) -> Tensor:
        return differences.to(tempered_dtype(differences.dtype, self.temperature)) / self.temperature

    def partial(self, z, rows, cols):
        v = self._margined(z, rows, cols)
        if v.shape[-1] == 0:
            return lse_state(v)
        # The maximum is a constant of the formula (the value does not depend on it): detached.
        peak = v.detach().amax(-1)
        safe = torch.nan_to_num(peak, nan=float("nan"), posinf=float("inf"), neginf=0.0)  # -inf rows: from 0
        total = self._scaled(v - safe[:, None]).exp().sum(-1)
        return peak.to(ACC), torch.log(total.to(ACC))

    def merge(self, a, b):
        return merge_lse(a, b, self.temperature)

    def finalize(self, state):
        return anchored(state[0], self.temperature * state[1])

    def add_grad(self, grad, z, coef, values, rows, cols):
        # softmax(v / t)_j = exp((v_j - r) / t - x / t) for the value (r, x): v_j - r <= 0 and x / t is the
        # log-sum, so nothing overflows whatever t is. r is split as r_hi + r_lo with r_hi in v's dtype
        # (r is a maximum of v, so r_lo is 0 unless the state came from elsewhere).
        value = values[self]
        r, x = value.unbind(-1) if value.dim() == 2 else (value, torch.zeros_like(value))
        v = self._margined(z, rows, cols)
        r_hi = r.to(v.dtype)
        offset = ((r - r_hi.to(ACC)) + x) / self.temperature
        exponent = self._scaled(v - r_hi[:, None])
        soft = exponent.sub_(offset.to(exponent.dtype)[:, None]).exp_().to(z.dtype)
        if grad is None:
            return soft.mul_(_coef(coef, z))
        return grad.addcmul_(soft, _coef(coef, z))


LSE = LogSumExp()


class ProbDotLogit(Statistic):
    """``sum_j p_j z_j`` (so the entropy is ``lse - p_dot_z``); it moves by ``t`` with the logits.

    State ``(max, log-sum, sum_j softmax_chunk_j (z_j - max))``; merge rescales both sides onto the
    merged normaliser. Value: the anchored pair ``(max, sum_j p_j (z_j - max))``.
    ``d / d z_j = p_j (1 + z_j - p_dot_z)``.
    """

    requires = (LSE,)

    def form(self, rows):
        return Form.PROB_DOT_LOGIT

    def shift(self, rows):
        return 1.0

    def partial(self, z, rows, cols):
        lse = row_logsumexp(z, rows.peak)
        head = lse[:, 0]
        # A chunk of -inf only gives NaN here; its weight in any merge is 0.
        x = (softmax_from_lse(z, lse) * (z - head.to(z.dtype)[:, None])).sum(-1).to(ACC)
        return (head, lse[:, 1], x)

    def merge(self, a, b):
        (h, t), wa, wb = _rescaled(a[:2], b[:2])

        def part(side, w):
            hs, xs = side[0], side[2]
            return torch.where(w == 0, torch.zeros_like(xs), w * (xs + (hs - h)))

        return (h, t, part(a, wa) + part(b, wb))

    def finalize(self, state):
        return anchored(state[0], state[2])

    def add_grad(self, grad, z, coef, values, rows, cols):
        p = softmax_from_lse(z, values[LSE])
        pdz = values[self]
        if pdz.dim() == 2:
            head, x = pdz.unbind(-1)
            centred = (z - head.to(z.dtype)[:, None]).sub_((x - 1).to(z.dtype)[:, None])
        else:
            centred = z + (1 - pdz).to(z.dtype)[:, None]
        return _accumulate(grad, p.mul_(centred).mul_(_coef(coef, z)))


class SumProbPower(Statistic):
    """``sum_j p_j^k``; state ``(max, log-sum, sum_j exp(k (z_j - lse_chunk)))``, merged by rescaling.

    It does not move with the logits. ``d / d z_j = k (p_j^k - p_j * sum_i p_i^k)``.
    """

    requires = (LSE,)

    def __init__(self, power: float):
        self.power = float(power)

    @property
    def key(self):
        return ("SumProbPower", self.power)

    def form(self, rows):
        return Form.SUM_PROB_POWER

    def shift(self, rows):
        return 0.0

    def partial(self, z, rows, cols):
        lse = row_logsumexp(z, rows.peak)
        return (lse[:, 0], lse[:, 1], softmax_from_lse(z, lse, self.power).sum(-1).to(ACC))

    def merge(self, a, b):
        (h, t), wa, wb = _rescaled(a[:2], b[:2])
        return (h, t, wa.pow(self.power) * a[2] + wb.pow(self.power) * b[2])

    def finalize(self, state):
        return state[2]

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
    "Form", "PairForm", "Statistic", "State", "ACC",
    "LogSumExp", "TargetLogit", "Sum", "SumSquares", "SoftDot", "TemperedLogSumExp", "ProbDotLogit",
    "SumProbPower", "ArgMax",
    "LSE", "TARGET", "SUM", "SUMSQ", "P_DOT_Z", "ARGMAX",
    "row_logsumexp", "lse_state", "tempered_dtype", "softmax_from_lse", "split_lse", "merge_lse", "measured_sum",
    "merge_measured",
    "anchored", "number", "relative", "anchor_of", "formula_values", "with_requirements", "merge_states",
]  # fmt: skip
