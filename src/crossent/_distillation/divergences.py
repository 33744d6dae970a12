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

Which need whole rows (dense and row-chunked engines, autograd through the row):

* ``jsd`` for :math:`0 < \beta < 1`: the mixture :math:`\log(\beta p_t + (1-\beta) p)` needs both
  normalisers before any column is summed (at :math:`\beta \in \{0, 1\}` it is KL / reverse KL and streams);
* ``akl``: sorts the teacher's probabilities.
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


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` per row from whole rows of log-probabilities (autograd)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class _Divergence(Loss):
    """Shared by the divergences: the temperature and the repr."""

    accepts_probs = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = V.positive("temperature", temperature, who=type(self).__name__)

    @property
    def _a(self) -> float:
        return 1.0 / self.temperature


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


class JSD(_Divergence):
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
        log_p = torch.log_softmax(z * self._a, -1)
        log_pt = torch.log_softmax(_teacher_rows(z, rows) * self._a, -1)
        log_m = torch.logaddexp(log_pt + math.log(self.beta), log_p + math.log1p(-self.beta))
        return self.beta * _kl_rows(log_pt, log_m) + (1 - self.beta) * _kl_rows(log_p, log_m)


class AKL(_Divergence):
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

    def dense_row_loss(self, z, rows):
        log_p = torch.log_softmax(z * self._a, -1)
        log_pt = torch.log_softmax(_teacher_rows(z, rows) * self._a, -1)
        with torch.no_grad():
            pt, order = log_pt.exp().sort(-1, descending=True)
            error = (pt - log_p.exp().gather(-1, order)).abs_()
            head = pt.cumsum(-1) <= self.mu
            head[..., 0] = True
            g_head = torch.where(head, error, 0.0).sum(-1)
            total = error.sum(-1)
            w_head = torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))
        return w_head * _kl_rows(log_pt, log_p) + (1 - w_head) * _kl_rows(log_p, log_pt)


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


__all__ = ["DIVERGENCES", "KL", "TTM", "WTTM", "ReverseKL", "JSD", "AKL", "make_divergence", "TEACHER"]
