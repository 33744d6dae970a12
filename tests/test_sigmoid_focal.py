"""``crossent.losses.sigmoid_focal_loss`` against torchvision's formula.

torchvision cannot be installed beside this torch build, so the reference
(``reference_whole_row.torchvision_sigmoid_focal``) writes out the formula of
``torchvision/ops/focal_loss.py`` (``p = sigmoid(x)``, ``ce = BCEWithLogits``,
``p_t = p t + (1-p)(1-t)``, ``ce (1-p_t)^gamma``, times ``alpha t + (1-alpha)(1-t)`` when
``alpha >= 0``; mean/sum over all elements), the form verified against that file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference_whole_row as ref
from crossent.losses import sigmoid_focal_loss


def _data(shape, soft, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    t = torch.rand(*shape, generator=g, dtype=torch.float64)
    return x, (t if soft else (t > 0.7).to(torch.float64))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha", [0.25, 0.7, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
@pytest.mark.parametrize("soft", [False, True])
def test_matches_torchvision_formula(reduction, alpha, gamma, soft):
    x, t = _data((4, 3, 5), soft, seed=int(gamma * 10) + soft)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = sigmoid_focal_loss(xa, t, alpha=alpha, gamma=gamma, reduction=reduction)
    expect = ref.torchvision_sigmoid_focal(xb, t, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-14)
    up = torch.randn_like(got)
    (got * up).sum().backward()
    (expect * up).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)


def test_defaults_and_float32():
    x, t = _data((6, 4), False, seed=1)
    got = sigmoid_focal_loss(x.float(), t.float())
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    torch.testing.assert_close(got.double(), ref.torchvision_sigmoid_focal(x, t), rtol=1e-5, atol=1e-7)
    assert torch.equal(sigmoid_focal_loss(x, t.long()), sigmoid_focal_loss(x, t))


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_inputs_keep_finite_gradients(gamma, dtype):
    # 1 - p_t underflows to 0 for confident correct predictions: (1 - p_t)**gamma then has an infinite
    # derivative for gamma < 1 in the naive form; the log-space form stays finite and exact.
    x = torch.tensor([1e4, -1e4, 40.0, -40.0, 1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=dtype)
    out = sigmoid_focal_loss(x, t, gamma=gamma)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    xd = x.detach().double()
    exact_one_minus_pt = torch.where(t.double() > 0, torch.sigmoid(-xd), torch.sigmoid(xd))
    bce = F.binary_cross_entropy_with_logits(xd, t.double(), reduction="none")
    alpha_t = 0.25 * t.double() + 0.75 * (1 - t.double())
    torch.testing.assert_close(out.double(), alpha_t * bce * exact_one_minus_pt**gamma, rtol=1e-5, atol=torch.finfo(dtype).tiny)


def test_soft_target_gradient_is_finite_inside_the_interval():
    x = torch.randn(5, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    tr = t.detach().clone().requires_grad_(True)
    sigmoid_focal_loss(x, t, gamma=1.5).sum().backward()
    ref.torchvision_sigmoid_focal(x, tr, gamma=1.5).sum().backward()
    torch.testing.assert_close(t.grad, tr.grad, rtol=1e-10, atol=1e-14)


def test_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="shape"):
        sigmoid_focal_loss(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(x, x, gamma=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        sigmoid_focal_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(TypeError, match="tensors"):
        sigmoid_focal_loss([0.0], torch.zeros(1))
