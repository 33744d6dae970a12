"""The dense path against torch.nn.functional.cross_entropy and against formulas written out by hand.

Tolerances: float64 1e-12 relative, float32 1e-6 relative, each element compared relative to itself
and, for elements near zero (a gradient entry that cancels to ~0), to the largest entry of the tensor
or of the upstream gradient when every entry cancels to ~0, as in a one-class row); a loss value is
compared relative to itself and to the largest |logit| (``lse - z_y`` of a confident row cancels: both
libraries round ``lse`` at the scale of the logits);
bfloat16/float16 compare with PyTorch run on the same half-precision input within the spacing of the
output dtype (both accumulate in float32, then round once).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe

RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def assert_close(actual, expected, floor=0.0):
    rtol = RTOL[expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, floor))


def value_and_grad(fn, x, target, upstream_dtype=None, **kw):
    """Value and input gradient, with a fixed random upstream gradient for unreduced outputs."""
    x = x.detach().clone().requires_grad_()
    out = fn(x, target, **kw)
    upstream = None
    if out.dim():
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        upstream = upstream.to(upstream_dtype or out.dtype).to(out.dtype)
    (g,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), g


def upstream_scale(out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).abs().max().item() if out.dim() else 1.0


@st.composite
def ce_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    c = draw(st.integers(1, 12))
    layout = draw(st.sampled_from(["NC", "C", "NCd", "NCdd"]))
    n = draw(st.integers(0, 6))
    shape = {"NC": (n, c), "C": (c,), "NCd": (n, c, 3), "NCdd": (max(n, 1), c, 2, 2)}[layout]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 10.0]))
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    soft = draw(st.booleans())
    if soft:
        target = torch.softmax(torch.randn(shape, generator=g), 1 if len(shape) > 1 else 0).to(dtype)
        ignore_index = -100
    else:
        tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        target = torch.randint(0, c, tshape, generator=g)
        ignore_index = draw(st.sampled_from([-100, 0, c - 1]))
        if target.numel() and draw(st.booleans()):
            target.view(-1)[0] = ignore_index
    weight = (torch.rand(c, generator=g).to(dtype) * 2 - 0.5) if draw(st.booleans()) else None  # either sign, as PyTorch
    kw = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.7])),
    )
    return x, target, kw


@settings(max_examples=300, deadline=None)
@given(ce_cases())
def test_matches_torch_cross_entropy(case):
    x, target, kw = case
    expected = F.cross_entropy(x, target, **kw)
    if kw["reduction"] == "mean" and torch.isnan(expected):
        # Zero counted rows: PyTorch's 0/0. crossent returns 0.0 with zero gradient, by design.
        out, g = value_and_grad(xe.cross_entropy, x, target, **kw)
        assert out.item() == 0.0 and torch.all(g == 0)
        return
    ref, ref_g = value_and_grad(F.cross_entropy, x, target, **kw)
    out, g = value_and_grad(xe.cross_entropy, x, target, **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, floor=x.abs().max().item() if x.numel() else 0.0)
    assert_close(g, ref_g, floor=upstream_scale(out) if out.numel() else 0.0)


def ce_by_hand(x, y, *, weight=None, eps=0.0, z_loss=0.0, softcap=None):
    """Mean CE written from its formula on materialised log-probabilities (class indices)."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    c = x.shape[-1]
    w = torch.ones(c, dtype=x.dtype) if weight is None else weight
    nll = -logp.gather(-1, y[:, None]).squeeze(-1) * w[y]
    smooth = -(logp * w).sum(-1)
    rows = (1 - eps) * nll + eps / c * smooth + z_loss * torch.logsumexp(x, -1) ** 2 * w[y]
    return rows.sum() / w[y].sum()


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("z_loss", [0.0, 0.3])
def test_softcap_and_z_loss_match_the_formula_in_float64(softcap, z_loss):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 9, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.randint(0, 9, (7,), generator=g)
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    kw = dict(weight=w, label_smoothing=0.2, z_loss=z_loss, softcap=softcap)
    out = xe.cross_entropy(x, y, **kw)
    ref = ce_by_hand(x, y, weight=w, eps=0.2, z_loss=z_loss, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: xe.cross_entropy(t, y, reduction="none", **kw), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_half_precision_is_the_float64_result_rounded(dtype, reduction):
    """Half inputs accumulate in float32 and round once at the end.

    The reference is PyTorch in float64 on the same (exactly representable) inputs, rounded to the
    half dtype; crossent must be within two units of the output's spacing of it. (PyTorch's own float16
    mean overflows to inf on this case; crossent does not.)
    """
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 300, generator=g) * 5).to(dtype)
    y = torch.randint(0, 300, (64,), generator=g)
    out, grad = value_and_grad(xe.cross_entropy, x, y, reduction=reduction, label_smoothing=0.1)
    ref, ref_grad = value_and_grad(
        F.cross_entropy, x.double(), y, upstream_dtype=dtype, reduction=reduction, label_smoothing=0.1
    )
    assert out.dtype == dtype and grad.dtype == dtype
    spacing = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=2 * spacing, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2 * spacing, atol=2 * spacing * ref_grad.abs().max().item())


