"""Hyperparameters at their limits: finite logits give finite, correct values and gradients, or a clear refusal.

How these were found: ``LDRKL(lam=1e-40)`` (the hinge limit) returned NaN on float32 logits, because
``z / lam`` overflowed before the log-sum-exp subtracted its maximum. The same class nearby: ALDR-KL at
tiny and large temperatures and an ``alpha`` near 1 or huge, the normalized focal loss at a large
``gamma`` (every ``(1 - p)^gamma`` underflowing to 0 / 0), NGCE as ``q -> 0`` (its denominator
``C - sum p^q`` cancelling to 0) and the truncated GCE's constant as ``q -> 0``.

References are the formulas themselves: in float64 with ``torch.logsumexp`` (exact for any temperature
in range, since it subtracts the maximum of ``a / lam`` after the division), in ``mpmath`` at 50 digits
where float64 cannot hold the formula, and the hinge ``max_k a_k`` at the limit. Tolerances: float32
1e-5 relative plus the temperature times 3e-7 (the rounding of a log-sum near ``lam log C``), float64
1e-12.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

import crossent as xe
import reference_streaming as R
from crossent.losses import LDRKL, NGCE, TGCE, AdaptiveLDRKL, NormalizedFocal
from test_extreme_logits import shards

N, C = 6, 5
TEMPERATURES = [1e-300, 1e-40, 1e-20, 1e-3, 1.0, 1e3]


def logits(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    return z, torch.tensor([0, 1, 2, 3, 4, 0])


def tol(dtype, lam=0.0):
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-6 + 3e-7 * lam)
    return dict(rtol=1e-12, atol=1e-12 * (1 + lam))


def reference(fn, z):
    """Value and gradient (of the sum of rows) of a float64 formula on ``z`` (rounded inputs kept)."""
    x = z.detach().double().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def run(loss, z, y, **kw):
    x = z.detach().clone().requires_grad_()
    out = xe.cross_entropy(x, y, loss=loss, reduction="none", **kw)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    return out.detach().double(), x.grad.double()


# -- LDR-KL ------------------------------------------------------------------------------------------
def test_ldr_kl_at_the_hinge_limit_on_float32_logits():
    """The report: lam = 1e-40 on finite float32 logits. The value is the Crammer-Singer hinge
    max_k (z_k - z_y + c [k != y]) (the rest, lam log(ties / C), is 1e-40), the gradient e_k* - e_y."""
    z, y = logits(torch.float32)
    out, grad = run(LDRKL(lam=1e-40, margin=0.1), z, y)
    a = z.double() - z.double().gather(1, y[:, None]) + 0.1 * (1 - torch.nn.functional.one_hot(y, C).double())
    torch.testing.assert_close(out, a.amax(1), rtol=1e-7, atol=1e-30)
    top = torch.nn.functional.one_hot(a.argmax(1), C).double()
    torch.testing.assert_close(grad, top - torch.nn.functional.one_hot(y, C).double(), rtol=0, atol=1e-30)


@pytest.mark.parametrize("normalize", [None, "l1", "softplus"])
@pytest.mark.parametrize("lam", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ldr_kl_over_temperatures(dtype, lam, normalize):
    z, y = logits(dtype)
    out, grad = run(LDRKL(lam=lam, normalize=normalize), z, y)
    want, want_grad = reference(lambda x: R.ldr_kl(x, y, lam=lam, normalize=normalize), z)
    torch.testing.assert_close(out, want, **tol(dtype, lam))
    torch.testing.assert_close(grad, want_grad, **tol(dtype))


@pytest.mark.parametrize("bounds", [(0, 2, 5), (0, 1, 3, 5), (0, 3, 3, 5)])
@pytest.mark.parametrize("lam", [1e-40, 1e3])
def test_ldr_kl_states_merge_at_any_temperature(lam, bounds):
    """Over column shards (the vocabulary-parallel engine's steps): the tempered states merge with the
    maximum in logit units, and each shard's gradient is the tempered softmax of its columns."""
    z, y = logits(torch.float32)
    per_row, grad = shards(z, y, bounds, loss=LDRKL(lam=lam))
    want, want_grad = reference(lambda x: R.ldr_kl(x, y, lam=lam), z)
    torch.testing.assert_close(per_row, want, **tol(torch.float32, lam))
    torch.testing.assert_close(grad.double(), want_grad, **tol(torch.float32))


@pytest.mark.parametrize("lam", [1e-40, 1e3])
def test_ldr_kl_on_the_row_chunked_engine(lam):
    z, y = logits(torch.float32)
    e, c = torch.eye(N).requires_grad_(), z.T.contiguous().requires_grad_()  # e @ c.T == z exactly
    out = xe.linear_cross_entropy(e, c, y, loss=LDRKL(lam=lam), reduction="none", chunk_size=4)
    out.sum().backward()
    want, want_grad = reference(lambda x: R.ldr_kl(x, y, lam=lam), z)
    torch.testing.assert_close(out.double(), want, **tol(torch.float32, lam))
    torch.testing.assert_close(e.grad.double(), want_grad @ z.double().T, **tol(torch.float32))


def test_ldr_kl_refuses_temperatures_it_cannot_resolve():
    """Above 1e3 the loss is a difference of numbers near lam log C: refused, not rounded to 0."""
    LDRKL(lam=1e3)
    with pytest.raises(ValueError, match=r"ldr_kl: lam must be in \(0, 1000\], got 1e\+30"):
        LDRKL(lam=1e30)


# -- ALDR-KL -----------------------------------------------------------------------------------------
def aldr_reference(z, y, lam0, margin, alpha):
    """One step of ALDR-KL from the stored lam0, in mpmath: (per-row loss, new lambdas, the weights
    dloss/da_k of the violations a = s - s_y + c [k != y])."""
    mpmath.mp.dps = 50
    c = z.shape[1]
    s = z.double() / (z.double().abs().sum(1, keepdim=True) / c)
    a = s - s.gather(1, y[:, None]) + margin * (1 - torch.nn.functional.one_hot(y, c).double())
    mp_lam0, log_c = mpmath.mpf(lam0), mpmath.log(c)
    losses, lams, weights = [], [], []
    for s_row, a_row in zip(s.tolist(), a.tolist()):
        top = max(s_row)
        p = [mpmath.exp((mpmath.mpf(v) - top) / mp_lam0) for v in s_row]
        q = [pk / mpmath.fsum(p) + mpmath.mpf("1e-5") for pk in p]
        q = [qk / mpmath.fsum(q) for qk in q]
        kl = mpmath.fsum(qk * mpmath.log(c * qk) for qk in q)
        lam = mp_lam0 - mp_lam0 * kl / (alpha * log_c)
        top = max(a_row)
        e = [mpmath.exp((mpmath.mpf(v) - top) / lam) for v in a_row]
        ldr = top + lam * mpmath.log(mpmath.fsum(e) / c)
        prior = alpha * log_c / (2 * mp_lam0) * (lam - mp_lam0) ** 2
        losses.append(float(ldr - prior))
        lams.append(float(lam))
        weights.append([float(ek / mpmath.fsum(e)) for ek in e])
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (losses, lams, weights))


