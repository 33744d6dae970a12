"""Knowledge distillation: ``crossent.distillation`` and the fused ``crossent.linear_distillation``.

The reference below is written from the formulas (docs/distillation.md, GKD/Liger's JSD convention)
on materialised logits with plain autograd; every divergence and option is checked against it, values
and student gradients, on both entry points.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_linear_cross_entropy import LargestTensor

import crossent as xe
from crossent._distillation.arguments import build_loss
from crossent._distillation.divergences import DIVERGENCES
from crossent._distillation.statistics import TEACHER
from crossent._engine.plan import Plan
from crossent._rows import index_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


# -- the reference ---------------------------------------------------------------------------------------


def kl_rows(log_p, log_q):
    """KL(P || Q) per row, a class of P_j = 0 adding 0 (0 log 0 = 0; P_j > 0 = Q_j adds +inf).

    The log-ratio is masked before the product, so autograd's gradient there is 0, not 0 * inf.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def weighted(w, value):
    """``w * value`` where a term of weight 0 adds 0, also where it is infinite."""
    return torch.where(w > 0, w * value, 0.0)


def reference_divergence(zs, zt, name, temperature=1.0, beta=0.5, gamma=1.0, mu=0.5):
    log_p = F.log_softmax(zs / temperature, -1)
    log_pt = F.log_softmax(zt / temperature, -1)
    if name == "kl" or (name == "jsd" and beta == 0):
        return kl_rows(log_pt, log_p)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return kl_rows(log_p, log_pt)
    if name == "jsd":
        m = beta * log_pt.exp() + (1 - beta) * log_p.exp()
        return beta * kl_rows(log_pt, m.log()) + (1 - beta) * kl_rows(log_p, m.log())
    if name in ("ttm", "wttm"):
        powered = log_pt.exp() ** gamma  # p_t^gamma, renormalised
        log_q = (powered / powered.sum(-1, keepdim=True)).log()
        weight = powered.sum(-1) if name == "wttm" else 1.0
        return weight * kl_rows(log_q, log_p)
    if name == "akl" and mu == 1.0:
        return kl_rows(log_pt, log_p)  # every token in the head (autograd through a 0 * inf term would be NaN)
    if name == "akl":
        # wutaiqiang/LLM_KD_AKL: sort the teacher, head = cumulative mass <= mu (top-1 always), errors
        # |p_t - sg(p)|; the mass measured as a fraction of the row's own total (mu = 1: every token).
        pt, p = log_pt.exp(), log_p.exp().detach()
        sorted_pt, order = pt.sort(-1, descending=True)
        errors = (sorted_pt - p.gather(-1, order)).abs()
        cumulative = sorted_pt.cumsum(-1)
        tail = cumulative > mu * cumulative[:, -1:]
        tail[:, 0] = False
        head_error = errors.masked_fill(tail, 0.0).sum(-1)
        tail_error = errors.masked_fill(~tail, 0.0).sum(-1)
        total = head_error + tail_error
        w = torch.where(total > 0, head_error / total, 0.5)
        return weighted(w, kl_rows(log_pt, log_p)) + weighted(1 - w, kl_rows(log_p, log_pt))
    raise AssertionError(name)


def reference(zs, zt, target=None, *, divergence="kl", temperature=1.0, beta=0.5, gamma=1.0, mu=0.5,
              ce_weight=0.0, ignore_index=-100, reduction="mean", shift=False):  # fmt: skip
    """Materialised logits ``[..., V]``, float64, plain autograd."""
    if shift:
        zs, zt = zs[..., :-1, :], zt[..., :-1, :]
        target = None if target is None else target[..., 1:]
    v, rows_shape = zs.shape[-1], zs.shape[:-1]
    zs, zt = zs.reshape(-1, v).double(), zt.reshape(-1, v).double()
    per_row = reference_divergence(zs, zt.detach(), divergence, temperature, beta, gamma, mu)
    counted = torch.ones(per_row.shape, dtype=torch.bool)
    if target is not None:
        t = target.reshape(-1)
        counted = t != ignore_index
        if ce_weight:
            per_row = per_row + ce_weight * F.cross_entropy(zs, t, ignore_index=ignore_index, reduction="none")
        per_row = torch.where(counted, per_row, 0.0)
    if reduction == "none":
        return per_row.reshape(rows_shape)
    total = per_row.sum()
    return total if reduction == "sum" else total / counted.sum().clamp_min(1)


