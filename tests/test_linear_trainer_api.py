"""The trainer-facing options of crossent.linear_cross_entropy: normalizer, sample_weight, the float32
loss of half inputs, per-row entropy / z-loss / predicted token, and the shift rule.

References are written here from the formulas, on materialised logits with plain autograd. Tolerances:
float64 1e-10 relative; float32 1e-5; half precision against the float32 evaluation of the same
rounded inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import crossent as xe


def make(n=29, d=8, v=40, dtype=torch.float64, seed=0, ignore=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    return e.to(dtype), c.to(dtype), b.to(dtype), t


def close(actual, expected, rel):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.detach().abs().max().item(), 1e-12)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def leaves_of(*tensors):
    return [x.clone().requires_grad_() for x in tensors]


class MatrixProductCount(TorchDispatchMode):
    """Counts the matrix products run while active (the recompute path runs them in backward)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


# -- normalizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", [7, 7.5, torch.tensor(7), torch.tensor([7.5])])
@pytest.mark.parametrize("kw", [{}, {"loss": "focal"}, {"z_loss": 1e-2, "weight": "rand"}])
def test_normalizer_divides_the_sum(normalizer, kw):
    e, c, b, t = make()
    kw = dict(kw)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(40, dtype=torch.float64) + 0.5
    fused = leaves_of(e, c, b)
    loss = xe.linear_cross_entropy(fused[0], fused[1], t, bias=fused[2], normalizer=normalizer, chunk_size=8, **kw)
    dense = leaves_of(e, c, b)
    n = float(normalizer) if not isinstance(normalizer, torch.Tensor) else normalizer.double().item()
    ref = xe.cross_entropy(dense[0] @ dense[1].T + dense[2], t, reduction="sum", **kw) / n
    close(loss, ref, 1e-10)
    for g, r in zip(grads(loss, fused), grads(ref, dense)):
        close(g, r, 1e-10)


def test_normalizer_keeps_the_eager_path():
    e, c, _, t = make(dtype=torch.float32)
    e.requires_grad_()
    loss = xe.linear_cross_entropy(e, c, t, normalizer=torch.tensor(100), chunk_size=8)
    with MatrixProductCount() as rec:
        loss.backward()
    assert rec.count == 0  # gradients were formed in the forward pass


def test_gradient_accumulation_with_a_global_count_equals_one_batch():
    e, c, _, t = make(n=40, ignore=(0, 1, 2, 9, 30))
    whole = leaves_of(e, c)
    ref = xe.linear_cross_entropy(whole[0], whole[1], t, loss="focal")
    ref.backward()
    parts = leaves_of(e, c)
    count = (t != -100).sum()
    for rows in torch.arange(40).chunk(4):
        xe.linear_cross_entropy(parts[0][rows], parts[1], t[rows], loss="focal", normalizer=count).backward()
    for g, r in zip(parts, whole):
        close(g.grad, r.grad, 1e-10)


def test_normalizer_errors():
    e, c, _, t = make()
    with pytest.raises(ValueError, match="reduction='mean'.*'sum'"):
        xe.linear_cross_entropy(e, c, t, reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        xe.linear_cross_entropy(e, c, t, normalizer=0)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        xe.linear_cross_entropy(e, c, t, normalizer=torch.tensor(0))
    with pytest.raises(ValueError, match="one-element"):
        xe.linear_cross_entropy(e, c, t, normalizer=torch.ones(2))
    with pytest.raises(ValueError, match="must not require grad"):
        xe.linear_cross_entropy(e, c, t, normalizer=torch.tensor(2.0, requires_grad=True))


# -- sample_weight ------------------------------------------------------------------------------------------


def weighted_reference(logits, t, w, loss="ce", normalizer=None, **kw):
    per_row = xe.cross_entropy(logits, t, loss=loss, reduction="none", **kw)
    counted = (t != -100).sum() if "weight" not in kw else kw["weight"][t[t != -100]].sum()
    return (per_row * w).sum() / (normalizer if normalizer is not None else counted)


@pytest.mark.parametrize("loss", ["ce", "focal", "squentropy", "nfl"])  # factored, generic and whole-row kernels
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sample_weight_multiplies_each_row(loss, reduction):
    e, c, b, t = make()
    kw = {"loss": loss}
    w = torch.linspace(-0.5, 2.0, 29, dtype=torch.float64)  # negative weights too (advantages)
    fused = leaves_of(e, c, b)
    got = xe.linear_cross_entropy(fused[0], fused[1], t, bias=fused[2], sample_weight=w, reduction=reduction,
                                  chunk_size=8, **kw)  # fmt: skip
    dense = leaves_of(e, c, b)
    per_row = xe.cross_entropy(dense[0] @ dense[1].T + dense[2], t, reduction="none", **kw) * w
    ref = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / (t != -100).sum()}[reduction]
    close(got, ref, 1e-10)
    upstream = torch.linspace(0.5, 1.5, 29, dtype=torch.float64) if reduction == "none" else None
    for g, r in zip(torch.autograd.grad(got, fused, upstream), torch.autograd.grad(ref, dense, upstream)):
        close(g, r, 1e-10)


