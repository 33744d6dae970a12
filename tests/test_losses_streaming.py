"""The streamable losses against independent references written from their formulas.

``reference_streaming.py`` materialises softmax / log_softmax and uses plain autograd; the references
are evaluated in float64 on the same inputs. Tolerances (``TOL``: float64 1e-10, float32 1e-5) are
relative, each row against its own magnitude plus the magnitude of the numbers its log-normalisers
see (``row_scale``: ``1 + max|z|``, or the transformed logits / scores / sum of squares where a loss
has them). A confident row's ``lse - z_y`` cancels, so its rounding error scales with the logits, not
with the (tiny) loss: this is the same floor PyTorch's own CE has. Gradients are compared per row
against the largest reference entry of the row plus the row's coefficient scale (its upstream gradient
times its weight).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe
import reference_streaming as R
from crossent._engine.plan import Plan
from crossent.losses import _base as losses_base
from crossent._rows import Rows

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _alpha(c):
    return torch.linspace(0.25, 1.0, c, dtype=torch.float64)


# (id, registry name, hyperparameters as a function of C)
CASES = [
    ("ce", "ce", lambda c: {}),
    ("focal", "focal", lambda c: {}),
    ("focal-g0.5", "focal", lambda c: {"gamma": 0.5}),
    ("focal-g0.1", "focal", lambda c: {"gamma": 0.1}),
    ("focal-g0", "focal", lambda c: {"gamma": 0.0}),
    ("focal-alpha", "focal", lambda c: {"gamma": 2.0, "alpha": _alpha(c)}),
    ("poly1", "poly1", lambda c: {}),
    ("poly1-m1", "poly1", lambda c: {"epsilon": -1.0}),
    ("poly", "poly", lambda c: {"epsilons": (1.0, 0.5, -0.2)}),
    ("poly1_focal", "poly1_focal", lambda c: {}),
    ("poly1_focal-g0.3", "poly1_focal", lambda c: {"epsilon": -0.5, "gamma": 0.3}),
    ("comp_sum-0", "comp_sum", lambda c: {"tau": 0.0}),
    ("comp_sum-0.5", "comp_sum", lambda c: {"tau": 0.5}),
    ("comp_sum-1", "comp_sum", lambda c: {"tau": 1.0}),
    ("comp_sum-1.5", "comp_sum", lambda c: {"tau": 1.5}),
    ("comp_sum-2", "comp_sum", lambda c: {"tau": 2.0}),
    ("comp_sum-3", "comp_sum", lambda c: {"tau": 3.0}),
    ("gce", "gce", lambda c: {}),
    ("gce-q1", "gce", lambda c: {"q": 1.0}),
    ("tgce", "tgce", lambda c: {}),
    ("tgce-k0.1", "tgce", lambda c: {"q": 0.3, "k": 0.1}),
    ("mae", "mae", lambda c: {}),
    ("squentropy", "squentropy", lambda c: {}),
    ("nce", "nce", lambda c: {}),
    ("ngce", "ngce", lambda c: {}),
    ("ngce-q0.2", "ngce", lambda c: {"q": 0.2}),
    ("nmae", "nmae", lambda c: {}),
    ("rce", "rce", lambda c: {}),
    ("rce-A", "rce", lambda c: {"A": -4.0}),
    ("sce", "sce", lambda c: {}),
    ("sce-cifar100", "sce", lambda c: {"alpha": 6.0, "beta": 0.1, "A": -2.0}),
    ("apl", "apl", lambda c: {}),
    ("apl-ngce-mae", "apl", lambda c: {"active": "ngce", "passive": "mae", "alpha": 2.0, "beta": 0.5}),
    ("encouraging", "encouraging", lambda c: {}),
    ("encouraging-1", "encouraging", lambda c: {"log_end": 1.0}),
    ("encouraging-0.5", "encouraging", lambda c: {"log_end": 0.5}),
    ("ldr_kl", "ldr_kl", lambda c: {}),
    ("ldr_kl-0.3", "ldr_kl", lambda c: {"lam": 0.3, "margin": 0.5}),
    ("ldr_kl-softplus", "ldr_kl", lambda c: {"normalize": "softplus"}),
    ("ldr_kl-l1", "ldr_kl", lambda c: {"lam": 2.0, "normalize": "l1"}),
    ("mixce", "mixce", lambda c: {}),
    ("mixce-0.1", "mixce", lambda c: {"eta": 0.1}),
    ("circle", "circle", lambda c: {}),
    ("circle-pml", "circle", lambda c: {"m": 0.4, "gamma": 80.0}),
    ("soft_target_ce", "soft_target_ce", lambda c: {}),
]
CASE_IDS = [c[0] for c in CASES]
STREAMING_NAMES = sorted({c[1] for c in CASES} - {"ce"})


def make_logits(gen, n, c, dtype, *, extreme, cosine=False):
    """Random logits; with ``extreme`` some rows hold +-1e4 (random, confident right, confident wrong,
    one-hot huge, all equal and huge)."""
    z = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    if cosine:
        z = torch.tanh(z)
    y = torch.randint(0, c, (n,), generator=gen)
    if extreme:
        kinds = torch.randint(0, 7, (n,), generator=gen)
        for i in range(n):
            k, t = int(kinds[i]), int(y[i])
            if k == 0:
                z[i] = torch.randn(c, generator=gen, dtype=torch.float64) * 1e4
            elif k == 1:
                z[i, t] = 1e4
            elif k == 2:
                z[i, (t + 1) % c] = 1e4
            elif k == 3:
                z[i] = -1e4
                z[i, t] = 1e4
            elif k == 4:
                z[i] = 1e4
    return z.to(dtype), y


def run_crossent(name, hp, z, y, upstream=None, **kw):
    x = z.detach().clone().requires_grad_()
    out = xe.cross_entropy(x, y, loss=xe.losses.get(name, **hp), **kw)
    (g,) = torch.autograd.grad(out, x, upstream if out.dim() else None)
    return out.detach(), g


def run_reference(name, hp, z, y, upstream=None, **kw):
    x = z.detach().double().clone().requires_grad_()
    out = R.reference(name, hp, x, y, **kw)
    (g,) = torch.autograd.grad(out, x, upstream.double() if out.dim() else None)
    return out.detach(), g


def check_against_reference(name, hp, z, y, *, weight=None, ignore_index=-100, reduction="none", gen=None):
    """crossent (in z's dtype) against the float64 reference, values and gradients."""
    tol = TOL[z.dtype]
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    upstream = torch.randn(y.shape, generator=gen, dtype=z.dtype) if reduction == "none" else None
    out, g = run_crossent(name, hp, z, y, upstream, **kw)
    ref, ref_g = run_reference(name, hp, z, y, upstream, **kw)
    assert out.dtype == z.dtype and g.dtype == z.dtype
    assert torch.isfinite(out).all() and torch.isfinite(g).all(), f"{name}{hp}: non-finite output or gradient"
    assert torch.isfinite(ref).all() and torch.isfinite(ref_g).all(), f"{name}{hp}: the reference is not finite"

    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    scale = R.row_scale(name, hp, z.detach().double(), safe_y)
    per_row = R.reference(name, hp, z.detach().double(), y, weight=weight, ignore_index=ignore_index, reduction="none")
    w = torch.ones_like(scale) if weight is None else weight.double()[safe_y]
    w = torch.where(valid, w, torch.zeros_like(w))
    denom = w.sum().item() if reduction == "mean" else 1.0
    denom = denom if denom > 0 else 1.0

    if reduction == "none":
        allowed = tol * (ref.abs() + scale * w)
    else:
        allowed = tol * (ref.abs() + (per_row.abs() + scale * w).sum() / denom)
    err = (out.double() - ref).abs()
    assert torch.all(err <= allowed), f"{name}{hp}: value error {(err / allowed).max().item():.3g}x the tolerance"

    coef = (upstream.double().abs() if upstream is not None else torch.ones_like(w)) * w / denom
    allowed_g = tol * scale * (ref_g.abs().amax(-1) + coef)
    err_g = (g.double() - ref_g).abs().amax(-1)
    ratio = (err_g / allowed_g).max().item()
    assert torch.all(err_g <= allowed_g), f"{name}{hp}: gradient error {ratio:.3g}x the tolerance"


@st.composite
def sweep(draw):
    return dict(
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        n=draw(st.integers(1, 8)),
        c=draw(st.integers(2, 40)),
        extreme=draw(st.booleans()),
        weighted=draw(st.booleans()),
        ignore=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        seed=draw(st.integers(0, 2**20)),
    )


@pytest.mark.parametrize("case_id,name,hp_fn", CASES, ids=CASE_IDS)
@settings(max_examples=12, deadline=None)
@given(case=sweep())
def test_matches_reference(case_id, name, hp_fn, case):
    gen = torch.Generator().manual_seed(case["seed"])
    c, dtype = case["c"], case["dtype"]
    hp = hp_fn(c)
    z, y = make_logits(gen, case["n"], c, dtype, extreme=case["extreme"], cosine=name == "circle")
    if name == "tgce":
        # TGCE jumps at p_y = k; tied extreme logits can put p_y exactly there (1/m), where rounding
        # alone picks the side. Move such rows off the discontinuity, for both implementations alike.
        p_y = torch.softmax(z.double(), -1).gather(-1, y[:, None]).squeeze(-1)
        at_jump = (p_y - hp.get("k", 0.5)).abs() < 1e-6
        z[at_jump, y[at_jump]] += 0.01
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if case["weighted"] else None
    ignore_index = -100
    if case["ignore"]:
        ignore_index = int(y[0])  # ignore every row of that class, whichever rows they are
    check_against_reference(
        name, hp, z, y, weight=weight, ignore_index=ignore_index, reduction=case["reduction"], gen=gen
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_id,name,hp_fn", CASES, ids=CASE_IDS)
def test_large_vocabulary(case_id, name, hp_fn, dtype):
    gen = torch.Generator().manual_seed(7)
    c = 50_000
    z, y = make_logits(gen, 3, c, dtype, extreme=False, cosine=name == "circle")
    z[1, 123] = 1e4  # one extreme row among ordinary ones
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    check_against_reference(name, hp_fn(c), z, y, weight=weight, reduction="mean")
    check_against_reference(name, hp_fn(c), z, y, reduction="none", gen=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_id,name,hp_fn", CASES, ids=CASE_IDS)
def test_extreme_rows_are_finite(case_id, name, hp_fn, dtype):
    """+-1e4 logits, p_y rounding to exactly 1 or 0, and 1 - p_y in the subnormal range."""
    z = torch.tensor(
        [
            [1e4, -1e4, 0.0, 5.0],
            [-1e4, -1e4, -1e4, -1e4],
            [1e4, 1e4, 1e4, 1e4],
            [0.0, 1e4, -1e4, 1e4],
            [0.0, -100.0, -103.0, -745.0],
            [1e4, 1e4 - 30, -1e4, 0.0],
        ],
        dtype=dtype,
    )
    y = torch.tensor([0, 1, 2, 2, 0, 0])
    hp = hp_fn(4)
    for reduction in ("none", "mean"):
        upstream = torch.ones(6, dtype=dtype) if reduction == "none" else None
        out, g = run_crossent(name, hp, z, y, upstream, reduction=reduction)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), (name, hp, out, g)
    check_against_reference(name, hp, z, y, reduction="none", gen=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case_id,name,hp_fn", CASES, ids=CASE_IDS)
def test_half_precision_layouts_and_empty_batches(case_id, name, hp_fn):
    """Half inputs accumulate in float32 (the result is the float32 one rounded); [N, C, d] is the
    flattened [N*d, C]; an empty batch gives 0."""
    hp = hp_fn(5)
    gen = torch.Generator().manual_seed(4)
    z = (torch.randn(6, 5, generator=gen) * 3).to(torch.bfloat16)
    if name == "circle":
        z = torch.tanh(z.float()).to(torch.bfloat16)
    y = torch.randint(0, 5, (6,), generator=gen)
    out, g = run_crossent(name, hp, z, y)
    ref, ref_g = run_crossent(name, hp, z.float(), y)
    assert out.dtype == g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    spacing = 2**-8
    torch.testing.assert_close(out.float(), ref, rtol=spacing, atol=spacing * ref.abs().item())
    torch.testing.assert_close(g.float(), ref_g, rtol=spacing, atol=spacing * ref_g.abs().max().item())

    z3 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    y3 = torch.randint(0, 5, (2, 3), generator=gen)
    loss = xe.losses.get(name, **hp)
    a = xe.cross_entropy(z3, y3, loss=loss, reduction="none")
    b = xe.cross_entropy(z3.movedim(1, -1).reshape(-1, 5), y3.reshape(-1), loss=loss, reduction="none")
    assert a.shape == (2, 3) and torch.equal(a.reshape(-1), b)
    empty = torch.zeros(0, 5, requires_grad=True)
    out = xe.cross_entropy(empty, torch.zeros(0, dtype=torch.long), loss=loss)
    out.backward()
    assert out.item() == 0.0 and empty.grad.shape == (0, 5)


# -- external implementations and identities ---------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=sweep())
def test_ce_matches_torch(case):
    gen = torch.Generator().manual_seed(case["seed"])
    c, dtype = case["c"], case["dtype"]
    z, y = make_logits(gen, case["n"], c, dtype, extreme=case["extreme"])
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if case["weighted"] else None
    ignore_index = int(y[0]) if case["ignore"] else -100
    if case["ignore"] and case["reduction"] == "mean" and bool((y == ignore_index).all()):
        ignore_index = -100  # PyTorch returns NaN for a mean over nothing
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=case["reduction"])
    upstream = torch.randn(y.shape, generator=gen, dtype=dtype) if case["reduction"] == "none" else None
    out, g = run_crossent("ce", {}, z, y, upstream, **kw)
    x = z.detach().clone().requires_grad_()
    ref = F.cross_entropy(x, y, **kw)
    (ref_g,) = torch.autograd.grad(ref, x, upstream)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol * (1 + z.abs().max().item()))
    scale = 1 + z.abs().max().item()
    torch.testing.assert_close(g, ref_g, rtol=tol, atol=tol * scale * (1 + ref_g.abs().max().item()))


def _loss(name_or_obj, **hp):
    return xe.losses.get(name_or_obj, **hp) if isinstance(name_or_obj, str) else name_or_obj


IDENTITIES = [
    ("comp_sum(tau=1) == ce", ("comp_sum", {"tau": 1.0}), ("ce", {})),
    ("comp_sum(tau=2) == mae", ("comp_sum", {"tau": 2.0}), ("mae", {})),
    ("comp_sum(tau=1.3) == gce(0.3)", ("comp_sum", {"tau": 1.3}), ("gce", {"q": 0.3})),
    ("comp_sum(tau=1.7) == gce(0.7)", ("comp_sum", {"tau": 1.7}), ("gce", {"q": 0.7})),
    ("gce(q=1) == mae", ("gce", {"q": 1.0}), ("mae", {})),
    ("tgce(k=0) == gce", ("tgce", {"q": 0.4, "k": 0.0}), ("gce", {"q": 0.4})),
    ("poly1(0) == ce", ("poly1", {"epsilon": 0.0}), ("ce", {})),
    ("poly((e,)) == poly1(e)", ("poly", {"epsilons": (2.0,)}), ("poly1", {"epsilon": 2.0})),
    ("poly((0, 0)) == ce", ("poly", {"epsilons": (0.0, 0.0)}), ("ce", {})),
    ("focal(0) == ce", ("focal", {"gamma": 0.0}), ("ce", {})),
    ("poly1_focal(eps=0) == focal", ("poly1_focal", {"epsilon": 0.0, "gamma": 1.5}), ("focal", {"gamma": 1.5})),
    ("sce(1, 0) == ce", ("sce", {"alpha": 1.0, "beta": 0.0}), ("ce", {})),
    ("sce(0, 1) == rce", ("sce", {"alpha": 0.0, "beta": 1.0}), ("rce", {})),
    ("mixce(eta=1) == ce", ("mixce", {"eta": 1.0}), ("ce", {})),
    (
        "apl == alpha*nce + beta*rce",
        ("apl", {"alpha": 10.0, "beta": 0.1}),
        (10.0 * xe.losses.NCE() + 0.1 * xe.losses.RCE(), {}),
    ),
    (
        "apl(ngce, nmae) == composition",
        ("apl", {"active": xe.losses.NGCE(q=0.4), "passive": "nmae", "alpha": 3.0, "beta": 2.0}),
        (3.0 * xe.losses.NGCE(q=0.4) + 2.0 * xe.losses.NMAE(), {}),
    ),
    ("soft_target_ce(indices) == ce", ("soft_target_ce", {}), ("ce", {})),
]


@pytest.mark.parametrize("label,left,right", IDENTITIES, ids=[i[0] for i in IDENTITIES])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_identities(label, left, right, reduction):
    gen = torch.Generator().manual_seed(11)
    c = 9
    z, y = make_logits(gen, 24, c, torch.float64, extreme=True)
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    upstream = torch.randn(24, generator=gen, dtype=torch.float64) if reduction == "none" else None
    results = []
    for name, hp in (left, right):
        x = z.clone().requires_grad_()
        out = xe.cross_entropy(x, y, loss=_loss(name, **hp), weight=weight, ignore_index=int(y[0]), reduction=reduction)
        results.append((out.detach(), torch.autograd.grad(out, x, upstream)[0]))
    (a, ga), (b, gb) = results
    scale = 1 + z.abs().max().item()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12 * scale)