# -- the cases -------------------------------------------------------------------------------------------------

HPARAMS = {"kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "ttm": {"gamma": 0.4}, "wttm": {"gamma": 0.6}, "akl": {"mu": 0.4}}
OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 2.5},
    "ce_ignore": {"ce_weight": 0.7, "target": True},
    "shift_sum": {"shift": True, "reduction": "sum", "target": True},
    "none": {"reduction": "none"},
}


def heads(b=2, t=9, d=6, dt=10, v=40, dtype=torch.float32, seed=0, ignore=((0, 2), (1, 5))):
    g = torch.Generator().manual_seed(seed)
    e_s = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    c_s = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.8
    e_t = torch.randn(b, t, dt, generator=g, dtype=torch.float64)
    c_t = torch.randn(v, dt, generator=g, dtype=torch.float64) * 0.6
    target = torch.randint(0, v, (b, t), generator=g)
    for i, j in ignore:
        target[i, j] = -100
    return e_s.to(dtype), c_s.to(dtype), e_t.to(dtype), c_t.to(dtype), target


def split(option: dict, target):
    kw = dict(option)
    return kw, (target if kw.pop("target", False) else None)


def grads(loss, *leaves):
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype) if loss.dim() else None
    return torch.autograd.grad(loss, leaves, upstream)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_and_dense_equal_the_reference(divergence, option):
    e_s, c_s, e_t, c_t, target = heads()
    kw, tgt = split(OPTIONS[option], target)
    kw.update(HPARAMS[divergence], divergence=divergence)
    e_s.requires_grad_(), c_s.requires_grad_()

    zs = (e_s.double() @ c_s.double().T).detach().requires_grad_()
    expected = reference(zs, e_t.double() @ c_t.double().T, tgt, **kw)
    (g_logits,) = grads(expected, zs)
    g_e, g_c = g_logits @ c_s.double(), g_logits.reshape(-1, zs.shape[-1]).T @ e_s.double().reshape(-1, e_s.shape[-1])

    fused = xe.linear_distillation(e_s, c_s, e_t, c_t, tgt, chunk_size=5, **kw)
    assert fused.dtype == torch.float32 and fused.shape == expected.shape
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    ge, gc = grads(fused, e_s, c_s)
    torch.testing.assert_close(ge.double(), g_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc.double(), g_c, rtol=1e-5, atol=1e-5)

    student = (e_s @ c_s.T).detach().requires_grad_()
    dense = xe.distillation(student, e_t @ c_t.T, tgt, **kw)
    torch.testing.assert_close(dense.double(), expected, rtol=1e-5, atol=1e-5)
    (gz,) = grads(dense, student)
    torch.testing.assert_close(gz.double(), g_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", ["jsd", "wttm"])
def test_other_hyperparameters(divergence):
    e_s, c_s, e_t, c_t, target = heads(seed=1)
    for hp in ({"beta": 0.0}, {"beta": 1.0}, {"beta": 0.8}) if divergence == "jsd" else ({"gamma": 2.0, "temperature": 0.5},):
        kw = dict(hp, divergence=divergence)
        expected = reference(e_s @ c_s.T, e_t @ c_t.T, **kw)
        got = xe.linear_distillation(e_s, c_s, e_t, c_t, chunk_size=7, **kw)
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_teacher_gets_no_gradient_and_changes_nothing():
    e_s, c_s, e_t, c_t, target = heads()
    e_s.requires_grad_(), c_s.requires_grad_(), e_t.requires_grad_(), c_t.requires_grad_()
    for divergence in ("kl", "akl"):
        loss = xe.linear_distillation(e_s, c_s, e_t, c_t, target, divergence=divergence, ce_weight=0.3)
        loss.backward()
        assert e_t.grad is None and c_t.grad is None
        assert e_s.grad is not None and e_s.grad.abs().sum() > 0
        e_s.grad = c_s.grad = None
        logits_t = (e_t @ c_t.T).detach().requires_grad_()
        xe.distillation(e_s @ c_s.T, logits_t, target, divergence=divergence).backward()
        assert logits_t.grad is None


def test_bfloat16_teacher_with_float32_student():
    e_s, c_s, e_t, c_t, target = heads()
    e_t, c_t = e_t.bfloat16(), c_t.bfloat16()
    zt = (e_t @ c_t.T).double()  # the teacher's logits as its bfloat16 product gives them
    for divergence in ("kl", "jsd"):
        zs = (e_s.double() @ c_s.double().T).requires_grad_()
        expected = reference(zs, zt, target, divergence=divergence, ce_weight=0.5)
        e = e_s.clone().requires_grad_()
        got = xe.linear_distillation(e, c_s, e_t, c_t, target, divergence=divergence, ce_weight=0.5, chunk_size=4)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        (g,) = torch.autograd.grad(got, e)
        (gz,) = torch.autograd.grad(expected, zs)
        torch.testing.assert_close(g.double(), gz @ c_s.double(), rtol=1e-5, atol=1e-5)


def test_bfloat16_student():
    e_s, c_s, e_t, c_t, target = heads(dtype=torch.bfloat16)
    e_s.requires_grad_()
    got = xe.linear_distillation(e_s, c_s, e_t, c_t, target, divergence="kl", chunk_size=4)
    assert got.dtype == torch.float32  # linear_cross_entropy's rule: a float32 loss for half precision
    zs = (e_s.float() @ c_s.float().T).double().detach().requires_grad_()
    expected = reference(zs, (e_t @ c_t.T).double(), target)
    # bfloat16 logits (8 bits of mantissa): the loss to about 1e-2 relative.
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    (g,) = torch.autograd.grad(got, e_s)
    (gz,) = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(g.double(), gz @ c_s.double(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_gradcheck_float64(divergence):
    """(AKL's weights are stop-gradients of the student, which finite differences would see: not here.)"""
    e_s, c_s, e_t, c_t, target = heads(b=1, t=5, d=3, dt=4, v=7, dtype=torch.float64, ignore=())
    e_s.requires_grad_(), c_s.requires_grad_()

    def f(e, c):
        return xe.linear_distillation(e, c, e_t, c_t, divergence=divergence, temperature=1.7, reduction="none", chunk_size=2)

    assert torch.autograd.gradcheck(f, (e_s, c_s))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["kl", "wttm", "jsd", "akl"])
def test_no_logit_matrix_is_ever_allocated(divergence, reduction):
    n, v, chunk = 64, 300, 8
    e_s, c_s, e_t, c_t, target = heads(b=1, t=n, d=8, dt=12, v=v, ignore=((0, 3), (0, 40)))
    e_s.requires_grad_(), c_s.requires_grad_()
    with LargestTensor(skip=[c_s.shape, c_t.shape]) as rec:
        loss = xe.linear_distillation(e_s, c_s, e_t, c_t, target, divergence=divergence, ce_weight=0.2,
                                      reduction=reduction, chunk_size=chunk)  # fmt: skip
        loss.sum().backward()
    assert 0 < rec.largest <= chunk * v, rec.largest


def test_shift_without_target_drops_the_last_position():
    e_s, c_s, e_t, c_t, _ = heads()
    got = xe.linear_distillation(e_s, c_s, e_t, c_t, shift=True, reduction="none")
    assert got.shape == (2, 8)
    expected = reference(e_s @ c_s.T, e_t @ c_t.T, shift=True, reduction="none")
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_a_teacher_equal_to_the_student_costs_nothing():
    e_s, c_s, _, _, _ = heads()
    for divergence in DIVERGENCES:
        loss = xe.linear_distillation(e_s, c_s, e_s, c_s, divergence=divergence, **HPARAMS[divergence] | {"gamma": 1.0})
        assert abs(loss.item()) < 1e-6, divergence
        assert math.isfinite(loss.item())


def test_streamable_divergences_merge_over_column_blocks():
    """The statistics of kl / reverse_kl / ttm / wttm merge over blocks of classes (they stream)."""
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, 30, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    for divergence in ("kl", "reverse_kl", "ttm", "wttm"):
        loss = build_loss(divergence, temperature=1.3, beta=0.5, gamma=0.7, mu=0.5, ce_weight=0.0, has_target=False)
        assert loss.streamable
        rows = index_rows(torch.zeros(6, dtype=torch.long), 30, -100, None, {TEACHER: zt})
        plan = Plan(loss, rows)
        whole = plan.statistics(zs, rows)
        blocks = [slice(0, 7), slice(7, 19), slice(19, 30)]
        merged = plan.merge_states([plan.partial_states(zs[:, b], rows, b) for b in blocks])
        for s in plan.stats:
            torch.testing.assert_close(merged[s], whole[s], rtol=1e-12, atol=1e-12)
        coefs = plan.coefficients(whole, rows, torch.ones(6, dtype=torch.float64))
        full = plan.logit_grad(zs, rows, whole, coefs, slice(0, 30))
        parts = torch.cat([plan.logit_grad(zs[:, b], rows, whole, coefs, b) for b in blocks], 1)
        torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)
        expected = reference_divergence(zs.requires_grad_(), zt, divergence, 1.3, gamma=0.7)
        (ref,) = torch.autograd.grad(expected.sum(), zs)
        zs = zs.detach()
        torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-12)
    for divergence in ("akl", "jsd"):
        assert not build_loss(divergence, temperature=1.0, beta=0.5, gamma=1.0, mu=0.5, ce_weight=0.0, has_target=False).streamable