def test_sample_weight_keeps_the_eager_path_and_follows_the_shift():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(3, 9, 8, generator=g, requires_grad=True)
    c = torch.randn(40, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (3, 9), generator=g)
    t[0, 4] = -100
    w = torch.rand(3, 9, generator=g)
    loss = xe.linear_cross_entropy(e, c, t, shift=True, sample_weight=w, normalizer=11, chunk_size=5)
    with MatrixProductCount() as rec:
        ge, gc = torch.autograd.grad(loss, (e, c))
    assert rec.count == 0
    e2, c2 = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    per_token = F.cross_entropy((e2[:, :-1] @ c2.T).transpose(1, 2), t[:, 1:], reduction="none")
    ref = (per_token * w[:, 1:]).sum() / 11
    close(loss, ref, 1e-5)
    for a, r in zip((ge, gc), torch.autograd.grad(ref, (e2, c2))):
        close(a, r, 1e-5)


def test_sample_weight_that_requires_grad_gets_its_gradient():
    e, c, _, t = make()
    w = torch.rand(29, dtype=torch.float64, requires_grad=True)
    loss = xe.linear_cross_entropy(e, c, t, sample_weight=w, chunk_size=8, loss="focal")
    (gw,) = torch.autograd.grad(loss, w)
    w2 = w.detach().clone().requires_grad_()
    ref = weighted_reference(e @ c.T, t, w2, loss="focal")
    close(loss, ref, 1e-10)
    close(gw, torch.autograd.grad(ref, w2)[0], 1e-10)


def test_sample_weight_with_class_weights_and_normalizer():
    e, c, _, t = make()
    cw = torch.rand(40, dtype=torch.float64) + 0.5
    w = torch.rand(29, dtype=torch.float64)
    got = xe.linear_cross_entropy(e, c, t, weight=cw, sample_weight=w, label_smoothing=0.1)
    close(got, weighted_reference(e @ c.T, t, w, weight=cw, label_smoothing=0.1), 1e-10)
    got = xe.linear_cross_entropy(e, c, t, weight=cw, sample_weight=w, normalizer=w[t != -100].sum())
    close(got, weighted_reference(e @ c.T, t, w, weight=cw, normalizer=w[t != -100].sum()), 1e-10)


def test_sample_weight_errors():
    e, c, _, t = make()
    with pytest.raises(ValueError, match=r"sample_weight must have the target's shape \(29,\)"):
        xe.linear_cross_entropy(e, c, t, sample_weight=torch.ones(28))
    with pytest.raises(TypeError, match="sample_weight must be floating point"):
        xe.linear_cross_entropy(e, c, t, sample_weight=torch.ones(29, dtype=torch.long))


# -- float32 loss for half inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_half_inputs_give_a_float32_loss(dtype, reduction):
    e, c, b, t = make(n=512, d=16, v=64, dtype=dtype, ignore=(3,))
    loss = xe.linear_cross_entropy(e, c, t, bias=b, reduction=reduction)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy((e.float() @ c.float().T + b.float()), t, reduction=reduction)
    # The half-precision logits differ from float32 ones by their rounding; the sum of 511 rows
    # then differs by far less than one bfloat16 step of the sum (a sum near 1e3 has a step of 4-8).
    close(loss, ref, 2e-3)
    if reduction == "sum":
        assert (loss - ref).abs() < ref.abs() * 2**-9


# -- per-row statistics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"softcap": 2.0}, {"loss": "focal"}, {"loss": "nfl"}, {"label_smoothing": 0.1}])
def test_stats_entropy_z_loss_and_predicted_token(kw):
    e, c, b, t = make()
    fused = leaves_of(e, c, b)
    loss, stats = xe.linear_cross_entropy(fused[0], fused[1], t, bias=fused[2], chunk_size=8,
                                          return_stats=("lse", "argmax", "entropy"), **kw)  # fmt: skip
    z = e @ c.T + b
    if "softcap" in kw:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    logp = z.log_softmax(-1)
    close(stats.entropy, -(logp.exp() * logp).sum(-1).float(), 1e-6)
    close(stats.lse, torch.logsumexp(z, -1).float(), 1e-6)
    close(stats.z_loss, torch.logsumexp(z, -1).square().float(), 1e-6)
    assert torch.equal(stats.argmax, z.argmax(-1))
    assert stats.entropy.dtype == stats.lse.dtype == torch.float32
    # asking for statistics changes neither the loss nor the gradients
    plain = leaves_of(e, c, b)
    ref = xe.linear_cross_entropy(plain[0], plain[1], t, bias=plain[2], chunk_size=8, **kw)
    close(loss, ref, 1e-12)
    for g, r in zip(grads(loss, fused), grads(ref, plain)):
        close(g, r, 1e-10)


