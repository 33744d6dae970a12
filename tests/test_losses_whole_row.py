"""Whole-row losses (nfl, logit_clip, aldr_kl, sigmoid_focal) through ``crossent.cross_entropy``.

Every value and gradient is compared with the independent references of ``reference_whole_row.py``
(float64: 1e-10 relative; float32 inputs: 1e-5 relative against the float64 reference of the same
inputs), with class weights, ignored targets and every reduction, for C from 2 to 50000.
"""

from __future__ import annotations

import math

import pytest
import torch

import crossent as xe
import reference_whole_row as ref
from crossent._rows import index_rows
from crossent._engine.plan import Plan
from crossent.losses import AdaptiveLDRKL, LogitClip, NormalizedFocal, SigmoidFocal

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _fresh(spec, n):
    """(loss object, extra, reference per-row function) for a spec name and ``n`` rows."""
    if spec == "nfl":
        return NormalizedFocal(), None, lambda z, y: ref.nfl(z, y, 0.5)
    if spec == "nfl_g2":
        return NormalizedFocal(gamma=2.0), None, lambda z, y: ref.nfl(z, y, 2.0)
    if spec == "nfl_g0":
        return xe.losses.get("nfl", gamma=0), None, lambda z, y: ref.nfl(z, y, 0.0)
    if spec == "logit_clip":
        return LogitClip(), None, lambda z, y: ref.logit_clip(z, y, 1.0, 2.0)
    if spec == "logit_clip_p1":
        return LogitClip(tau=3.0, p=1), None, lambda z, y: ref.logit_clip(z, y, 3.0, 1.0)
    if spec == "logit_clip_inf":
        return LogitClip(tau=0.5, p="inf"), None, lambda z, y: ref.logit_clip(z, y, 0.5, math.inf)
    if spec == "logit_clip_nfl":
        base = lambda z, y: ref.nfl(z, y, 0.5)  # noqa: E731
        return xe.losses.get("logit_clip", tau=2.0, base="nfl"), None, lambda z, y: ref.logit_clip(z, y, 2.0, 2.0, base)
    if spec in ("aldr_kl", "aldr_kl_custom"):
        hp = dict(lam0=1.0, margin=0.1, alpha=2.0) if spec == "aldr_kl" else dict(lam0=0.5, margin=1.0, alpha=3.0)
        ids = torch.randperm(3 * n)[:n]
        table = torch.full((3 * n,), hp["lam0"], dtype=torch.float64)
        return (
            AdaptiveLDRKL(**hp) if spec == "aldr_kl_custom" else xe.losses.get("aldr_kl"),
            {"sample_ids": ids},
            lambda z, y: ref.aldr_step(z, y, ids, table, **hp)[0],
        )
    if spec == "sigmoid_focal":
        return SigmoidFocal(), None, lambda z, y: ref.sigmoid_focal_rows(z, y)
    if spec == "sigmoid_focal_custom":
        return SigmoidFocal(gamma=0.5, alpha=-1), None, lambda z, y: ref.sigmoid_focal_rows(z, y, 0.5, -1)
    raise KeyError(spec)


SPECS = [
    "nfl", "nfl_g2", "nfl_g0", "logit_clip", "logit_clip_p1", "logit_clip_inf", "logit_clip_nfl",
    "aldr_kl", "aldr_kl_custom", "sigmoid_focal", "sigmoid_focal_custom",
]


def _inputs(n, c, dtype, seed, scale=3.0, ignored=2):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.randperm(n, generator=g)[:ignored]] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.1
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    return z, y, w, upstream


def _ours_and_ref(spec, z, y, weight, reduction, upstream, ignore_index=-100):
    loss, extra, row_ref = _fresh(spec, z.shape[0])
    zo = z.clone().requires_grad_(True)
    out = xe.cross_entropy(zo, y, loss=loss, weight=weight, reduction=reduction, ignore_index=ignore_index, extra=extra)
    (out * upstream.to(out.dtype)).sum().backward() if reduction == "none" else out.backward()

    zr = z.detach().double().requires_grad_(True)
    safe = torch.where(y == ignore_index, 0, y)
    w64 = None if weight is None else weight.double()
    expect = ref.reduce_rows(row_ref(zr, safe), y, w64, ignore_index, reduction)
    (expect * upstream).sum().backward() if reduction == "none" else expect.backward()
    return out, zo.grad, expect.detach(), zr.grad


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [2, 3, 17])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_value_and_grad_match_reference(spec, dtype, c, reduction, weighted):
    z, y, w, upstream = _inputs(7, c, dtype, seed=c * 31 + weighted)
    out, grad, expect, grad_ref = _ours_and_ref(spec, z, y, w if weighted else None, reduction, upstream)
    assert out.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])
    torch.testing.assert_close(grad.double(), grad_ref, **TOL[dtype])
    assert (grad[y == -100] == 0).all()