def aldr_grad(z, y, margin, weights):
    """sum_k w_k da_k / dz with the reference weights (lambda and the prior are constants of z)."""
    x = z.detach().double().requires_grad_()
    s = x / (x.abs().sum(1, keepdim=True) / x.shape[1])
    a = s - s.gather(1, y[:, None]) + margin * (1 - torch.nn.functional.one_hot(y, x.shape[1]).double())
    (grad,) = torch.autograd.grad((a * weights.double()).sum(), x)
    return grad


ALDR_CASES = [
    dict(lam0=lam0, margin=0.1, alpha=2.0) for lam0 in TEMPERATURES
] + [
    dict(lam0=1.0, margin=0.1, alpha=1.0 + 1e-12),
    dict(lam0=1e-3, margin=0.1, alpha=1e300),
    dict(lam0=1.0, margin=-0.5, alpha=3.0),
]


@pytest.mark.parametrize("hp", ALDR_CASES, ids=lambda hp: ",".join(f"{k}={v:g}" for k, v in hp.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aldr_kl_over_temperatures(dtype, hp):
    z, y = logits(dtype)
    crit = AdaptiveLDRKL(num_samples=N, **hp)
    out, grad = run(crit, z, y, extra={"sample_ids": torch.arange(N)})
    want, lam, weights = aldr_reference(z, y, **hp)
    torch.testing.assert_close(out, want, **tol(dtype, hp["lam0"]))
    torch.testing.assert_close(grad, aldr_grad(z, y, hp["margin"], weights), **tol(dtype))
    torch.testing.assert_close(crit.lambdas, lam, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert bool((crit.lambdas > 0).all())  # a table that load_state_dict accepts again
    crit.load_state_dict(crit.state_dict())


def test_aldr_kl_refuses_a_reference_temperature_above_the_ldr_bound():
    AdaptiveLDRKL(lam0=1e3)
    with pytest.raises(ValueError, match=r"lam0 must be in \(0, 1000\]"):
        AdaptiveLDRKL(lam0=1e4)


@pytest.mark.parametrize("make", [lambda m: LDRKL(margin=m), lambda m: AdaptiveLDRKL(margin=m, num_samples=N)],
                         ids=["ldr_kl", "aldr_kl"])  # fmt: skip
@pytest.mark.parametrize("margin", [1e300, -1e300])
def test_ldr_margins_beyond_the_logits_dtype(make, margin):
    """A margin float32 cannot hold (it was inf - inf = NaN): float64 logits give the value, about the
    margin; float32 logits its overflow, +inf (or the finite value of a huge negative margin)."""
    for dtype in (torch.float32, torch.float64):
        z, y = logits(dtype)
        x = z.clone().requires_grad_()
        out = xe.cross_entropy(x, y, loss=make(margin), reduction="none", extra={"sample_ids": torch.arange(N)})
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        if margin < 0:
            assert torch.isfinite(out).all()
        elif dtype == torch.float32:
            assert torch.isposinf(out).all()
        else:
            torch.testing.assert_close(out, torch.full((N,), margin, dtype=torch.float64), rtol=1e-12, atol=0)


# -- normalized focal, NGCE, truncated GCE ----------------------------------------------------------
def nfl_mp(z, y, gamma):
    """NFL in mpmath: (1 - p_y)^gamma (-log p_y) / sum_k (1 - p_k)^gamma (-log p_k)."""
    mpmath.mp.dps = 50
    out = []
    for row, t in zip(z.double().tolist(), y.tolist()):
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
        terms = [(1 - mpmath.exp(v - lse)) ** gamma * (lse - v) for v in row]
        out.append(float(terms[t] / mpmath.fsum(terms)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 500.0, 1e10, 1e300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_focal_at_large_gamma(dtype, gamma):
    """At gamma = 500 every (1 - p)^gamma = 0.8^500 of a uniform row of 5 classes underflows float32
    (it was 0 / 0); at 1e10 every row's does, in float64 too."""
    z, y = logits(dtype)
    z[5] = 0.0  # uniform: p = 1/5
    out, _ = run(NormalizedFocal(gamma=gamma), z, y)
    torch.testing.assert_close(out, nfl_mp(z, y, gamma), **tol(dtype))


@pytest.mark.parametrize("q", [1e-3, 0.7])
def test_ngce_near_its_smallest_q(q):
    z, y = logits(torch.float32)
    out, grad = run(NGCE(q=q), z, y)

    def formula(x):  # (1 - p_y^q) / sum_k (1 - p_k^q), each 1 - p^q as -expm1(q log p)
        deficit = -torch.expm1(q * torch.log_softmax(x, -1))
        return deficit.gather(1, y[:, None]).squeeze(1) / deficit.sum(1)

    want, want_grad = reference(formula, z)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=1e-6)


def test_ngce_refuses_a_q_its_denominator_cannot_resolve():
    """q = 1e-9 used to give inf and NaN: C - sum_k p_k^q rounds to 0 in float32."""
    with pytest.raises(ValueError, match=r"ngce: q must be in \[0.001, 1\]"):
        NGCE(q=1e-9)


@pytest.mark.parametrize("q", [1e-300, 1e-12, 0.7])
def test_truncated_gce_constant_at_small_q(q):
    """Below k the loss is L_q(k) = (1 - k^q) / q, which tends to -log k as q -> 0 (it was 0 for q = 1e-300)."""
    k = 0.5
    z = torch.tensor([[-5.0, 0.0]], dtype=torch.float64)  # p_y = sigmoid(-5) < k
    out, _ = run(TGCE(q=q, k=k), z, torch.tensor([0]))
    want = -mpmath.expm1(mpmath.mpf(q) * mpmath.log(k)) / q
    torch.testing.assert_close(out, torch.tensor([float(want)], dtype=torch.float64), rtol=1e-14, atol=0)
    if q < 1e-10:
        assert out.item() == pytest.approx(-math.log(k), rel=1e-9)
