"""Forward / backward loss correction (Patrini et al. 2017) against references written from the formulas."""

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.losses._correction import TargetRowDot, TargetRowLogSumExp
from crossent._rows import Rows
from crossent.stats import number

EPS = 1e-7


def random_T(c, gen, dtype=torch.float64, noise=0.3):
    """A random row-stochastic, well-conditioned transition matrix."""
    m = torch.rand(c, c, generator=gen, dtype=dtype)
    T = (1 - noise) * torch.eye(c, dtype=dtype) + noise * m / m.sum(1, keepdim=True)
    return T


def ref_forward(z, y, T, clip=True, weight=None):
    p = torch.softmax(z, -1)
    if clip:
        p = p.clamp(EPS, 1 - EPS)
    loss = -torch.log((p @ T)[torch.arange(len(y)), y])
    return loss if weight is None else loss * weight[y]


def ref_backward(z, y, T, clip=True, weight=None):
    p = torch.softmax(z, -1)
    if clip:
        p = p.clamp(EPS, 1 - EPS)
    Tinv = torch.linalg.inv(T)
    loss = -(Tinv[y] * torch.log(p)).sum(-1)
    return loss if weight is None else loss * weight[y]


REFS = {"forward_correction": ref_forward, "backward_correction": ref_backward}


def check_value_and_grad(name, clip, dtype, n=7, c=5, scale=3.0, seed=0, weight=None, tol=None):
    gen = torch.Generator().manual_seed(seed)
    T = random_T(c, gen).to(dtype)
    z = (scale * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    loss = xe.losses.get(name, T=T, clip=clip)
    z1 = z.clone().requires_grad_()
    out = xe.cross_entropy(z1, y, loss=loss, reduction="none", weight=weight)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    out.backward(g)
    z2 = z.clone().double().requires_grad_()
    ref = REFS[name](z2, y, T.double(), clip=clip, weight=None if weight is None else weight.double())
    ref.backward(g.double())
    tol = tol or ({torch.float64: 1e-10, torch.float32: 2e-5}[dtype])
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_match_reference(name, clip, dtype):
    check_value_and_grad(name, clip, dtype)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
@pytest.mark.parametrize("clip", [True, False])
def test_class_weights(name, clip):
    weight = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    check_value_and_grad(name, clip, torch.float64, weight=weight)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
def test_clipping_is_active_on_confident_rows(name):
    # scale 30: many probabilities fall below 1e-7, so clipped and unclipped values differ
    check_value_and_grad(name, True, torch.float64, scale=30.0, seed=3)
    check_value_and_grad(name, False, torch.float64, scale=30.0, seed=3)
    # a sparse T (each clean class flips to one other class) so that tiny probabilities matter
    T = 0.9 * torch.eye(5, dtype=torch.float64) + 0.1 * torch.eye(5, dtype=torch.float64).roll(1, 1)
    z = torch.tensor([[30.0, -30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2])
    a = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=T, clip=True), reduction="none")
    b = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=T, clip=False), reduction="none")
    assert (a - b).abs().item() > 1e-3
    if name == "forward_correction":  # q_y >= 1e-7 once clipped: the loss is at most -log(1e-7)
        assert a.item() <= 16.2 < b.item()


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
@pytest.mark.parametrize("clip", [True, False])
def test_identity_T_gives_cross_entropy(name, clip):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (9,), generator=gen)
    out = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=torch.eye(6)))
    (g,) = torch.autograd.grad(out, z)
    ref = F.cross_entropy(z, y)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignore_index_and_reductions(name, reduction):
    gen = torch.Generator().manual_seed(2)
    T = random_T(4, gen)
    z = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, -100, 3, 1, -100, 2])
    out = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=T), reduction=reduction)
    valid = y != -100
    per_row = torch.zeros(6, dtype=torch.float64)
    per_row[valid] = REFS[name](z[valid], y[valid], T)
    expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
def test_probability_targets(name):
    gen = torch.Generator().manual_seed(4)
    T = random_T(4, gen)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), -1)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    out = xe.cross_entropy(z, q, loss=xe.losses.get(name, T=T), weight=w, reduction="none")
    p = torch.softmax(z, -1).clamp(EPS, 1 - EPS)
    if name == "forward_correction":
        ref = -(w * q * torch.log(p @ T)).sum(-1)
    else:
        ref = -(((w * q) @ torch.linalg.inv(T)) * torch.log(p)).sum(-1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(out.sum(), z)[0]
    g2 = torch.autograd.grad(ref.sum(), z)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    # a one-hot probability target is the class-index target
    y = torch.tensor([0, 1, 2, 3, 0])
    a = xe.cross_entropy(z, F.one_hot(y, 4).double(), loss=xe.losses.get(name, T=T), reduction="none")
    b = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=T), reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_correction", "backward_correction"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_extreme_logits_are_finite(name, clip, dtype):
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([1, 2, 0])
    T = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
    out = xe.cross_entropy(z, y, loss=xe.losses.get(name, T=T, clip=clip))
    out.backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()