@pytest.mark.parametrize("spec", SPECS)
def test_ignore_index_that_is_a_class(spec):
    z, _, w, upstream = _inputs(6, 4, torch.float64, seed=5, ignored=0)
    y = torch.tensor([1, 0, 1, 2, 3, 0])
    out, grad, expect, grad_ref = _ours_and_ref(spec, z, y, w, "mean", upstream, ignore_index=1)
    torch.testing.assert_close(out, expect, **TOL[torch.float64])
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float64])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1000, 50000])
def test_large_vocabulary(spec, dtype, c):
    z, y, w, upstream = _inputs(3, c, dtype, seed=c, ignored=1)
    out, grad, expect, grad_ref = _ours_and_ref(spec, z, y, w, "mean", upstream)
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])
    torch.testing.assert_close(grad.double(), grad_ref, **TOL[dtype])


def _extreme(dtype):
    z = torch.tensor(
        [
            [1e4, -1e4, 0.0, 3.0],
            [-1e4, 1e4, 1e4, -1e4],
            [1e4, 1e4, 1e4, 1e4],
            [-1e4, -1e4, -1e4, -1e4],
            [0.0, 0.0, 0.0, 0.0],
            [-1e4, 2.0, 1e4, 5.0],
        ],
        dtype=dtype,
    )
    y = torch.tensor([1, 2, 0, 3, 1, 0])
    return z, y


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_are_finite_and_exact(spec, dtype):
    z, y = _extreme(dtype)
    loss, extra, row_ref = _fresh(spec, z.shape[0])
    zo = z.clone().requires_grad_(True)
    out = xe.cross_entropy(zo, y, loss=loss, reduction="none", extra=extra)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zo.grad).all()
    expect = row_ref(z.double(), y)
    finite = torch.isfinite(expect)
    torch.testing.assert_close(out.double()[finite], expect[finite], **TOL[dtype])


# NFL (gamma > 0) and ALDR-KL stop gradients on purpose (the modulating factors, the temperatures), so
# finite differences of their values are not their gradients; the reference comparisons cover them.
@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("aldr") and s not in ("nfl", "nfl_g2", "logit_clip_nfl")])
def test_gradcheck(spec):
    z, y, w, _ = _inputs(3, 4, torch.float64, seed=11, ignored=1)
    loss, extra, _ = _fresh(spec, 3)
    fn = lambda t: xe.cross_entropy(t, y, loss=loss, weight=w, reduction="none", extra=extra)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True),))


@pytest.mark.parametrize("spec", ["nfl", "logit_clip", "sigmoid_focal"])
def test_softcap_is_applied_before_the_loss(spec):
    z, y, w, upstream = _inputs(5, 6, torch.float64, seed=3)
    loss, _, row_ref = _fresh(spec, 5)
    got = xe.cross_entropy(z, y, loss=loss, softcap=2.0, weight=w)
    capped = 2.0 * torch.tanh(z / 2.0)
    expect = ref.reduce_rows(row_ref(capped, torch.where(y < 0, 0, y)), y, w)
    torch.testing.assert_close(got, expect, **TOL[torch.float64])


@pytest.mark.parametrize("spec", ["nfl", "logit_clip", "aldr_kl", "sigmoid_focal"])
def test_half_precision_and_spatial_inputs(spec):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, generator=g)
    y = torch.randint(0, 5, (2, 3), generator=g)
    loss, _, _ = _fresh(spec, 6)
    extra = {"sample_ids": torch.arange(6).view(2, 3)} if spec == "aldr_kl" else None
    per = xe.cross_entropy(z, y, loss=loss, reduction="none", extra=extra)
    assert per.shape == (2, 3)
    loss, _, _ = _fresh(spec, 6)
    flat = xe.cross_entropy(
        z.movedim(1, -1).reshape(6, 5), y.reshape(6), loss=loss, reduction="none",
        extra=None if extra is None else {"sample_ids": extra["sample_ids"].reshape(6)},
    )
    torch.testing.assert_close(per.reshape(6), flat)
    loss, _, _ = _fresh(spec, 6)
    zb = z.bfloat16().requires_grad_(True)
    out = xe.cross_entropy(zb, y, loss=loss, extra=extra)
    out.backward()
    assert out.dtype == torch.bfloat16 and zb.grad.dtype == torch.bfloat16
    assert torch.isfinite(out) and torch.isfinite(zb.grad).all()