def test_ldr_kl_at_unit_temperature_without_margin_is_ce_minus_log_c():
    gen = torch.Generator().manual_seed(12)
    z, y = make_logits(gen, 16, 7, torch.float64, extreme=True)
    x = z.clone().requires_grad_()
    ldr = xe.cross_entropy(x, y, loss=xe.losses.LDRKL(lam=1.0, margin=0.0), reduction="none")
    ce = xe.cross_entropy(x, y, reduction="none")
    scale = 1 + z.abs().max().item()
    torch.testing.assert_close(ldr, ce - math.log(7), rtol=1e-12, atol=1e-12 * scale)
    g1, g2 = (torch.autograd.grad(v.sum(), x, retain_graph=True)[0] for v in (ldr, ce))
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_soft_target_ce_matches_torch_with_probability_targets():
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32):
        z, _ = make_logits(gen, 10, 13, dtype, extreme=True)
        q = torch.softmax(torch.randn(10, 13, generator=gen, dtype=torch.float64), -1).to(dtype)
        w = (torch.rand(13, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
        for reduction in ("none", "mean", "sum"):
            for weight in (None, w):
                upstream = torch.randn(10, generator=gen, dtype=dtype) if reduction == "none" else None
                x = z.clone().requires_grad_()
                out = xe.cross_entropy(x, q, loss="soft_target_ce", weight=weight, reduction=reduction)
                g = torch.autograd.grad(out, x, upstream)[0]
                x2 = z.clone().requires_grad_()
                ref = F.cross_entropy(x2, q, weight=weight, reduction=reduction)
                ref_g = torch.autograd.grad(ref, x2, upstream)[0]
                tol, scale = TOL[dtype], 1 + z.abs().max().item()
                torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol * scale)
                torch.testing.assert_close(g, ref_g, rtol=tol, atol=tol * scale)


def test_soft_target_ce_passes_gradient_to_a_target_that_needs_one():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(teacher, -1)
    out = xe.cross_entropy(z, q, loss=xe.losses.SoftTargetCrossEntropy(), reduction="sum")
    ref = R.soft_target_ce_probs(z, q).sum()
    gz, gt = torch.autograd.grad(out, (z, teacher), retain_graph=True)
    rz, rt = torch.autograd.grad(ref, (z, teacher))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gz, rz, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt, rt, rtol=1e-12, atol=1e-14)