def test_zero_column_of_T_gives_a_finite_loss():
    T = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # noisy label 1 never occurs
    z = torch.zeros(1, 2, requires_grad=True)
    out = xe.cross_entropy(z, torch.tensor([1]), loss=xe.losses.ForwardCorrection(T))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("stat_name", ["lse", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_statistics_merge_and_gradient_by_chunks(stat_name, dtype):
    """The clip=False statistics computed on column chunks and merged equal the whole row, and their
    chunked elementwise derivatives equal autograd of the whole-row value (float64 reference)."""
    gen = torch.Generator().manual_seed(5)
    c, n = 7, 4
    T = random_T(c, gen)
    T[2, 3] = 0.0  # a zero entry: log T = -inf in one column
    T[2, 2] += T[2].sum().neg() + 1
    stat = TargetRowLogSumExp(torch.log(T).T.contiguous()) if stat_name == "lse" else TargetRowDot(torch.linalg.inv(T))
    z64 = 3 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    z64.requires_grad_()
    rows = Rows(num_classes=c, target=torch.tensor([0, 6, 3, 3]), valid=torch.ones(n, dtype=torch.bool))
    whole_value = stat.compute(z64, rows)
    whole = number(stat, whole_value, rows)
    assert whole.dtype == torch.float64
    z = z64.detach().to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    parts = [stat.partial(z[:, s], rows, s) for s in (slice(0, 3), slice(3, 5), slice(5, 7))]
    merged = number(stat, stat.finalize(stat.merge(stat.merge(parts[0], parts[1]), parts[2])), rows)
    assert merged.dtype == torch.float64  # statistic values are float64 whatever the logits' dtype
    torch.testing.assert_close(merged, whole.detach(), rtol=tol, atol=tol)
    coef = torch.randn(n, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(whole, z64, coef)
    blocks = [stat.add_grad(None, z[:, s], coef, {stat: whole_value.detach()}, rows, s) for s in (slice(0, 4), slice(4, 7))]
    assert blocks[0].dtype == dtype
    torch.testing.assert_close(torch.cat(blocks, 1).double(), g_ref, rtol=tol, atol=tol)


def test_streamable_only_without_clipping():
    T = torch.eye(3)
    assert not xe.losses.ForwardCorrection(T).streamable
    assert xe.losses.ForwardCorrection(T, clip=False).streamable
    assert not xe.losses.BackwardCorrection(T).streamable
    assert xe.losses.BackwardCorrection(T, clip=False).streamable


def test_one_implementation_registry_and_weighting():
    assert xe.weighting.ForwardCorrection is xe.losses.ForwardCorrection
    assert xe.weighting.BackwardCorrection is xe.losses.BackwardCorrection
    assert isinstance(xe.losses.get("forward_correction", T=torch.eye(2)), xe.losses.ForwardCorrection)
    assert {"forward_correction", "backward_correction"} <= set(xe.losses.available())
    assert "2x2" in repr(xe.losses.BackwardCorrection(torch.eye(2)))


@pytest.mark.parametrize("cls", [xe.losses.ForwardCorrection, xe.losses.BackwardCorrection])
def test_bad_transition_matrices(cls):
    with pytest.raises(ValueError, match="square"):
        cls(torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match="square"):
        cls(torch.ones(4) / 4)
    with pytest.raises(ValueError, match="row-stochastic"):
        cls(torch.tensor([[0.5, 0.4], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="non-negative"):
        cls(torch.tensor([[1.2, -0.2], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        cls(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))
    with pytest.raises(TypeError):
        cls("not a matrix")
    with pytest.raises(ValueError, match="3 classes"):
        xe.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), loss=cls(torch.eye(2)))
    assert torch.equal(cls([[1.0, 0.0], [0.0, 1.0]]).T, torch.eye(2, dtype=torch.float32))


def test_singular_T_for_backward_correction():
    with pytest.raises(ValueError, match="singular"):
        xe.losses.BackwardCorrection(torch.full((3, 3), 1 / 3))
    xe.losses.ForwardCorrection(torch.full((3, 3), 1 / 3))  # forward needs no inverse


def test_probability_targets_need_clipping_mode():
    loss = xe.losses.ForwardCorrection(torch.eye(2), clip=False)
    with pytest.raises(ValueError, match="class-index"):
        xe.cross_entropy(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), loss=loss)