# -- NFL ----------------------------------------------------------------------------------------------------
def test_nfl_detaches_the_modulating_factors_only():
    z, y, _, _ = _inputs(4, 5, torch.float64, seed=2, ignored=0)
    zo = z.clone().requires_grad_(True)
    xe.cross_entropy(zo, y, loss=NormalizedFocal(gamma=2.0), reduction="sum").backward()
    # Without the stop-gradient the gradient is different: the test can tell the two apart.
    zf = z.clone().requires_grad_(True)
    p, logp = torch.softmax(zf, -1), torch.log_softmax(zf, -1)
    terms = (1 - p) ** 2.0 * -logp
    (terms.gather(-1, y[:, None]).squeeze(-1) / terms.sum(-1)).sum().backward()
    assert not torch.allclose(zo.grad, zf.grad, rtol=1e-3)
    # gamma = 0 is NCE, whose value is log p_y / sum_k log p_k.
    nce = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1) / torch.log_softmax(z, -1).sum(-1)
    torch.testing.assert_close(xe.cross_entropy(z, y, loss=NormalizedFocal(gamma=0), reduction="none"), nce)


# -- LogitClip ------------------------------------------------------------------------------------------------
def test_logit_clip_map_is_continuous_and_bounds_the_norm():
    clip = LogitClip(tau=1.5, p=2)
    direction = torch.tensor([[3.0, -4.0]]) / 5.0
    below = clip.clip(direction * 1.4999)
    above = clip.clip(direction * 1.5001)
    torch.testing.assert_close(below, above, rtol=0, atol=2e-4)  # the official map jumps to norm 0.667 here
    big = clip.clip(torch.randn(5, 7, dtype=torch.float64) * 100)
    torch.testing.assert_close(torch.linalg.vector_norm(big, dim=-1), torch.full((5,), 1.5, dtype=torch.float64))
    small = torch.randn(3, 4, dtype=torch.float64) * 0.01
    assert torch.equal(clip.clip(small), small)


@pytest.mark.parametrize("p", [1, 3, 10, math.inf])
def test_logit_clip_norm_does_not_overflow(p):
    z = torch.tensor([[1e4, -1e4, 5e3, 1.0]], dtype=torch.float32, requires_grad=True)
    out = LogitClip(tau=2.0, p=p).clip(z)
    out.sum().backward()
    expect = LogitClip(tau=2.0, p=p).clip(z.detach().double())
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)


def test_logit_clip_of_a_zero_row_has_a_finite_gradient():
    z = torch.zeros(1, 4, requires_grad=True)
    xe.cross_entropy(z, torch.tensor([1]), loss=LogitClip(tau=1e-3)).backward()
    assert torch.isfinite(z.grad).all()


def test_logit_clip_with_probability_targets_and_loss_objects():
    z, _, w, _ = _inputs(4, 5, torch.float64, seed=8, ignored=0)
    probs = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    got = xe.cross_entropy(z, probs, loss=LogitClip(tau=2.0, base=xe.losses.CrossEntropy(label_smoothing=0.2)))
    zc = ref.logit_clip(z, torch.zeros(4, dtype=torch.long), 2.0, 2.0, base=lambda a, b: a)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(zc, probs, label_smoothing=0.2))
    with pytest.raises(ValueError, match="class-index targets"):
        xe.cross_entropy(z, probs, loss=LogitClip(base="nfl"))
    assert LogitClip(base="nfl").accepts_probs is False
    assert "base='nfl'" in repr(LogitClip(base="nfl"))


