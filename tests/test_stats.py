"""Row statistics: values from their definitions, chunk merges, and elementwise derivatives."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent._rows import Rows
from crossent.stats import (
    ARGMAX,
    LSE,
    P_DOT_Z,
    SUM,
    SUMSQ,
    TARGET,
    SoftDot,
    SumProbPower,
    TemperedLogSumExp,
    merge_states,
    number,
    with_requirements,
)


def make_rows(n, c, *, seed=0, weighted=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=dtype), -1)
    weight = torch.rand(c, generator=g, dtype=dtype) if weighted else None
    return Rows(num_classes=c, target=target, valid=torch.ones(n, dtype=torch.bool), probs=probs, class_weight=weight)


def definition(stat, z, rows):
    """Each statistic straight from its definition (its form, docs/design.md), with materialised softmax."""
    p = torch.softmax(z, -1)
    y = rows.target
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    if stat == LSE:
        return torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1)) + z.max(-1).values
    if stat == TARGET:
        return (z * onehot).sum(-1)
    if stat == SUM:
        return z.sum(-1)
    if stat == SUMSQ:
        return (z**2).sum(-1)
    if isinstance(stat, SoftDot):
        q = rows.probs if stat.source == "probs" else torch.ones_like(z)
        if stat.class_weighted and rows.class_weight is not None:
            q = q * rows.class_weight
        return (q * z).sum(-1)
    if isinstance(stat, TemperedLogSumExp):
        shifted = (z + stat.margin * (1 - onehot)) / stat.temperature
        return stat.temperature * torch.logsumexp(shifted, -1)
    if stat == P_DOT_Z:
        return (p * z).sum(-1)
    if isinstance(stat, SumProbPower):
        return (p**stat.power).sum(-1)
    raise AssertionError(stat)


DIFFERENTIABLE = [
    LSE,
    TARGET,
    SUM,
    SUMSQ,
    SoftDot("probs"),
    SoftDot("probs", class_weighted=True),
    SoftDot("ones", class_weighted=True),
    TemperedLogSumExp(0.5, 0.1),
    TemperedLogSumExp(3.0, 0.0),
    P_DOT_Z,
    SumProbPower(0.7),
    SumProbPower(2.0),
]


def values_for(stat, z, rows):
    return {s: s.compute(z, rows) for s in with_requirements([stat])}


def value(stat, z, rows):
    """The statistic over whole rows as one number per row (anchored pairs summed)."""
    return number(stat, stat.compute(z, rows), rows)


@pytest.mark.parametrize("stat", DIFFERENTIABLE, ids=repr)
@pytest.mark.parametrize("weighted", [False, True])
def test_value_matches_definition(stat, weighted):
    rows = make_rows(6, 11, weighted=weighted)
    z = torch.randn(6, 11, dtype=torch.float64) * 3
    torch.testing.assert_close(value(stat, z, rows), definition(stat, z, rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stat", DIFFERENTIABLE + [ARGMAX], ids=repr)
@settings(max_examples=25, deadline=None)
@given(c=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=4), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_merging_chunks_equals_whole_row(stat, c, cuts, scale):
    rows = make_rows(5, c, weighted=True)
    z = torch.randn(5, c, dtype=torch.float64, generator=torch.Generator().manual_seed(c)) * scale
    bounds = sorted({0, c, *[k for k in cuts if k < c]})
    states = [stat.partial(z[:, a:b], rows, slice(a, b)) for a, b in zip(bounds, bounds[1:])]
    merged = number(stat, stat.finalize(merge_states(stat, states)), rows)
    whole = value(stat, z, rows)
    if stat == ARGMAX:
        assert torch.equal(merged, whole)
    else:
        torch.testing.assert_close(merged, whole, rtol=1e-10, atol=1e-10 * scale)


def test_merge_order_does_not_matter_for_disjoint_chunks():
    rows = make_rows(4, 12)
    z = torch.randn(4, 12, dtype=torch.float64)
    for stat in (LSE, P_DOT_Z, SumProbPower(1.5), ARGMAX):
        a = stat.partial(z[:, :5], rows, slice(0, 5))
        b = stat.partial(z[:, 5:], rows, slice(5, 12))
        torch.testing.assert_close(
            number(stat, stat.finalize(stat.merge(a, b)), rows), number(stat, stat.finalize(stat.merge(b, a)), rows)
        )


def test_argmax_takes_first_of_ties_across_chunks():
    rows = make_rows(1, 4)
    z = torch.tensor([[1.0, 3.0, 0.0, 3.0]])
    states = [ARGMAX.partial(z[:, :2], rows, slice(0, 2)), ARGMAX.partial(z[:, 2:], rows, slice(2, 4))]
    assert ARGMAX.finalize(merge_states(ARGMAX, states)).item() == 1


class _StatWithDerivative(torch.autograd.Function):
    """A statistic whose backward is its declared elementwise derivative (what every engine uses)."""

    @staticmethod
    def forward(ctx, z, stat, rows, cols):
        ctx.save_for_backward(z)
        ctx.stat, ctx.rows, ctx.cols = stat, rows, cols
        return value(stat, z, rows)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        values = values_for(ctx.stat, z, ctx.rows)
        return ctx.stat.add_grad(None, z, grad, values, ctx.rows, ctx.cols), None, None, None


@pytest.mark.parametrize("stat", DIFFERENTIABLE, ids=repr)
def test_derivative_passes_gradcheck(stat):
    rows = make_rows(3, 7, weighted=True)
    z = (torch.randn(3, 7, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _StatWithDerivative.apply(x, stat, rows, slice(0, 7)), (z,))


@pytest.mark.parametrize("stat", DIFFERENTIABLE, ids=repr)
def test_derivative_on_column_chunks_equals_autograd(stat):
    """add_grad on each column chunk, given the merged values, equals autograd on the whole row."""
    rows = make_rows(4, 10, weighted=True)
    z = (torch.randn(4, 10, dtype=torch.float64) * 2).requires_grad_()
    coef = torch.randn(4, dtype=torch.float64)
    (expected,) = torch.autograd.grad((value(stat, z, rows) * coef).sum(), z)
    values = values_for(stat, z.detach(), rows)
    pieces = [
        stat.add_grad(None, z.detach()[:, a:b], coef, values, rows, slice(a, b))
        for a, b in [(0, 3), (3, 4), (4, 10)]
    ]
    torch.testing.assert_close(torch.cat(pieces, -1), expected, rtol=1e-12, atol=1e-12)


def test_add_grad_accumulates_into_an_existing_buffer():
    rows = make_rows(2, 5)
    z = torch.randn(2, 5, dtype=torch.float64)
    coef = torch.ones(2, dtype=torch.float64)
    values = values_for(LSE, z, rows)
    base = torch.full_like(z, 0.5)
    out = TARGET.add_grad(LSE.add_grad(base.clone(), z, coef, values, rows, slice(0, 5)), z, coef, values, rows, slice(0, 5))
    expected = 0.5 + torch.softmax(z, -1) + torch.nn.functional.one_hot(rows.target, 5)
    torch.testing.assert_close(out, expected)


def test_statistics_are_value_objects():
    assert TemperedLogSumExp(1.0, 0.1) == TemperedLogSumExp(1.0, 0.1)
    assert len({SumProbPower(2), SumProbPower(2.0), SumProbPower(3)}) == 2
    assert with_requirements([P_DOT_Z, SUM])[0] == LSE
