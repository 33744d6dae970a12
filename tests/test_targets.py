"""HL-Gauss and two-hot targets, bin centres and the expectation read-out (crossent.targets)."""

from __future__ import annotations

import pytest
import torch

import crossent as xe
import reference_whole_row as ref
from crossent import targets as T

RANGES = [(-1.0, 1.0, 8), (0.0, 10.0, 51), (-3.0, 7.0, 2), (5.0, 6.0, 200)]


def _ys(v_min, v_max, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    span = v_max - v_min
    inside = v_min + span * torch.rand(n, generator=g, dtype=torch.float64)
    edges = torch.tensor([v_min, v_max, v_min - 0.3 * span, v_max + 5 * span, -1e6, 1e6], dtype=torch.float64)
    return torch.cat([inside, edges])


@pytest.mark.parametrize("v_min, v_max, m", RANGES)
@pytest.mark.parametrize("sigma_ratio", [0.75, 0.3, 2.0])
def test_hl_gauss_matches_the_cdf_formula(v_min, v_max, m, sigma_ratio):
    ys = _ys(v_min, v_max)
    got = T.hl_gauss(ys, v_min, v_max, m, sigma_ratio)
    assert got.shape == (ys.shape[0], m) and got.dtype == torch.float64
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(ys.shape[0], dtype=torch.float64), rtol=0, atol=1e-14)
    expect = torch.stack([ref.hl_gauss(y, v_min, v_max, m, sigma_ratio) for y in ys.tolist()])
    # Edges placed by linspace vs by v_min + span * i / m differ by an ulp, which moves a mass by up to
    # ulp * density ~ 1e-13 for narrow bins: compare absolutely.
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


def test_hl_gauss_tails_keep_relative_precision():
    y, v_min, v_max, m = 0.1, 0.0, 1.0, 16
    got = T.hl_gauss(torch.tensor([y], dtype=torch.float64), v_min, v_max, m)[0]
    expect = ref.hl_gauss_by_quadrature(y, v_min, v_max, m)
    assert got[-1] < 1e-15  # a tail bin, where erf differences would have no correct digits left
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=0)


@pytest.mark.parametrize("v_min, v_max, m", RANGES)
def test_two_hot_matches_reference_and_reads_back_exactly(v_min, v_max, m):
    ys = _ys(v_min, v_max, seed=1)
    got = T.two_hot(ys, v_min, v_max, m)
    expect = torch.stack([ref.two_hot(y, v_min, v_max, m) for y in ys.tolist()])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    assert ((got > 0).sum(-1) <= 2).all()
    centers = T.bin_centers(v_min, v_max, m, dtype=torch.float64)
    readout = got @ centers
    clipped = ys.clamp(centers[0].item(), centers[-1].item())
    torch.testing.assert_close(readout, clipped, rtol=1e-13, atol=1e-13)
    # The expectation of log-probabilities gives back the same mean (zero bins get -inf logits).
    torch.testing.assert_close(T.expectation(torch.log(got), v_min, v_max), clipped, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("v_min, v_max, m", [(-1.0, 1.0, 16), (0.0, 10.0, 51), (5.0, 6.0, 200)])
def test_hl_gauss_expectation_recovers_y(v_min, v_max, m):
    width = (v_max - v_min) / m
    sigma = 0.75 * width
    ys = _ys(v_min, v_max, n=200, seed=2)[:200]
    readout = T.expectation(torch.log(T.hl_gauss(ys, v_min, v_max, m)), v_min, v_max)
    assert ((readout - ys).abs() < width).all()  # the truncation pulls y near an end inwards, by < 0.8 sigma
    interior = (ys - v_min > 4 * sigma) & (v_max - ys > 4 * sigma)
    assert interior.sum() > 50
    # Away from the ends the truncation is negligible and the discretisation error of a Gaussian
    # of width 0.75 bins is ~exp(-2 pi^2 0.75^2) of a bin.
    assert ((readout - ys)[interior].abs() < 1e-3 * width).all()


def test_soft_target_cross_entropy_with_hl_gauss():
    ys = torch.tensor([0.2, -0.6, 0.9], dtype=torch.float64)
    probs = T.hl_gauss(ys, -1.0, 1.0, 10)
    logits = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    got = xe.cross_entropy(logits, probs)
    expect = -(probs * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)
    got.backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits, -1) - probs).detach() / 3, rtol=1e-12, atol=1e-15)


def test_bin_centers_shapes_dtypes_and_batch_shapes():
    c = T.bin_centers(-2.0, 2.0, 4)
    assert c.dtype == torch.get_default_dtype()
    torch.testing.assert_close(c, torch.tensor([-1.5, -0.5, 0.5, 1.5]))  # not the 0.0.1 sign-flipped -0.5s
    ys = torch.rand(2, 3, 5) * 2 - 1
    assert T.hl_gauss(ys, -1.0, 1.0, 7).shape == (2, 3, 5, 7)
    assert T.two_hot(ys, -1.0, 1.0, 7).shape == (2, 3, 5, 7)
    assert T.two_hot(torch.tensor(0.3), -1.0, 1.0, 7).shape == (7,)
    assert T.hl_gauss(torch.tensor([1, 2]), 0, 3, 3).dtype == torch.get_default_dtype()
    assert torch.equal(T.two_hot(torch.tensor([0.4, 9.0]), 0.0, 1.0, 1), torch.ones(2, 1))
    half = T.expectation(torch.zeros(3, 4, dtype=torch.bfloat16), 0.0, 1.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.full((3,), 0.5))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: T.hl_gauss(torch.zeros(2), 1.0, 1.0, 4), ValueError, "v_min must be < v_max"),
        (lambda: T.hl_gauss(torch.zeros(2), 0.0, float("inf"), 4), ValueError, "v_max must be a finite"),
        (lambda: T.two_hot(torch.zeros(2), 0.0, 1.0, 0), ValueError, "num_bins must be a positive int"),
        (lambda: T.two_hot(torch.zeros(2), 0.0, 1.0, 2.0), ValueError, "num_bins must be a positive int"),
        (lambda: T.hl_gauss(torch.zeros(2), 0.0, 1.0, 4, sigma_ratio=0.0), ValueError, "sigma_ratio must be > 0"),
        (lambda: T.hl_gauss([0.1], 0.0, 1.0, 4), TypeError, "y must be a tensor"),
        (lambda: T.two_hot(torch.zeros(2, dtype=torch.bool), 0.0, 1.0, 4), TypeError, "real values"),
        (lambda: T.expectation(torch.zeros(3, dtype=torch.long), 0.0, 1.0), TypeError, "floating-point"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