def test_half_precision_is_closer_to_float64_than_a_half_computation():
    """Accumulation runs in float32: the bf16 result is the float64 one rounded once."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(16, 5000, generator=g) * 3).to(torch.bfloat16)
    y = torch.randint(0, 5000, (16,), generator=g)
    exact = F.cross_entropy(x.double(), y, reduction="none")
    out = xe.cross_entropy(x, y, reduction="none").double()
    assert torch.all((out - exact).abs() <= exact.abs() * 2**-8 + 1e-6)


# -- stability -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]]),
        torch.zeros(3, 3),
        torch.full((3, 3), 7.5),
    ],
    ids=["extreme", "zeros", "equal"],
)
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.3}, {"z_loss": 1e-4}, {"softcap": 30.0}], ids=str)
def test_extreme_and_flat_rows_stay_finite(x, kw):
    y = torch.tensor([1, 0, 2])
    out, g = value_and_grad(xe.cross_entropy, x, y, reduction="none", **kw)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    if not kw:
        torch.testing.assert_close(out, F.cross_entropy(x, y, reduction="none"))


def test_single_class_and_huge_vocab():
    x = torch.randn(4, 1)
    out, g = value_and_grad(xe.cross_entropy, x, torch.zeros(4, dtype=torch.long))
    assert out.item() == 0.0 and torch.all(g == 0)
    x = torch.randn(3, 100_000)
    y = torch.tensor([0, 50_000, 99_999])
    ref, ref_g = value_and_grad(F.cross_entropy, x, y)
    out, g = value_and_grad(xe.cross_entropy, x, y)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, ref_g)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_and_all_ignored(reduction):
    for x, y in [(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), (torch.randn(3, 5), torch.full((3,), -100))]:
        out, g = value_and_grad(xe.cross_entropy, x, y, reduction=reduction)
        assert torch.isfinite(out).all() and torch.all(out == 0) and torch.all(g == 0)
    w = torch.zeros(5)
    out, g = value_and_grad(xe.cross_entropy, torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=w)
    assert out.item() == 0.0 and torch.all(g == 0)


# -- errors ----------------------------------------------------------------------------------


def test_out_of_range_target_names_value_and_position():
    with pytest.raises(ValueError, match=r"target value 7 at position 2 .*\[0, 5\).*ignore_index \(-100\)"):
        xe.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"target value -1 at position \(1, 0\)"):
        xe.cross_entropy(torch.randn(2, 5, 3), torch.tensor([[0, 1, 2], [-1, 0, 0]]))


@pytest.mark.parametrize(
    "x, y, kw, err, msg",
    [
        (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), {}, ValueError, "target must have shape"),
        (torch.randint(0, 3, (4, 5)), torch.zeros(4, dtype=torch.long), {}, TypeError, "floating-point logits"),
        (torch.randn(4, 5), torch.rand(4, 4), {}, ValueError, "shape of input"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {"weight": torch.tensor([1.0, float("nan"), 1, 1, 1])}, ValueError, r"weight\[1\] = nan"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {"weight": torch.ones(4)}, ValueError, "5 class weights"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction must be"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), {"loss": "nope"}, ValueError, "unknown loss 'nope'"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.bool), {}, TypeError, "integer class indices"),
        (torch.tensor(1.0), torch.tensor(0), {}, ValueError, "class dimension"),
    ],
)
def test_bad_input_gets_a_clear_error(x, y, kw, err, msg):
    with pytest.raises(err, match=msg):
        xe.cross_entropy(x, y, **kw)


# -- losses as objects -------------------------------------------------------------------------


def test_composition_by_sum_and_scale():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (5,))
    combo = xe.losses.CrossEntropy() + 0.5 * xe.losses.ZLoss(2.0)
    out = xe.cross_entropy(x, y, loss=combo)
    ref = F.cross_entropy(x, y) + (torch.logsumexp(x, -1) ** 2).mean()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref, x)[0])
    assert repr(combo) == "CrossEntropy(label_smoothing=0.0) + 0.5 * ZLoss(scale=2.0)"


def test_registry():
    assert {"ce", "z_loss"} <= set(xe.losses.available())
    assert xe.losses.get("ce", label_smoothing=0.2).label_smoothing == 0.2
    with pytest.raises(TypeError):
        xe.losses.get("ce", gamma=2)


def test_transformed_loss_equals_ce_on_transformed_logits():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (4,))
    bias = torch.log(torch.rand(7, dtype=torch.float64))
    loss = xe.losses.Transformed(xe.losses.CrossEntropy(), xe.transforms.Temperature(2.0), xe.transforms.ClassBias(bias))
    out = xe.cross_entropy(x, y, loss=loss)
    ref = F.cross_entropy(x / 2.0 + bias, y)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(ref, x)[0])


def test_probability_target_with_gradient_falls_back_to_autograd():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1).requires_grad_()
    out = xe.cross_entropy(x, q, label_smoothing=0.1)
    ref = F.cross_entropy(x, q, label_smoothing=0.1)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (x, q)), torch.autograd.grad(ref, (x, q))):
        torch.testing.assert_close(a, b)


def test_module_matches_functional_and_moves_weight():
    w = torch.rand(6) + 0.1
    crit = xe.nn.CrossEntropy(weight=w, label_smoothing=0.1, reduction="sum")
    x, y = torch.randn(5, 6), torch.randint(0, 6, (5,))
    torch.testing.assert_close(crit(x, y), F.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction="sum"))
    assert "weight" in dict(crit.named_buffers())
    crit.double()
    assert crit(x.double(), y).dtype == torch.float64


def test_mean_of_nothing_is_zero_not_nan():
    assert not math.isnan(xe.cross_entropy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)).item())