# -- gradients ---------------------------------------------------------------------------------

# These stop the gradient through part of the formula (MixCE's weight sg(p_y), circle's a_p / a_n), so
# finite differences of the loss measure something else; they are checked against finite differences
# of the loss with those parts frozen at the evaluation point instead.
FROZEN = {"mixce", "circle"}


@pytest.mark.parametrize("case_id,name,hp_fn", CASES, ids=CASE_IDS)
def test_gradcheck(case_id, name, hp_fn):
    gen = torch.Generator().manual_seed(3)
    c = 4
    z = torch.randn(5, c, generator=gen, dtype=torch.float64) * 2
    if name == "circle":
        z = torch.tanh(z)
    y = torch.tensor([0, 3, 1, 2, 3])
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    loss = xe.losses.get(name, **hp_fn(c))
    kw = dict(weight=weight, ignore_index=1, reduction="none")
    if name not in FROZEN:
        x = z.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: xe.cross_entropy(t, y, loss=loss, **kw), (x,))
        return
    hp = hp_fn(c)
    valid = y != 1
    w = torch.where(valid, weight[y], torch.zeros_like(weight[y]))
    if name == "mixce":
        eta = hp.get("eta", 0.5)
        frozen = eta + (1 - eta) * torch.softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)

        def frozen_loss(t):
            return F.cross_entropy(t, y, reduction="none") * frozen * w

    else:
        m, gamma = hp.get("m", 0.25), hp.get("gamma", 256.0)
        onehot = F.one_hot(y, c).to(torch.bool)
        a = torch.where(onehot, (1 + m - z).clamp(min=0), (z + m).clamp(min=0)) * gamma
        shift = torch.where(onehot, 1 - m, m)

        def frozen_loss(t):
            return F.cross_entropy(a * (t - shift), y, reduction="none") * w

    x = z.clone().requires_grad_()
    upstream = torch.randn(5, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad(xe.cross_entropy(x, y, loss=loss, **kw), x, upstream)
    numeric = torch.zeros_like(z)
    h = 1e-6
    for i in range(z.shape[0]):
        for j in range(c):
            e = torch.zeros_like(z)
            e[i, j] = h
            numeric[i, j] = ((frozen_loss(z + e) - frozen_loss(z - e)) * upstream).sum() / (2 * h)
    torch.testing.assert_close(g, numeric, rtol=1e-6, atol=1e-6 * (1 + numeric.abs().max().item()))


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0, 2.0])
def test_focal_gradient_at_certainty_is_finite_and_right(gamma):
    """At p_y = 1 the focal gradient is 0 (gamma > 0) or the CE gradient (gamma = 0), never NaN."""
    z = torch.tensor([[50.0, 0.0, 0.0], [800.0, 0.0, 0.0], [1e4, -1e4, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.long)
    (g,) = torch.autograd.grad(xe.cross_entropy(z, y, loss=xe.losses.Focal(gamma=gamma), reduction="sum"), z)
    assert torch.isfinite(g).all()
    (ce_g,) = torch.autograd.grad(xe.cross_entropy(z, y, reduction="sum"), z)
    if gamma == 0.0:
        torch.testing.assert_close(g, ce_g, rtol=1e-12, atol=0)
    else:
        # |d focal / d z| <= (1 - p_y)^gamma (1 + gamma) |d CE / d z| near certainty.
        u = torch.tensor([2 * math.exp(-50.0), 0.0, 0.0], dtype=torch.float64)
        bound = (u**gamma) * (1 + gamma) * ce_g.abs().amax(-1) * (1 + 1e-12)
        assert torch.all(g.abs().amax(-1) <= bound)


# -- streaming: statistics over column chunks -------------------------------------------------


STREAMED = [c for c in CASES if "normalize" not in c[2](4)]


@pytest.mark.parametrize("case_id,name,hp_fn", STREAMED, ids=[c[0] for c in STREAMED])
def test_column_chunks_reproduce_the_dense_result(case_id, name, hp_fn):
    """What a vocabulary-chunked engine does: partial states per column block, merge, coefficients,
    per-block logit gradients. It must equal the dense path."""
    gen = torch.Generator().manual_seed(9)
    c = 23
    z, y = make_logits(gen, 6, c, torch.float64, extreme=True, cosine=name == "circle")
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    loss = xe.losses.get(name, **hp_fn(c))
    rows = Rows(num_classes=c, target=y, valid=y != int(y[0]), class_weight=weight)
    plan = Plan(loss, rows)
    plan.require_blockwise("chunked-columns")
    cuts = [0, 5, 6, 17, c]
    blocks = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    states = [plan.partial_states(plan.transform(z[:, b], rows, b), rows, b) for b in blocks]
    values = plan.merge_states(states)
    per_row = plan.row_losses(values, rows)
    upstream = torch.randn(6, generator=gen, dtype=torch.float64)
    coefs = plan.coefficients(values, rows, upstream)
    grad = torch.cat([plan.logit_grad(z[:, b], rows, values, coefs, b) for b in blocks], -1)

    x = z.clone().requires_grad_()
    dense = xe.cross_entropy(x, y, loss=loss, weight=weight, ignore_index=int(y[0]), reduction="none")
    (dense_g,) = torch.autograd.grad(dense, x, upstream)
    scale = R.row_scale(name, hp_fn(c), z, y).max().item()
    torch.testing.assert_close(per_row, dense.detach(), rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(grad, dense_g, rtol=1e-12, atol=1e-12 * scale * (1 + dense_g.abs().max().item()))


@pytest.mark.parametrize("case_id,name,hp_fn", STREAMED, ids=[c[0] for c in STREAMED])
def test_whole_row_autograd_form_agrees_with_the_statistics(case_id, name, hp_fn):
    """The autograd form (transform forward + differentiable statistics, used when a target needs a
    gradient) and the statistics form (add_grad / backward_) must give the same gradient."""
    gen = torch.Generator().manual_seed(10)
    c = 11
    z, y = make_logits(gen, 8, c, torch.float64, extreme=True, cosine=name == "circle")
    loss = xe.losses.get(name, **hp_fn(c))
    rows = Rows(num_classes=c, target=y, valid=torch.ones(8, dtype=torch.bool))
    plan = Plan(loss, rows)
    upstream = torch.randn(8, generator=gen, dtype=torch.float64)
    x = z.clone().requires_grad_()
    auto = plan.autograd_row_losses(x, rows)
    (auto_g,) = torch.autograd.grad(auto, x, upstream)
    values = plan.statistics(plan.transform(z, rows, slice(0, c)), rows)
    stream = plan.row_losses(values, rows)
    stream_g = plan.logit_grad(z, rows, values, plan.coefficients(values, rows, upstream), slice(0, c))
    scale = R.row_scale(name, hp_fn(c), z, y).max().item()
    torch.testing.assert_close(stream, auto.detach(), rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(stream_g, auto_g, rtol=1e-12, atol=1e-12 * scale * (1 + auto_g.abs().max().item()))


@pytest.mark.parametrize("k", [0.1, 0.5, 0.9])
def test_tgce_truncates_exactly_at_k(k):
    """Two classes: p_y = sigmoid(d). Just above k the loss is GCE with a gradient; at or below k it
    is the constant L_q(k) with none."""
    q = 0.7
    d = math.log(k / (1 - k))
    z = torch.tensor([[d + 1e-9, 0.0], [d - 1e-9, 0.0], [d - 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.long)
    out = xe.cross_entropy(z, y, loss=xe.losses.TGCE(q=q, k=k), reduction="none")
    (g,) = torch.autograd.grad(out.sum(), z)
    const = (1 - k**q) / q
    torch.testing.assert_close(out[1:], torch.full((2,), const, dtype=torch.float64), rtol=1e-15, atol=0)
    assert out[1] == out[2]  # one constant
    torch.testing.assert_close(out[0], torch.tensor(const, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(g[1:] == 0) and torch.all(g[0] != 0)


# -- streamability, registry, interface -------------------------------------------------------


class _WholeRow(xe.losses.Loss):
    """A stand-in whole-row loss (max-margin on the whole row): for APL's streamability rule."""

    streamable = False

    def dense_row_loss(self, z, rows):
        zy = z.gather(-1, rows.target[:, None]).squeeze(-1)
        return (z.amax(-1) - zy) * 0.5


def test_streamability():
    for name in STREAMING_NAMES:
        assert xe.losses.get(name).streamable, name
    for normalize in ("softplus", "l1"):
        loss = xe.losses.LDRKL(normalize=normalize)
        assert not loss.streamable
        rows = Rows(num_classes=3, target=torch.zeros(1, dtype=torch.long), valid=torch.ones(1, dtype=torch.bool))
        with pytest.raises(ValueError, match="needs whole logit rows"):
            Plan(loss, rows).require_blockwise("tiled")
    assert not xe.losses.APL(active=_WholeRow(), passive="rce").streamable
    assert not xe.losses.APL(active="nce", passive=_WholeRow()).streamable
    assert xe.losses.APL(active="gce", passive="nmae").streamable


def test_apl_with_a_whole_row_part_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    apl = xe.losses.APL(active=_WholeRow(), passive="mae", alpha=2.0, beta=3.0)
    out = xe.cross_entropy(z, y, loss=apl, reduction="none")
    expected = 2.0 * (z.amax(-1) - z.gather(-1, y[:, None]).squeeze(-1)) * 0.5 + 3.0 * R.mae(z, y)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_apl_with_the_whole_row_nfl():
    """The paper's NFL+RCE pair: a whole-row active part makes the APL whole-row, same value."""
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (7,), generator=gen)
    apl = xe.losses.APL(active="nfl", passive="rce", alpha=10.0, beta=0.1)
    assert not apl.streamable
    out = xe.cross_entropy(z, y, loss=apl, reduction="none")
    parts = [xe.cross_entropy(z, y, loss=name, reduction="none") for name in ("nfl", "rce")]
    torch.testing.assert_close(out, 10.0 * parts[0] + 0.1 * parts[1], rtol=1e-12, atol=0)


def test_apl_resolves_names_through_the_registry_when_built():
    name = "_test_only_whole_row"

    @xe.losses.register(name)
    class Registered(_WholeRow):
        pass

    try:
        apl = xe.losses.get("apl", active=name, passive="rce")
        assert isinstance(apl.parts[0], Registered) and not apl.streamable
    finally:
        losses_base._REGISTRY.pop(name)
    assert name not in xe.losses.available()


INTERFACE = {
    "focal": ("Focal", {"gamma": 2.0, "alpha": None}),
    "poly1": ("Poly1", {"epsilon": 1.0}),
    "poly": ("Poly", {"epsilons": (1.0,)}),
    "poly1_focal": ("Poly1Focal", {"epsilon": 1.0, "gamma": 2.0}),
    "comp_sum": ("CompSum", {"tau": 1.0}),
    "gce": ("GCE", {"q": 0.7}),
    "tgce": ("TGCE", {"q": 0.7, "k": 0.5}),
    "mae": ("MAE", {}),
    "squentropy": ("Squentropy", {}),
    "nce": ("NCE", {}),
    "ngce": ("NGCE", {"q": 0.7}),
    "nmae": ("NMAE", {}),
    "rce": ("RCE", {"A": math.log(1e-4)}),
    "sce": ("SCE", {"alpha": 0.1, "beta": 1.0, "A": math.log(1e-4)}),
    "apl": ("APL", {"active": "nce", "passive": "rce", "alpha": 1.0, "beta": 1.0}),
    "encouraging": ("Encouraging", {"log_end": 0.75}),
    "ldr_kl": ("LDRKL", {"lam": 1.0, "margin": 0.1, "normalize": None}),
    "mixce": ("MixCE", {"eta": 0.5}),
    "circle": ("Circle", {"m": 0.25, "gamma": 256.0}),
    "soft_target_ce": ("SoftTargetCrossEntropy", {}),
}


@pytest.mark.parametrize("name", sorted(INTERFACE))
def test_registry_names_and_hyperparameters(name):
    cls_name, defaults = INTERFACE[name]
    cls = getattr(xe.losses, cls_name)
    assert xe.losses.registered()[name] is cls and cls.name == name
    params = inspect.signature(cls).parameters
    assert {k: p.default for k, p in params.items()} == defaults
    assert all(p.kind is p.KEYWORD_ONLY or p.default is not p.empty for p in params.values())
    assert cls.__doc__ and ">>>" in cls.__doc__ and "Reference:" in cls.__doc__
    # By name with defaults, straight through cross_entropy.
    z = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    by_name = xe.cross_entropy(torch.tanh(z) if name == "circle" else z, y, loss=name)
    by_object = xe.cross_entropy(torch.tanh(z) if name == "circle" else z, y, loss=cls())
    assert torch.equal(by_name, by_object) and torch.isfinite(by_name)


def test_focal_alpha_multiplies_class_weights():
    z = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 0])
    alpha = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    weight = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    both = xe.cross_entropy(z, y, loss=xe.losses.Focal(alpha=alpha), weight=weight, reduction="none")
    plain = xe.cross_entropy(z, y, loss=xe.losses.Focal(), reduction="none")
    torch.testing.assert_close(both, plain * alpha[y] * weight[y], rtol=1e-12, atol=0)
    as_list = xe.cross_entropy(z, y, loss=xe.losses.Focal(alpha=[0.25, 0.5, 1.0]), weight=weight, reduction="none")
    torch.testing.assert_close(as_list, both, rtol=1e-6, atol=0)


# -- errors ------------------------------------------------------------------------------------

BAD = [
    ("gce", {"q": 0.0}, ValueError, r"gce: q must be in \(0, 1\]"),
    ("gce", {"q": 1.5}, ValueError, r"gce: q must be in \(0, 1\]"),
    ("gce", {"q": float("nan")}, ValueError, "finite"),
    ("gce", {"q": "0.7"}, TypeError, "real number"),
    ("gce", {"q": True}, TypeError, "real number"),
    ("ngce", {"q": -0.1}, ValueError, r"ngce: q must be in \[0.001, 1\]"),
    ("ngce", {"q": 1e-9}, ValueError, r"ngce: q must be in \[0.001, 1\]"),
    ("tgce", {"q": 2.0}, ValueError, "tgce: q"),
    ("tgce", {"k": 1.0}, ValueError, r"tgce: k must be in \[0, 1\)"),
    ("tgce", {"k": -0.5}, ValueError, "tgce: k"),
    ("focal", {"gamma": -1.0}, ValueError, r"focal: gamma must be in \[0, inf\)"),
    ("focal", {"alpha": 0.25}, TypeError, "one entry per class"),
    ("focal", {"alpha": torch.ones(2, 2)}, ValueError, "1-D"),
    ("focal", {"alpha": torch.tensor([0.5, -1.0])}, ValueError, r"alpha\[1\]"),
    ("focal", {"alpha": "abc"}, TypeError, "one entry per class"),
    ("poly1", {"epsilon": -2.0}, ValueError, r"poly1: epsilon must be in \[-1, inf\)"),
    ("poly", {"epsilons": ()}, ValueError, "at least one"),
    ("poly", {"epsilons": 1.0}, TypeError, "sequence"),
    ("poly", {"epsilons": (1.0, "x")}, TypeError, r"epsilons\[1\]"),
    ("poly1_focal", {"gamma": -0.5}, ValueError, "poly1_focal: gamma"),
    ("comp_sum", {"tau": -0.5}, ValueError, r"comp_sum: tau must be in \[0, inf\)"),
    ("rce", {"A": 0.0}, ValueError, r"rce: A must be in \(-inf, 0\)"),
    ("sce", {"alpha": -1.0}, ValueError, "sce: alpha"),
    ("sce", {"A": 2.0}, ValueError, "sce: A"),
    ("apl", {"beta": -1.0}, ValueError, "apl: beta"),
    ("apl", {"active": "no_such_loss"}, ValueError, "unknown loss 'no_such_loss'"),
    ("apl", {"passive": 3}, TypeError, "apl: passive"),
    ("encouraging", {"log_end": 0.0}, ValueError, r"encouraging: log_end must be in \(0, 1\]"),
    ("encouraging", {"log_end": 1.5}, ValueError, "encouraging: log_end"),
    ("ldr_kl", {"lam": 0.0}, ValueError, r"ldr_kl: lam must be in \(0, 1000\]"),
    ("ldr_kl", {"lam": 1e4}, ValueError, r"ldr_kl: lam must be in \(0, 1000\]"),
    ("ldr_kl", {"normalize": "l2"}, ValueError, "normalize must be one of"),
    ("mixce", {"eta": 1.5}, ValueError, r"mixce: eta must be in \[0, 1\]"),
    ("circle", {"gamma": 0.0}, ValueError, "circle: gamma"),
    ("mae", {"q": 0.5}, TypeError, "unexpected keyword argument .q."),
]


@pytest.mark.parametrize("name,hp,exc,match", BAD, ids=[f"{b[0]}-{list(b[1])}" for b in BAD])
def test_bad_hyperparameters(name, hp, exc, match):
    with pytest.raises(exc, match=match):
        xe.losses.get(name, **hp)


def test_errors_that_depend_on_the_input():
    z = torch.randn(2, 3)
    y = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="focal: alpha has 4 entries but the logits have 3 classes"):
        xe.cross_entropy(z, y, loss=xe.losses.Focal(alpha=torch.ones(4)))
    one = torch.randn(2, 1)
    for name in ("squentropy", "nmae"):
        with pytest.raises(ValueError, match=f"{name} needs at least 2 classes"):
            xe.cross_entropy(one, torch.zeros(2, dtype=torch.long), loss=name)
    probs = torch.softmax(torch.randn(2, 3), -1)
    for name in ("gce", "focal", "circle", "ldr_kl"):
        with pytest.raises(ValueError, match="needs class-index targets"):
            xe.cross_entropy(z, probs, loss=name)