def test_stats_selection_and_errors():
    e, c, _, t = make()
    _, s = xe.linear_cross_entropy(e, c, t, return_stats="entropy")
    assert s.lse is None and s.argmax is None and s.entropy.shape == (29,)
    _, s = xe.linear_cross_entropy(e, c, t, return_stats=True)
    assert s.entropy is None and s.lse is not None and s.argmax is not None
    with pytest.raises(ValueError, match="z_loss is lse"):
        _ = xe.linear_cross_entropy(e, c, t, return_stats=("argmax",))[1].z_loss
    with pytest.raises(ValueError, match="return_stats must be a bool or names"):
        xe.linear_cross_entropy(e, c, t, return_stats=("accuracy",))


def test_stats_of_a_shifted_sequence():
    g = torch.Generator().manual_seed(2)
    e, c = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 40, (2, 6), generator=g)
    _, s = xe.linear_cross_entropy(e, c, t, shift=True, return_stats=("entropy",))
    logp = (e[:, :-1] @ c.T).log_softmax(-1)
    close(s.entropy, -(logp.exp() * logp).sum(-1).float(), 1e-6)


# -- the shift rule -------------------------------------------------------------------------------------------


def test_shift_refuses_targets_that_are_already_shifted():
    g = torch.Generator().manual_seed(3)
    e, c = torch.randn(2, 6, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    with pytest.raises(ValueError, match="targets already shifted.*shift=False"):
        xe.linear_cross_entropy(e, c, labels[:, 1:], shift=True)
    # the documented alternative: already shifted targets over all positions, shift=False
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    close(xe.linear_cross_entropy(e, c, shifted), xe.linear_cross_entropy(e, c, labels, shift=True), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_weight_and_normalizer_in_half_precision(dtype):
    """Against the float32 evaluation of the same rounded inputs: 2e-2 (loss) and 3e-2 (gradients) relative."""
    e, c, b, t = make(n=64, d=16, v=48, dtype=dtype, ignore=(3,))
    w = torch.rand(64, generator=torch.Generator().manual_seed(4))
    fused = leaves_of(e, c, b)
    loss = xe.linear_cross_entropy(fused[0], fused[1], t, bias=fused[2], sample_weight=w, normalizer=50, chunk_size=16)
    assert loss.dtype == torch.float32 and all(x.dtype == dtype for x in fused)
    dense = [x.float().requires_grad_() for x in (e, c, b)]
    per_row = F.cross_entropy(dense[0] @ dense[1].T + dense[2], t, reduction="none")
    ref = (per_row * w).sum() / 50
    close(loss, ref, 2e-2)
    for g, r in zip(grads(loss, fused), grads(ref, dense)):
        assert g.dtype == dtype
        close(g.float(), r, 3e-2)


def _triton_runs_here() -> bool:
    """The Triton kernels can run in this process: compiled on a GPU, or in the interpreter on CPU."""
    try:
        from crossent._engine.triton import launch
    except ImportError:
        return False
    return launch.INTERPRETED != torch.cuda.is_available()


@pytest.mark.skipif(not _triton_runs_here(), reason="Triton kernels not available in this process")
def test_trainer_options_on_the_triton_backend():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e, c, b, t = (x.to(device) for x in make(n=21, d=16, v=130, dtype=torch.float32, ignore=(3,)))
    w = torch.rand(21, generator=torch.Generator().manual_seed(7)).to(device)
    kw = dict(sample_weight=w, normalizer=17, return_stats=("argmax", "entropy"), loss="focal")
    fused = leaves_of(e, c, b)
    loss, stats = xe.linear_cross_entropy(fused[0], fused[1], t, bias=fused[2], backend="triton", **kw)
    plain = leaves_of(e, c, b)
    ref, ref_stats = xe.linear_cross_entropy(plain[0], plain[1], t, bias=plain[2], backend="torch", **kw)
    close(loss, ref, 1e-5)
    close(stats.entropy, ref_stats.entropy, 1e-5)
    assert torch.equal(stats.argmax, ref_stats.argmax)
    for g, r in zip(grads(loss, fused), grads(ref, plain)):
        close(g, r, 1e-5)
