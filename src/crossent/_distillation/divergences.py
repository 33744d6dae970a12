r"""The divergences of a student's distribution from a teacher's, as crossent losses.

Notation (per row): student logits :math:`z`, teacher logits :math:`t`, temperature :math:`T`,
:math:`p = \mathrm{softmax}(z / T)` (student), :math:`p_t = \mathrm{softmax}(t / T)` (teacher). The
teacher's logits reach a loss in ``rows.extra`` (:data:`~crossent._distillation.statistics.TEACHER`);
only the student gets a gradient.

Which ones stream (a formula over mergeable statistics, :mod:`.statistics`):

* ``kl``, ``ttm``, ``wttm``: :math:`\mathrm{KL}(q \| p) = E_q[v - u] - \mathrm{lse}(v) + \mathrm{lse}(u)`
  with :math:`u = z/T`, :math:`v = \gamma t / T`, :math:`q = \mathrm{softmax}(v)`; WTTM's weight
  :math:`\sum_j p_{t,j}^\gamma = \exp(\mathrm{lse}(v) - \gamma\, \mathrm{lse}(t/T))`.
* ``reverse_kl``: :math:`E_p[u - v] - \mathrm{lse}(u) + \mathrm{lse}(v)`.

Which need whole rows (dense and row-chunked engines; a closed-form gradient, :class:`_WholeRows`):

* ``jsd`` for :math:`0 < \beta < 1`: the mixture :math:`\log(\beta p_t + (1-\beta) p)` needs both
  normalisers before any column is summed (at :math:`\beta \in \{0, 1\}` it is KL / reverse KL and streams);
* ``akl``: sorts the teacher's probabilities (at :math:`\mu = 1` it is KL and streams).

A masked class (a ``-inf`` logit) has probability 0 and its terms follow :math:`0 \log 0 = 0`, so
a class both sides mask takes no part; one that only one side masks while the other gives it mass
makes a divergence with a :math:`p \log (p / 0)` term ``+inf``. :func:`make_divergence` checks the
hyperparameters; the classes take them as checked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _validation as V
from ..losses._base import Loss
from .statistics import TEACHER, Expectation, log_sum_exp, teacher_block

#: Every divergence name of :func:`crossent.distillation` / :func:`crossent.linear_distillation`.
DIVERGENCES = ("kl", "reverse_kl", "jsd", "ttm", "wttm", "akl")


def _teacher_rows(z: Tensor, rows) -> Tensor:
    """The teacher's whole rows in ``z``'s dtype (whole-row divergences)."""
    return teacher_block(rows, slice(0, z.shape[-1]), z)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum_j x_ij y_ij`` per row, without an ``[N, C]`` product."""
    return torch.bmm(x[:, None, :], y[:, :, None]).reshape(-1)


def _expect(w: Tensor, y: Tensor, *, last_use: bool = False) -> Tensor:
    """``sum_j w_ij y_ij`` per row for probabilities ``w``, where a class of ``w_j = 0`` adds 0.

    ``y`` (a log-ratio) is infinite or NaN at a masked class (a ``-inf`` logit); ``0 * inf`` is 0 in
    a divergence. Under autograd ``y`` is filled out of place, so the gradient there is 0 too, not
    NaN; otherwise, at ``y``'s ``last_use``, in place.
    """
    zero = w == 0
    y = y.masked_fill_(zero, 0.0) if last_use and not y.requires_grad else y.masked_fill(zero, 0.0)
    return _dot(w, y)


def _masked_in_both(log_p: Tensor, log_pt: Tensor) -> Tensor:
    """Classes that both sides mask (a padded vocabulary): they take no part in any divergence."""
    return torch.isneginf(log_p) & torch.isneginf(log_pt)


class _WholeRows(torch.autograd.Function):
    """A whole-row divergence with its closed-form student gradient.

    ``divergence.values(log_p, log_pt)`` gives the per-row values and
    ``divergence.student_grad(log_p, log_pt, grad)`` ``dL/du`` for ``u = z / T`` (``grad``: the upstream
    gradient of each row). Only ``z`` and ``t`` are saved (the caller holds them anyway); backward
    recomputes the log-probabilities, so a chunk never holds more than a few ``[r, C]`` temporaries
    (autograd through the formula would keep about ten).

    Inside a backward that autograd records (``create_graph=True``: ``torch.is_grad_enabled()``), the
    in-place closed form has no graph; the gradient then comes from autograd on ``values`` (the same
    formula), so second derivatives are those of plain autograd, as for every loss on the dense engine.
    """

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, divergence):
        ctx.save_for_backward(z, t)
        ctx.divergence = divergence
        return divergence.values(*divergence.log_probs(z, t))

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        z, t = ctx.saved_tensors
        d = ctx.divergence
        if torch.is_grad_enabled():
            values = d.values(*d.log_probs(z, t))
            (grad,) = torch.autograd.grad(values, z, grad_rows.to(values.dtype), create_graph=True)
            return grad, None, None
        grad = d.student_grad(*d.log_probs(z, t), grad_rows)
        return grad.mul_(d._a), None, None