# -- ALDR-KL --------------------------------------------------------------------------------------------------
def test_aldr_lambda_updates_over_several_steps_match_the_reference():
    hp = dict(lam0=0.7, margin=0.3, alpha=2.5)
    crit = AdaptiveLDRKL(**hp, num_samples=8)
    table = torch.full((8,), hp["lam0"], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    steps = [[0, 1, 2, 3], [2, 3, 4, 5], [0, 5, 6, 1], [7, 2, 0, 3]]
    for i, ids in enumerate(steps):
        ids = torch.tensor(ids)
        z = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
        y = torch.randint(0, 6, (4,), generator=g)
        if i == 2:  # an ignored row neither reads nor writes its (out of range) id
            y[1], ids[1] = -100, 99
        got = xe.cross_entropy(z, y, loss=crit, extra={"sample_ids": ids}, reduction="none")
        valid = y != -100
        expect, new_table = ref.aldr_step(z[valid], y[valid], ids[valid], table, **hp)
        table = new_table
        torch.testing.assert_close(got[valid], expect, rtol=1e-12, atol=1e-13)
        assert got[~valid].eq(0).all()
        torch.testing.assert_close(crit.lambdas, table, rtol=1e-12, atol=1e-13)
    assert not torch.equal(table, torch.full((8,), hp["lam0"], dtype=torch.float64))
    assert ((table > hp["lam0"] * (1 - 1 / hp["alpha"])) & (table <= hp["lam0"])).all()


def test_aldr_state_dict_round_trip_and_eval():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    ids = torch.tensor([4, 0, 9, 2, 7])
    crit = AdaptiveLDRKL(num_samples=10)
    xe.cross_entropy(z, y, loss=crit, extra={"sample_ids": ids})
    state = crit.state_dict()
    assert set(state) == {"lambdas"} and state["lambdas"].dtype == torch.float64
    state["lambdas"][0] = 123.0  # a copy: the loss is unaffected
    assert crit.lambdas[0] != 123.0
    state = crit.state_dict()

    restored = AdaptiveLDRKL(num_samples=10)
    restored.load_state_dict(state)
    z2 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a = xe.cross_entropy(z2, y, loss=crit, extra={"sample_ids": ids}, reduction="none")
    b = xe.cross_entropy(z2, y, loss=restored, extra={"sample_ids": ids}, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(crit.lambdas, restored.lambdas, rtol=0, atol=0)

    frozen = crit.lambdas.clone()
    crit.eval()
    c = xe.cross_entropy(z, y, loss=crit, extra={"sample_ids": ids}, reduction="none")
    assert torch.equal(crit.lambdas, frozen)
    expect, _ = ref.aldr_step(z, y, ids, frozen)
    torch.testing.assert_close(c, expect, rtol=1e-12, atol=1e-13)
    crit.train()
    xe.cross_entropy(z, y, loss=crit, extra={"sample_ids": ids})
    assert not torch.equal(crit.lambdas, frozen)

    with pytest.raises(ValueError, match="10 entries but num_samples is 3"):
        AdaptiveLDRKL(num_samples=3).load_state_dict(state)
    with pytest.raises(ValueError, match="'lambdas'"):
        crit.load_state_dict({"lam": state["lambdas"]})


def test_aldr_grows_its_table_without_num_samples():
    crit = AdaptiveLDRKL(lam0=2.0)
    assert crit.lambdas.shape == (0,)
    z, y = torch.randn(2, 3), torch.tensor([0, 2])
    xe.cross_entropy(z, y, loss=crit, extra={"sample_ids": torch.tensor([5, 2])})
    assert crit.lambdas.shape == (6,)
    assert (crit.lambdas[[0, 1, 3, 4]] == 2.0).all() and (crit.lambdas[[2, 5]] != 2.0).all()
    restored = AdaptiveLDRKL(lam0=2.0)
    restored.load_state_dict(crit.state_dict())
    assert torch.equal(restored.lambdas, crit.lambdas)


def test_aldr_with_every_row_ignored_before_anything_is_stored():
    crit = AdaptiveLDRKL()
    out = xe.cross_entropy(torch.randn(2, 3), torch.tensor([-100, -100]), loss=crit,
                           extra={"sample_ids": torch.tensor([-5, 7])})
    assert out == 0 and crit.lambdas.shape == (0,)


def test_nfl_needs_two_classes():
    with pytest.raises(ValueError, match="nfl needs at least 2 classes"):
        xe.cross_entropy(torch.randn(2, 1), torch.tensor([0, 0]), loss="nfl")


def test_aldr_errors():
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"extra=\{'sample_ids': ids\}"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL())
    with pytest.raises(TypeError, match="integer"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(), extra={"sample_ids": torch.tensor([0.0, 1.0, 2.0])})
    with pytest.raises(ValueError, match="out of range"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(num_samples=2), extra={"sample_ids": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="non-negative"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(), extra={"sample_ids": torch.tensor([0, -1, 2])})
    with pytest.raises(ValueError, match="distinct"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(), extra={"sample_ids": torch.tensor([0, 1, 1])})
    with pytest.raises(ValueError, match="target's shape"):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(), extra={"sample_ids": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="at least 2 classes"):
        xe.cross_entropy(z[:, :1], torch.zeros(3, dtype=torch.long), loss=AdaptiveLDRKL(),
                         extra={"sample_ids": torch.arange(3)})
    with pytest.raises(ValueError, match="class-index"):
        xe.cross_entropy(z, torch.softmax(z, -1), loss=AdaptiveLDRKL(), extra={"sample_ids": torch.arange(3)})


# -- sigmoid focal ---------------------------------------------------------------------------------------------
def test_sigmoid_focal_registry_loss_with_probability_targets_and_weights():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    probs = torch.rand(4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    got = xe.cross_entropy(z, probs, loss=SigmoidFocal(gamma=1.5, alpha=0.4), weight=w)
    expect = (ref.torchvision_sigmoid_focal(z, probs, 0.4, 1.5) * w).sum(-1).mean()
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


# -- the refusal by engines that never hold a whole row ----------------------------------------------------------
@pytest.mark.parametrize(
    "loss, cls",
    [
        (NormalizedFocal(), "NormalizedFocal"),
        (LogitClip(), "LogitClip"),
        (AdaptiveLDRKL(), "AdaptiveLDRKL"),
        (SigmoidFocal(), "SigmoidFocal"),
        (xe.losses.get("ce") + NormalizedFocal(), "NormalizedFocal"),
        (2.0 * LogitClip(base="ce"), "LogitClip"),
    ],
)
def test_whole_row_losses_are_refused_by_a_blockwise_engine(loss, cls):
    assert loss.streamable is False
    rows = index_rows(torch.tensor([0, 1]), 3, -100, None)
    plan = Plan(loss, rows)
    with pytest.raises(ValueError, match=rf"{cls}.*'tiled'") as info:
        plan.require_blockwise("tiled")
    assert "whole logit rows" in str(info.value)
    Plan(xe.losses.get("ce"), rows).require_blockwise("tiled")  # a streamable loss passes


# -- hyperparameter errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: NormalizedFocal(gamma=-1), ValueError, "gamma must be >= 0"),
        (lambda: NormalizedFocal(gamma="2"), TypeError, "gamma must be a real number"),
        (lambda: LogitClip(tau=0), ValueError, "tau must be > 0"),
        (lambda: LogitClip(p=0.5), ValueError, "p must be a number >= 1"),
        (lambda: LogitClip(p="two"), ValueError, "p must be a number >= 1"),
        (lambda: LogitClip(base="no_such_loss"), ValueError, "unknown loss 'no_such_loss'"),
        (lambda: LogitClip(base=3), TypeError, "loss must be a registered name"),
        (lambda: AdaptiveLDRKL(lam0=0), ValueError, r"lam0 must be in \(0, 1000\]"),
        (lambda: AdaptiveLDRKL(alpha=1.0), ValueError, "alpha must be > 1"),
        (lambda: AdaptiveLDRKL(margin=float("nan")), ValueError, "margin must be finite"),
        (lambda: AdaptiveLDRKL(num_samples=0), ValueError, "num_samples must be >= 1"),
        (lambda: AdaptiveLDRKL(num_samples=2.5), TypeError, "num_samples must be an int"),
        (lambda: SigmoidFocal(gamma=-0.5), ValueError, "gamma must be >= 0"),
        (lambda: SigmoidFocal(alpha=None), TypeError, "alpha must be a real number"),
    ],
)
def test_bad_hyperparameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_registry_names_and_defaults():
    assert {"nfl", "logit_clip", "aldr_kl", "sigmoid_focal"} <= set(xe.losses.available())
    assert xe.losses.get("nfl").gamma == 0.5
    clip = xe.losses.get("logit_clip")
    assert (clip.tau, clip.p, clip.base) == (1.0, 2, "ce")
    aldr = xe.losses.get("aldr_kl")
    assert (aldr.lam0, aldr.margin, aldr.alpha) == (1.0, 0.1, 2.0)
    focal = xe.losses.get("sigmoid_focal")
    assert (focal.gamma, focal.alpha) == (2.0, 0.25)
