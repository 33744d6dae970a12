"""Declared structure: statistics' forms and transforms' affine structure drive every fused path.

A new statistic or transform declares its structure in its own class and every engine takes the fast
path it allows; one that declares nothing takes the generic path; both agree with the dense engine.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import crossent as xe
from crossent._engine.chunked.kernels import FactoredKernel, PlanKernel, WholeRowKernel, make_kernel
from crossent._engine.plan import LOGIT_GRAD_FORMS, Plan
from crossent._rows import index_rows, prob_rows
from crossent.losses import Loss
from crossent.stats import (
    ARGMAX, LSE, P_DOT_Z, SUM, SUMSQ, TARGET, Form, SoftDot, Statistic, SumProbPower, TemperedLogSumExp,
)  # fmt: skip
from crossent.transforms import Affine, ClassBias, Softcap, Tanh, Temperature, Transform

C = 11


def _rows(n=7, weight=None):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, C, (n,), generator=g)
    t[1] = -100
    return index_rows(t, C, -100, weight)


def test_builtin_forms():
    rows = _rows(weight=torch.rand(C, dtype=torch.float64))
    assert LSE.form(rows) is Form.LOG_SUM_EXP and TARGET.form(rows) is Form.TARGET
    assert SUM.form(rows) is Form.COLUMN_SUM and SUM.column_weights(rows) is None
    weighted = SoftDot("ones", class_weighted=True)
    assert weighted.form(rows) is Form.COLUMN_SUM and weighted.column_weights(rows) is rows.class_weight
    assert SUMSQ.form(rows) is Form.SQUARES and ARGMAX.form(rows) is Form.ARGMAX
    assert SoftDot("probs").form(rows) is None
    # Forms whose Factors terms only the Triton kernels apply: Plan.logit_grad goes statistic by statistic.
    tempered = TemperedLogSumExp(0.5, 0.2)
    assert P_DOT_Z.form(rows) is Form.PROB_DOT_LOGIT and SumProbPower(2.0).form(rows) is Form.SUM_PROB_POWER
    assert tempered.form(rows) is Form.TEMPERED_LOG_SUM_EXP
    plan = Plan(xe.losses.get("ngce") + xe.losses.get("ldr_kl"), rows)
    forms = {Form.LOG_SUM_EXP, Form.TARGET, Form.SUM_PROB_POWER, Form.TEMPERED_LOG_SUM_EXP}
    assert plan.structure.factored and not plan.structure.generic and set(plan.structure.by_form) == forms
    assert not plan.structure.only(*LOGIT_GRAD_FORMS)
    assert dict(plan.structure.forms)[SumProbPower(0.7)] is Form.SUM_PROB_POWER
    # A statistic without a form (a probability-weighted sum) has no Factors term: Plan.factors says so.
    soft = Plan(xe.losses.CrossEntropy(), prob_rows(torch.softmax(torch.randn(7, C), 1), None))
    assert not soft.structure.factored and soft.structure.generic == (SoftDot("probs", True),)
    with pytest.raises(ValueError, match=r"SoftDot\('probs', True\).*has no declared form"):
        soft.factors({}, {}, rows)


def test_builtin_transform_structures_compose():
    b = torch.linspace(-1, 1, C)
    assert Temperature(2.0).structure() == Affine(0.5)
    assert isinstance(Softcap(3.0).structure(), Tanh)
    plan = Plan(xe.losses.Transformed(xe.losses.get("ce"), ClassBias(b), Temperature(0.5)), _rows())
    affine = plan.structure.affine
    assert affine.scale == 2.0
    torch.testing.assert_close(affine.shift, b.double() * 2.0)
    assert Plan(xe.losses.get("ce"), _rows(), (Softcap(3.0),)).structure.affine is None


class Offset(Transform):
    """``z + b``; declares itself affine unless ``declared=False``."""

    def __init__(self, b, declared=True):
        self.b, self.declared = b, declared

    @property
    def key(self):
        return ("Offset", id(self.b), self.declared)

    def forward(self, z, rows, cols):
        return z + self.b[cols].to(z.dtype)

    def backward_(self, grad, z, rows, cols):
        return grad

    def structure(self):
        return Affine(1.0, self.b) if self.declared else None


class PriorSum(Statistic):
    """``sum_j prior_j z_j``; declares a column sum unless ``declared=False`` (then it has ``add_grad``)."""

    def __init__(self, prior, declared=True):
        self.prior, self.declared = prior, declared

    @property
    def key(self):
        return ("PriorSum", id(self.prior), self.declared)

    def form(self, rows):
        return Form.COLUMN_SUM if self.declared else None

    def column_weights(self, rows):
        return self.prior

    def partial(self, z, rows, cols):
        return ((z @ self.prior[cols].to(z.dtype)).double(),)

    def merge(self, a, b):
        return (a[0] + b[0],)

    def add_grad(self, grad, z, coef, values, rows, cols):
        term = coef.to(z.dtype)[:, None] * self.prior[cols].to(z.dtype)
        return term.expand_as(z).clone() if grad is None else grad.add_(term)


class PriorCE(Loss):
    def __init__(self, stat):
        self.stat = stat

    def statistics(self, rows):
        return (LSE, TARGET, self.stat)

    def row_loss(self, s, rows):
        return 1.1 * s[LSE] - s[TARGET] - 0.1 * s[self.stat]


PRIOR = torch.softmax(torch.randn(C, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
SHIFT = torch.linspace(-2, 1, C, dtype=torch.float64)


@pytest.mark.parametrize(
    "stat_declared,transform_declared,kernel",
    [(True, True, FactoredKernel), (False, True, PlanKernel), (True, False, PlanKernel), (False, False, PlanKernel)],
)
def test_declarations_choose_the_kernel_and_every_path_agrees(stat_declared, transform_declared, kernel):
    loss = xe.losses.Transformed(PriorCE(PriorSum(PRIOR, stat_declared)), Offset(SHIFT, transform_declared))
    rows = _rows()
    assert type(make_kernel(Plan(loss, rows))) is kernel
    g = torch.Generator().manual_seed(2)
    e = torch.randn(7, 5, generator=g, dtype=torch.float64)
    c = torch.randn(C, 5, generator=g, dtype=torch.float64)
    results = []
    for path in ("linear", "dense"):
        le, lc = e.clone().requires_grad_(), c.clone().requires_grad_()
        if path == "linear":
            out = xe.linear_cross_entropy(le, lc, rows.target.masked_fill(~rows.valid, -100), loss=loss, chunk_size=3)
        else:
            out = xe.cross_entropy(le @ lc.T, rows.target.masked_fill(~rows.valid, -100), loss=loss)
        out.backward()
        results.append((out.detach(), le.grad, lc.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_whole_row_losses_take_the_autograd_kernel():
    assert type(make_kernel(Plan(xe.losses.get("nfl"), _rows()))) is WholeRowKernel


@pytest.mark.parametrize("name", ["ce", "squentropy", "focal", "z_loss", "sce"])
@pytest.mark.parametrize("transforms", ["none", "affine", "softcap"])
def test_factored_gradient_equals_the_statistic_by_statistic_one(name, transforms):
    """``Plan.logit_grad`` through ``Factors`` equals the generic ``add_grad`` sum, on blocks of columns too."""
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    rows = _rows(weight=weight)
    extra = {"none": (), "affine": (Temperature(1.7), ClassBias(SHIFT)), "softcap": (Softcap(2.5),)}[transforms]
    plan = Plan(xe.losses.Transformed(xe.losses.get(name), *extra) if extra else xe.losses.get(name), rows)
    assert plan.structure.factored
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, C, generator=g, dtype=torch.float64) * 3
    values = plan.statistics(plan.transform(z, rows, slice(0, C)), rows)
    coefs = plan.coefficients(values, rows, torch.rand(7, generator=g, dtype=torch.float64))
    factored = torch.cat([plan.logit_grad(z[:, s], rows, values, coefs, s) for s in (slice(0, 4), slice(4, C))], 1)
    whole = plan.logit_grad(z, rows, values, coefs, slice(0, C))
    generic = object.__new__(Plan)
    generic.__dict__.update(plan.__dict__)
    generic.structure = type(plan.structure)({}, (), tuple(s for s in plan.stats if s.differentiable), None)
    want = generic.logit_grad(z, rows, values, coefs, slice(0, C))
    torch.testing.assert_close(factored, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole, want, rtol=1e-10, atol=1e-12)


class EntropyCE(Loss):
    """CE plus an entropy term: reads ``sum_j p_j z_j`` (``Form.PROB_DOT_LOGIT``)."""

    def statistics(self, rows):
        return (LSE, TARGET, P_DOT_Z)

    def row_loss(self, s, rows):
        return s[LSE] - s[TARGET] + 0.3 * (s[LSE] - s[P_DOT_Z])


def _read_factors(f, plan, z, t, rows):
    """``Factors`` applied on whole rows term by term, as their definition reads (a reference)."""

    def col(x):
        return x[:, None]

    onehot = torch.nn.functional.one_hot(rows.target, C).to(z.dtype)
    grad = torch.zeros_like(z)
    for key, term in f.softmaxes.items():
        p = torch.softmax(key.scale * (z if key.side == "student" else t), 1)
        for factor, x in ((term.const, 1.0), (term.logit, z), (term.teacher, t)):
            if factor is not None:
                grad += p * col(factor) * x
    if f.prob_power is not None:
        grad += col(f.prob_power) * torch.softmax(z, 1) ** f.power
    if f.tempered is not None:
        stat = plan.structure.by_form[Form.TEMPERED_LOG_SUM_EXP]
        grad += col(f.tempered) * torch.softmax((z + stat.margin * (1 - onehot)) / stat.temperature, 1)
    if f.onehot is not None:
        grad += col(f.onehot) * onehot
    for term in f.columns:
        grad += col(term.coef) * (1.0 if term.weights is None else term.weights)
    if f.linear is not None:
        grad += col(f.linear) * z
    return grad


def _pair_loss(divergence):
    from crossent._distillation.arguments import build_loss

    return build_loss(divergence, temperature=2.0, beta=0.5, gamma=0.8, mu=0.5, ce_weight=0.5, has_target=True)


@pytest.mark.parametrize("name", ["ngce+ldr_kl", "entropy", "squentropy", "smoothing", "kl", "reverse_kl", "ttm", "wttm"])
def test_factors_of_every_form_equal_the_statistic_by_statistic_gradient(name):
    """``Plan.factors`` fills one term per declared form, pair forms included; read as defined, they
    give ``sum_S dL/dS dS/dz``, which each statistic's ``add_grad`` gives on its own."""
    from crossent._distillation.statistics import TEACHER

    g = torch.Generator().manual_seed(4)
    z = torch.randn(7, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(7, C, generator=g, dtype=torch.float64) * 2
    rows = _rows(weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    rows = replace(rows, extra={TEACHER: t})
    loss = {
        "ngce+ldr_kl": lambda: xe.losses.get("ngce") + xe.losses.get("ldr_kl"),
        "entropy": EntropyCE,
        "squentropy": lambda: xe.losses.get("squentropy"),
        "smoothing": lambda: xe.losses.CrossEntropy(0.1),
    }.get(name, lambda: _pair_loss(name))()
    plan = Plan(loss, rows)
    assert plan.structure.factored and bool(plan.structure.pairs) == (name in ("kl", "reverse_kl", "ttm", "wttm"))
    values = plan.statistics(z, rows)
    coefs = plan.coefficients(values, rows, torch.rand(7, generator=g, dtype=torch.float64))
    want = None
    for s in plan.stats:
        if s in coefs:
            want = s.add_grad(want, z.clone(), coefs[s], values, rows, slice(0, C))
    got = _read_factors(plan.factors(values, coefs, rows), plan, z, t, rows)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