def test_errors_name_the_argument():
    e_s, c_s, e_t, c_t, target = heads()
    cases = [
        (dict(divergence="kld"), ValueError, "unknown divergence 'kld'"),
        (dict(ce_weight=0.5), ValueError, "pass target"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
        (dict(divergence="ttm", gamma=-1.0), ValueError, "gamma"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
    ]
    for kw, error, text in cases:
        with pytest.raises(error, match=text):
            xe.linear_distillation(e_s, c_s, e_t, c_t, **kw)
        with pytest.raises(error, match=text):
            xe.distillation(e_s @ c_s.T, e_t @ c_t.T, **kw)
    with pytest.raises(ValueError, match="the teacher has 39 classes but the student has 40"):
        xe.linear_distillation(e_s, c_s, e_t, c_t[:-1])
    with pytest.raises(ValueError, match="e_teacher must have the student's rows"):
        xe.linear_distillation(e_s, c_s, e_t[:, :-1], c_t)
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        xe.distillation(e_s @ c_s.T, (e_t @ c_t.T)[..., :-1])
    with pytest.raises(ValueError, match="target value 40 at position"):
        xe.linear_distillation(e_s, c_s, e_t, c_t, torch.full((2, 9), 40))
    with pytest.raises(TypeError, match="e_student and c_student must share one dtype"):
        xe.linear_distillation(e_s, c_s.double(), e_t, c_t)


def test_module_forms():
    e_s, c_s, e_t, c_t, target = heads()
    crit = xe.nn.LinearDistillationLoss(divergence="jsd", beta=0.4, ce_weight=0.2)
    expected = xe.linear_distillation(e_s, c_s, e_t, c_t, target, divergence="jsd", beta=0.4, ce_weight=0.2)
    torch.testing.assert_close(crit(e_s, c_s, e_t, c_t, target), expected)
    dense = xe.nn.DistillationLoss(divergence="jsd", beta=0.4, ce_weight=0.2)
    torch.testing.assert_close(dense(e_s @ c_s.T, e_t @ c_t.T, target), expected, rtol=1e-5, atol=1e-6)


# -- masked classes (-inf logits) -----------------------------------------------------------------------------

#: Every divergence, with the hyperparameters at which a whole-row one streams (JSD beta 0 / 1, AKL mu 1).
CASES = [("kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
         ("ttm", {"gamma": 0.4}), ("wttm", {"gamma": 1.6}), ("akl", {"mu": 0.4}), ("akl", {"mu": 0.0}),
         ("akl", {"mu": 1.0})]  # fmt: skip
CASE_IDS = [f"{d}-{next(iter(hp.values()), '')}" for d, hp in CASES]


def logit_pair(n=6, v=11, seed=7):
    g = torch.Generator().manual_seed(seed)
    zs, zt = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    return zs, zt


@pytest.mark.parametrize("divergence,hp", CASES, ids=CASE_IDS)
def test_classes_both_sides_mask_are_dropped(divergence, hp):
    """A padded vocabulary (the last columns) and per-row masks, -inf in both: as if the classes did not exist."""
    zs, zt = logit_pair()
    masked = torch.zeros(zs.shape, dtype=torch.bool)
    masked[:, -2:] = True
    masked[0, 3] = masked[4, [0, 5]] = True
    zs, zt = zs.masked_fill(masked, float("-inf")).requires_grad_(), zt.masked_fill(masked, float("-inf"))
    got = xe.distillation(zs, zt, divergence=divergence, temperature=1.7, reduction="none", **hp)
    (grad,) = torch.autograd.grad(got, zs, torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    assert (grad[masked] == 0).all()
    for i in range(zs.shape[0]):
        keep = ~masked[i]
        row = zs.detach()[i, keep][None].requires_grad_()
        expected = reference_divergence(row, zt[i, keep][None], divergence, 1.7, **hp)
        (g,) = torch.autograd.grad(expected.sum(), row)
        torch.testing.assert_close(got[i], expected[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grad[i, keep], g[0] * (0.5 + i / 5), rtol=1e-10, atol=1e-13)


def infinite_where(divergence: str, hp: dict, masked_side: str) -> bool:
    """Whether the divergence is +inf when only ``masked_side`` masks a class the other side has mass on."""
    forward = divergence in ("kl", "ttm", "wttm") or (divergence == "jsd" and hp["beta"] == 0.0)
    reverse = divergence == "reverse_kl" or (divergence == "jsd" and hp["beta"] == 1.0)
    if divergence == "akl":  # mu = 1 is forward KL; below, the masked class's error weighs both terms
        forward, reverse = True, hp["mu"] < 1.0
    return reverse if masked_side == "teacher" else forward


@pytest.mark.parametrize("masked_side", ["teacher", "student"])
@pytest.mark.parametrize("divergence,hp", CASES, ids=CASE_IDS)
def test_classes_one_side_masks(divergence, hp, masked_side):
    """``p_t,j = 0 < p_j`` (or the reverse): the terms ``0 log 0`` are 0, ``p log(p / 0)`` is +inf.

    A finite divergence equals the formula (values and gradients); an infinite one is +inf, as
    ``cross_entropy`` is for a target whose logit is -inf, and the other rows are untouched.
    """
    zs, zt = logit_pair(seed=8)
    masked = torch.zeros(zs.shape, dtype=torch.bool)
    masked[1, [2, 7]] = masked[3, -1] = True
    if masked_side == "teacher":
        zt = zt.masked_fill(masked, float("-inf"))
    else:
        zs = zs.masked_fill(masked, float("-inf"))
    zs = zs.requires_grad_()
    got = xe.distillation(zs, zt, divergence=divergence, temperature=0.8, reduction="none", **hp)
    expected = reference_divergence(zs, zt, divergence, 0.8, **hp)
    rows = masked.any(1)
    if infinite_where(divergence, hp, masked_side):
        assert (got[rows] == float("inf")).all(), got
        assert xe.distillation(zs, zt, divergence=divergence, temperature=0.8, **hp) == float("inf")
        torch.testing.assert_close(got[~rows], expected[~rows], rtol=1e-12, atol=1e-13)
        return
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    (grad,) = torch.autograd.grad(got.sum(), zs)
    (ref,) = torch.autograd.grad(expected.sum(), zs)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_masked_classes_do_not_change_the_streaming_statistics_merge():
    """A block of classes that the teacher masks entirely weighs nothing when blocks merge."""
    g = torch.Generator().manual_seed(9)
    zs, zt = torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g, dtype=torch.float64)
    zt[:, 8:] = float("-inf")
    zs[0, 9] = zs[1, 1] = float("-inf")
    for divergence in ("kl", "ttm", "wttm"):
        loss = build_loss(divergence, temperature=1.3, beta=0.5, gamma=0.7, mu=0.5, ce_weight=0.0, has_target=False)
        rows = index_rows(torch.zeros(4, dtype=torch.long), 12, -100, None, {TEACHER: zt})
        plan = Plan(loss, rows)
        whole = plan.statistics(zs, rows)
        blocks = [slice(0, 5), slice(5, 8), slice(8, 12)]
        merged = plan.merge_states([plan.partial_states(zs[:, b], rows, b) for b in blocks])
        for s in plan.stats:
            torch.testing.assert_close(merged[s], whole[s], rtol=1e-12, atol=1e-12)
        assert torch.isfinite(plan.row_losses(merged, rows)[2:]).all()


# -- AKL's head at the endpoints of mu ----------------------------------------------------------------------


def test_akl_with_mu_1_is_forward_kl_exactly():
    """Found as: on about a fifth of float32 rows the sorted teacher's cumulative sum ends above 1, and
    ``cumsum <= 1`` left the last tokens in the tail, so mu = 1 was not forward KL there."""
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(1000, 50, generator=g), torch.randn(1000, 50, generator=g) * 3
    ends_above_1 = torch.softmax(zt, -1).sort(-1, descending=True).values.cumsum(-1)[:, -1] > 1
    assert ends_above_1.sum() > 50  # the case that broke
    akl = xe.distillation(zs, zt, divergence="akl", mu=1.0, reduction="none")
    assert torch.equal(akl, xe.distillation(zs, zt, divergence="kl", reduction="none"))
    e_s, c_s, e_t, c_t, _ = heads(seed=2)
    fused = xe.linear_distillation(e_s, c_s, e_t, c_t, divergence="akl", mu=1.0, reduction="none")
    torch.testing.assert_close(fused, xe.linear_distillation(e_s, c_s, e_t, c_t, reduction="none"), rtol=0, atol=0)


def test_akl_with_mu_0_has_the_top_teacher_token_as_its_whole_head():
    """As in the authors' code, the top token always belongs to the head: mu = 0 is any mu below the
    top probability, and equals the formula with ``H = {argmax p_t}``."""
    zs, zt = logit_pair(n=20, v=30, seed=10)
    zs.requires_grad_()
    got = xe.distillation(zs, zt, divergence="akl", mu=0.0, reduction="none")
    top = torch.softmax(zt, -1).amax(-1)
    below_top = xe.distillation(zs, zt, divergence="akl", mu=float(top.min()) * 0.99, reduction="none")
    torch.testing.assert_close(got, below_top, rtol=0, atol=0)
    log_p, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    error = (log_pt.exp() - log_p.exp().detach()).abs()
    head = F.one_hot(zt.argmax(-1), 30).bool()
    w = error.masked_fill(~head, 0).sum(-1) / error.sum(-1)
    expected = w * kl_rows(log_pt, log_p) + (1 - w) * kl_rows(log_p, log_pt)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    grads = [torch.autograd.grad(x.sum(), zs)[0] for x in (got, expected)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)


# -- dtypes, degenerate shapes, options ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_linear_distillation_returns_linear_cross_entropys_dtype(dtype):
    """One rule for every fused entry point: a float32 loss for half precision (float64 for float64)."""
    e_s, c_s, e_t, c_t, target = heads(dtype=dtype)
    want = xe.linear_cross_entropy(e_s, c_s, target).dtype
    assert want == (torch.float64 if dtype == torch.float64 else torch.float32)
    for reduction in ("mean", "none"):
        got = xe.linear_distillation(e_s, c_s, e_t.float(), c_t.float(), target, divergence="jsd", reduction=reduction)
        assert got.dtype == want, reduction


def test_linear_distillation_without_features():
    """``D = 0``: the student's logits are all 0 (found as a reshape error naming no argument)."""
    e_s, c_s, e_t, c_t, target = heads(dtype=torch.float64)
    got = xe.linear_distillation(e_s[..., :0], c_s[:, :0], e_t, c_t, target, divergence="akl")
    expected = xe.distillation(torch.zeros(2, 9, 40, dtype=torch.float64), e_t @ c_t.T, target, divergence="akl")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_every_hyperparameter_is_checked_whatever_the_divergence():
    """``beta=3`` with the default ``divergence="kl"`` is a mistake, not a no-op."""
    s, t = logit_pair()
    for kw, name in ((dict(beta=3.0), "beta"), (dict(mu=-0.5), "mu"), (dict(gamma=0.0), "gamma")):
        for divergence in DIVERGENCES:
            with pytest.raises(ValueError, match=name):
                xe.distillation(s, t, divergence=divergence, **kw)


@pytest.mark.parametrize(
    "module,kw,error,text",
    [
        ("DistillationLoss", dict(tempreature=2.0), TypeError, r"argument 'tempreature'; did you mean 'temperature'"),
        ("DistillationLoss", dict(target=None), TypeError, "unexpected keyword argument 'target'"),
        ("DistillationLoss", dict(chunk_size=8), TypeError, "unexpected keyword argument 'chunk_size'"),
        ("DistillationLoss", dict(temperature=-2.0), ValueError, "temperature must be > 0"),
        ("DistillationLoss", dict(divergence="foo"), ValueError, "unknown divergence 'foo'"),
        ("DistillationLoss", dict(reduction="batchmean"), ValueError, "reduction"),
        ("DistillationLoss", dict(ignore_index=0.5), TypeError, "ignore_index must be an int"),
        ("LinearDistillationLoss", dict(chunk_size=-3), ValueError, "chunk_size must be a positive int"),
        ("LinearDistillationLoss", dict(beta=3.0), ValueError, r"beta must be in \[0, 1\]"),
        ("LinearDistillationLoss", dict(backend="triton"), ValueError, "backend must be 'auto' or 'torch'"),
        ("LinearDistillationLoss", dict(ce_weight=-1.0), ValueError, "ce_weight"),
    ],
)
def test_module_forms_check_every_option_at_construction(module, kw, error, text):
    with pytest.raises(error, match=text):
        getattr(xe.nn, module)(**kw)
    if error is ValueError:  # the function's own check, with its message
        s, t = logit_pair()
        call = (lambda: xe.distillation(s, t, **kw)) if module == "DistillationLoss" else (
            lambda: xe.linear_distillation(s, s[:, :4].T.contiguous(), t, t[:, :4].T.contiguous(), **kw))  # fmt: skip
        with pytest.raises(error, match=text):
            call()


def test_module_forms_keep_their_options():
    crit = xe.nn.LinearDistillationLoss(divergence="akl", mu=0.3, chunk_size=16, ce_weight=0.1)
    assert crit.options == dict(divergence="akl", mu=0.3, chunk_size=16, ce_weight=0.1)
    assert "mu=0.3" in repr(crit)