class _Divergence(Loss):
    """Shared by the divergences: the temperature and the repr."""

    accepts_probs = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = V.positive("temperature", temperature, who=type(self).__name__)

    @property
    def _a(self) -> float:
        return 1.0 / self.temperature



class _WholeRowDivergence(_Divergence):
    """A divergence over whole rows: ``values(log_p, log_pt)`` per row, ``student_grad(...)`` its ``dL/du``.

    Where a hyperparameter makes it a streaming divergence (``_edge``: JSD at beta 0 or 1, AKL at
    mu 1), it is that divergence, and streams.
    """

    _edge: _Divergence | None = None

    @property
    def streamable(self):  # type: ignore[override]
        return self._edge is not None

    def statistics(self, rows):
        return self._edge.statistics(rows) if self._edge is not None else ()

    def row_loss(self, s, rows):
        return self._edge.row_loss(s, rows)

    def log_probs(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log softmax(z / T)`` and ``log softmax(t / T)``."""
        return torch.log_softmax(z * self._a, -1), torch.log_softmax(t * self._a, -1)

    def values(self, log_p: Tensor, log_pt: Tensor) -> Tensor:
        """The per-row divergence, written with out-of-place ops (autograd differentiates it)."""
        raise NotImplementedError

    def student_grad(self, log_p: Tensor, log_pt: Tensor, grad: Tensor) -> Tensor:
        """``grad[:, None] * dL/du`` in closed form, in place in the temporaries (``log_pt`` included)."""
        raise NotImplementedError

    def dense_row_loss(self, z, rows):
        if self._edge is not None:
            return self._edge.dense_row_loss(z, rows)
        return _WholeRows.apply(z, _teacher_rows(z, rows), self)


class KL(_Divergence):
    r"""Forward KL from the teacher: :math:`\mathrm{KL}(p_t \| p) = \sum_j p_{t,j} \log (p_{t,j} / p_j)`.

    Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*, 2015 (without the
    :math:`T^2` factor). Streams over ``lse(z/T)``, ``lse(t/T)`` and ``E_q[(t - z)/T]``.
    """

    #: the power applied to the teacher's probabilities (TTM's gamma; 1 for KD).
    gamma = 1.0
    weighted = False

    def _stats(self):
        a, k = self._a, self.gamma * self._a
        return dict(
            lse_u=log_sum_exp("student", a),
            lse_v=log_sum_exp("teacher", k),
            gap=Expectation("teacher", (-1.0, 1.0), a, k),  # E_q[v - u]
            lse_t=log_sum_exp("teacher", self._a),
        )

    def statistics(self, rows):
        s = self._stats()
        out = [s["lse_u"], s["lse_v"], s["gap"]]
        return tuple(out + [s["lse_t"]] if self.weighted else out)

    def row_loss(self, s, rows):
        st = self._stats()
        kl = s[st["gap"]] - s[st["lse_v"]] + s[st["lse_u"]]
        if not self.weighted:
            return kl
        return torch.exp(s[st["lse_v"]] - self.gamma * s[st["lse_t"]]) * kl


class TTM(KL):
    r"""Transformed teacher matching: :math:`\mathrm{KL}(q \| p)` with :math:`q \propto p_t^\gamma`.

    :math:`q = \mathrm{softmax}(\gamma t / T)`: the teacher at temperature :math:`T/\gamma`, the
    student at :math:`T` (TTM proper: :math:`T = 1`). :math:`\gamma = 1` is :class:`KL`.
    Zheng & Yang, *Knowledge Distillation Based on Transformed Teacher Matching*, ICLR 2024.
    """

    def __init__(self, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__(temperature)
        self.gamma = float(gamma)


class WTTM(TTM):
    r"""Weighted TTM: :math:`U_\gamma(p_t)\, \mathrm{KL}(q \| p)` with :math:`U_\gamma(p_t) = \sum_j p_{t,j}^\gamma`.

    The weight depends on the teacher only (no gradient), so smoother teacher rows count more.
    Zheng & Yang, ICLR 2024.
    """

    weighted = True


class ReverseKL(_Divergence):
    r"""Reverse KL: :math:`\mathrm{KL}(p \| p_t) = \sum_j p_j \log (p_j / p_{t,j})` (mode-seeking).

    Streams over ``lse(z/T)``, ``lse(t/T)`` and ``E_p[(z - t)/T]``. See e.g. Gu et al.,
    *MiniLLM: Knowledge Distillation of Large Language Models*, ICLR 2024.
    """

    def _stats(self):
        a = self._a
        return dict(
            lse_u=log_sum_exp("student", a),
            lse_v=log_sum_exp("teacher", a),
            gap=Expectation("student", (1.0, -1.0), a, a),  # E_p[u - v]
        )

    def statistics(self, rows):
        return tuple(self._stats().values())

    def row_loss(self, s, rows):
        st = self._stats()
        return s[st["gap"]] - s[st["lse_u"]] + s[st["lse_v"]]


class JSD(_WholeRowDivergence):
    r"""Generalised Jensen-Shannon divergence with the teacher's share :math:`\beta`.

    .. math::

        \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p_t \| m) + (1 - \beta)\, \mathrm{KL}(p \| m),
        \qquad m = \beta p_t + (1 - \beta) p

    At :math:`\beta = 0` it is :class:`KL` and at :math:`\beta = 1` :class:`ReverseKL` (the convention
    of Agarwal et al., *On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes* (GKD), ICLR 2024, which Liger-Kernel's fused JSD follows); those two stream, every
    other :math:`\beta` needs whole rows. Finite wherever either side has mass (:math:`m > 0` there).
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__(temperature)
        self.beta = float(beta)
        self._edge = KL(temperature) if self.beta == 0.0 else ReverseKL(temperature) if self.beta == 1.0 else None

    def _log_mixture(self, log_p: Tensor, log_pt: Tensor) -> Tensor:
        """``log m = log(beta p_t + (1 - beta) p)``."""
        if log_p.requires_grad:
            # logaddexp(-inf, -inf) is -inf but its derivative is NaN (0 * NaN stays NaN): a class both
            # sides mask is measured from 0 instead; the divergence drops it anyway (weight 0).
            both = _masked_in_both(log_p, log_pt)
            log_p, log_pt = log_p.masked_fill(both, 0.0), log_pt.masked_fill(both, 0.0)
        return torch.logaddexp(log_pt + math.log(self.beta), log_p + math.log1p(-self.beta))

    def values(self, log_p: Tensor, log_pt: Tensor) -> Tensor:
        log_m = self._log_mixture(log_p, log_pt)
        teacher = _expect(log_pt.exp(), log_pt - log_m, last_use=True)
        student = _expect(log_p.exp(), log_p - log_m, last_use=True)
        return self.beta * teacher + (1 - self.beta) * student

    def student_grad(self, log_p: Tensor, log_pt: Tensor, grad: Tensor) -> Tensor:
        # dL/dp_j = (1 - beta)(log p_j - log m_j) =: g_j; through the softmax: p_j (g_j - sum_i p_i g_i).
        p = log_p.exp()
        log_m = self._log_mixture(log_p, log_pt)
        g = torch.sub(log_p, log_m, out=log_m)
        g.masked_fill_(p == 0, 0.0)  # a class the student masks: g is -inf or NaN there, p_j = 0
        g.sub_(_dot(p, g)[:, None]).mul_(p)
        return g.mul_(((1 - self.beta) * grad).to(g.dtype)[:, None])


class AKL(_WholeRowDivergence):
    r"""Adaptive KL: forward and reverse KL weighted by where the student's error lies.

    Sort the teacher's probabilities in decreasing order; the *head* is the top token and every
    further token whose cumulative probability (itself included) is at most :math:`\mu` times the
    row's total, the *tail* the rest. With :math:`g_H = \sum_{j \in H} |p_{t,j} - \mathrm{sg}(p_j)|`
    and :math:`g_T` likewise,

    .. math::

        \ell = \frac{g_H}{g_H + g_T} \mathrm{KL}(p_t \| p) + \frac{g_T}{g_H + g_T} \mathrm{KL}(p \| p_t)

    (the weights get no gradient; a row with :math:`g_H + g_T = 0` has :math:`p = p_t` and loss 0; a
    term of weight 0 adds 0 even where it is infinite). This is ``get_ratio`` of the authors' code
    (wutaiqiang/LLM_KD_AKL): head = ``cumsum <= mu`` with the top token always in it. Two deviations,
    both at the edges: the cumulative sums are compared with :math:`\mu` times their own last value
    (the row's float total, which may round above 1), so :math:`\mu = 1` puts every token in the head:
    it is :class:`KL` exactly (and streams), where the authors' float ``cumsum`` ends above 1 and
    leaves a few tokens in the tail; and a masked class (``-inf`` logit) has probability 0, where
    ``get_ratio`` fills infinite logits with 0 first. :math:`\mu = 0` (like any :math:`\mu` below the
    top probability) makes the top token the whole head. Needs whole rows (a sort). Wu et al.,
    *Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models*, 2024.
    """

    def __init__(self, mu: float = 0.5, temperature: float = 1.0):
        super().__init__(temperature)
        self.mu = float(mu)
        self._edge = KL(temperature) if self.mu == 1.0 else None

    def head_weight(self, p: Tensor, pt: Tensor) -> Tensor:
        """``g_H / (g_H + g_T)`` per row (0.5 where the student equals the teacher); no gradient."""
        pt_sorted, order = pt.detach().sort(-1, descending=True)
        cumulative = pt_sorted.cumsum(-1)
        head = cumulative <= self.mu * cumulative[..., -1:]
        head[..., 0] = True
        error = pt_sorted.sub_(p.detach().gather(-1, order)).abs_()
        del order, cumulative
        g_head = torch.where(head, error, 0.0).sum(-1)
        total = error.sum(-1)
        return torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))

    def values(self, log_p: Tensor, log_pt: Tensor) -> Tensor:
        p, pt = log_p.exp(), log_pt.exp()
        w = self.head_weight(p, pt)
        diff = log_p - log_pt
        reverse = _expect(p, diff)  # KL(p || p_t)
        forward = -_expect(pt, diff, last_use=True)  # KL(p_t || p)
        # A term of weight 0 adds 0, also where it is infinite (a class one side masks).
        return torch.where(w > 0, w * forward, 0.0) + torch.where(w < 1, (1 - w) * reverse, 0.0)

    def student_grad(self, log_p: Tensor, log_pt: Tensor, grad: Tensor) -> Tensor:
        # w (p - p_t) + (1 - w) p (log p - log p_t - KL(p || p_t))
        p, pt = log_p.exp(), log_pt.exp()
        w = self.head_weight(p, pt)
        diff = torch.sub(log_p, log_pt, out=log_pt)  # log p - log p_t
        reverse = _expect(p, diff, last_use=True)  # diff is now 0 where p_j = 0 (a masked class)
        out = diff.sub_(reverse[:, None]).mul_(p)
        # A row of w = 1 has no reverse term, also where its reverse KL is infinite.
        out.mul_((1 - w)[:, None]).masked_fill_((w == 1)[:, None], 0.0)
        out.add_(p.sub_(pt).mul_(w[:, None]))
        return out.mul_(grad.to(out.dtype)[:, None])


def make_divergence(name: str, *, temperature: float, beta: float, gamma: float, mu: float) -> Loss:
    """The divergence ``name`` (one of :data:`DIVERGENCES`) with its hyperparameters.

    Every hyperparameter is checked here, also those ``name`` does not read: ``beta=3`` next to
    ``"kl"`` is a mistake (the divergence name left out?), not a no-op.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(repr(d) for d in DIVERGENCES)}")
    beta = V.real(None, "beta", beta, low=0.0, high=1.0)
    gamma = V.positive("gamma", gamma)
    mu = V.real(None, "mu", mu, low=0.0, high=1.0)
    if name == "kl":
        return KL(temperature)
    if name == "reverse_kl":
        return ReverseKL(temperature)
    if name == "jsd":
        return JSD(beta, temperature)
    if name == "ttm":
        return TTM(gamma, temperature)
    if name == "wttm":
        return WTTM(gamma, temperature)
    return AKL(mu, temperature)


__all__ = ["AKL", "DIVERGENCES", "JSD", "KL", "TEACHER", "TTM", "WTTM", "ReverseKL", "make_divergence"]
