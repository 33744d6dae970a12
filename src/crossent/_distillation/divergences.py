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
* ``akl``: sorts the teacher's probabilities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


class _WholeRows(torch.autograd.Function):
    """A whole-row divergence with its closed-form student gradient.

    ``divergence.rows(log_p, log_pt, grad)`` returns the per-row values, or, with ``grad`` (the
    upstream gradient of each row), ``dL/du`` for ``u = z / T``. Only ``z`` and ``t`` are saved (the
    caller holds them anyway); backward recomputes the log-probabilities, so a chunk never holds more
    than a few ``[r, C]`` temporaries (autograd through the formula would keep about ten).
    """

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, divergence):
        ctx.save_for_backward(z, t)
        ctx.divergence = divergence
        return divergence.rows(*divergence.log_probs(z, t))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor):
        z, t = ctx.saved_tensors
        d = ctx.divergence
        grad = d.rows(*d.log_probs(z, t), grad=grad_rows)
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
    """A divergence over whole rows: ``rows(log_p, log_pt, grad=None)`` gives values or ``dL/du``."""

    def log_probs(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log softmax(z / T)`` and ``log softmax(t / T)``."""
        return torch.log_softmax(z * self._a, -1), torch.log_softmax(t * self._a, -1)

    def rows(self, log_p: Tensor, log_pt: Tensor, grad: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def dense_row_loss(self, z, rows):
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
        self.gamma = V.positive("gamma", gamma, who="TTM")


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
    other :math:`\beta` needs whole rows.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__(temperature)
        self.beta = V.real("JSD", "beta", beta, low=0.0, high=1.0)
        self._edge = KL(temperature) if self.beta == 0.0 else ReverseKL(temperature) if self.beta == 1.0 else None

    @property
    def streamable(self):  # type: ignore[override]
        return self._edge is not None

    def statistics(self, rows):
        return self._edge.statistics(rows) if self._edge is not None else ()

    def row_loss(self, s, rows):
        return self._edge.row_loss(s, rows)

    def dense_row_loss(self, z, rows):
        if self._edge is not None:
            return self._edge.dense_row_loss(z, rows)
        return super().dense_row_loss(z, rows)

    def rows(self, log_p: Tensor, log_pt: Tensor, grad: Tensor | None = None) -> Tensor:
        beta = self.beta
        log_m = torch.logaddexp(log_pt + math.log(beta), log_p + math.log1p(-beta))
        p = log_p.exp()
        if grad is None:
            pt = log_pt.exp()
            teacher = _dot(pt, log_pt) - _dot(pt, log_m)
            return beta * teacher + (1 - beta) * (_dot(p, log_p) - _dot(p, log_m))
        # dL/dp_j = (1 - beta)(log p_j - log m_j) =: g_j; through the softmax: p_j (g_j - sum_i p_i g_i).
        g = torch.sub(log_p, log_m, out=log_m)
        g.sub_(_dot(p, g)[:, None]).mul_(p)
        return g.mul_(((1 - beta) * grad).to(g.dtype)[:, None])


class AKL(_WholeRowDivergence):
    r"""Adaptive KL: forward and reverse KL weighted by where the student's error lies.

    Sort the teacher's probabilities in decreasing order; the *head* is the prefix whose cumulative
    probability is at most :math:`\mu` (the top token always belongs to it), the *tail* the rest.
    With :math:`g_H = \sum_{j \in H} |p_{t,j} - \mathrm{sg}(p_j)|` and :math:`g_T` likewise,

    .. math::

        \ell = \frac{g_H}{g_H + g_T} \mathrm{KL}(p_t \| p) + \frac{g_T}{g_H + g_T} \mathrm{KL}(p \| p_t)

    (the weights get no gradient; a row with :math:`g_H + g_T = 0` has :math:`p = p_t` and loss 0).
    Needs whole rows (a sort). Wu et al., *Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models*, 2024.
    """

    def __init__(self, mu: float = 0.5, temperature: float = 1.0):
        super().__init__(temperature)
        self.mu = V.real("AKL", "mu", mu, low=0.0, high=1.0)

    streamable = False

    def head_weight(self, p: Tensor, pt: Tensor) -> Tensor:
        """``g_H / (g_H + g_T)`` per row (0.5 where the student equals the teacher)."""
        pt_sorted, order = pt.sort(-1, descending=True)
        head = pt_sorted.cumsum(-1) <= self.mu
        head[..., 0] = True
        error = pt_sorted.sub_(p.gather(-1, order)).abs_()
        del order
        g_head = torch.where(head, error, 0.0).sum(-1)
        total = error.sum(-1)
        return torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))

    def rows(self, log_p: Tensor, log_pt: Tensor, grad: Tensor | None = None) -> Tensor:
        p, pt = log_p.exp(), log_pt.exp()
        w = self.head_weight(p, pt)
        diff = torch.sub(log_p, log_pt, out=log_pt)  # log p - log p_t
        reverse = _dot(p, diff)  # KL(p || p_t)
        if grad is None:
            return w * -_dot(pt, diff) + (1 - w) * reverse
        # w (p - p_t) + (1 - w) p (log p - log p_t - KL(p || p_t))
        out = diff.sub_(reverse[:, None]).mul_(p).mul_((1 - w)[:, None])
        out.add_(p.sub_(pt).mul_(w[:, None]))
        return out.mul_(grad.to(out.dtype)[:, None])


def make_divergence(name: str, *, temperature: float, beta: float, gamma: float, mu: float) -> Loss:
    """The divergence ``name`` (one of :data:`DIVERGENCES`) with its hyperparameters."""
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
    if name == "akl":
        return AKL(mu, temperature)
    raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(repr(d) for d in DIVERGENCES)}")


__all__ = ["AKL", "DIVERGENCES", "JSD", "KL", "TEACHER", "TTM", "WTTM", "ReverseKL", "make_divergence"]
