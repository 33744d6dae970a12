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
    """KL(P || Q) per row."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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
    if name == "akl":
        # wutaiqiang/LLM_KD_AKL: sort the teacher, head = cumulative mass <= mu (top-1 always), errors |p_t - sg(p)|.
        pt, p = log_pt.exp(), log_p.exp().detach()
        sorted_pt, order = pt.sort(-1, descending=True)
        errors = (sorted_pt - p.gather(-1, order)).abs()
        tail = sorted_pt.cumsum(-1) > mu
        tail[:, 0] = False
        head_error = errors.masked_fill(tail, 0.0).sum(-1)
        tail_error = errors.masked_fill(~tail, 0.0).sum(-1)
        total = head_error + tail_error
        return head_error / total * kl_rows(log_pt, log_p) + tail_error / total * kl_rows(log_p, log_pt)
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
    assert got.dtype == torch.bfloat16
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
