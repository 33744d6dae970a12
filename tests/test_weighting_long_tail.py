"""ClassBalanced (Cui et al. 2019) and LogitAdjustment (Menon et al. 2021) against references from docs/weighting.md."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.weighting import ClassBalanced, LogitAdjustment


def ref_cb_class_weights(counts, beta):
    # the official numpy form: (1 - beta) / (1 - beta^n), rescaled to sum to C
    counts = np.asarray(counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return w / w.sum() * len(counts)


def test_class_balanced_hand_case():
    # beta = 0.5, counts (1, 2): raw (0.5/0.5, 0.5/0.75) = (1, 2/3), sum 5/3 -> (6/5, 4/5)
    cb = ClassBalanced([1, 2], beta=0.5)
    torch.testing.assert_close(cb.class_weights, torch.tensor([1.2, 0.8]))
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    torch.testing.assert_close(cb.weights(losses, target=target), torch.tensor([1.2, 0.8, 0.8], dtype=torch.float64))
    torch.testing.assert_close(cb(losses, target=target), torch.tensor((1.2 + 1.6 + 3.2) / 3, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99, 0.999, 0.9999])
def test_class_balanced_random_against_reference(beta):
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 5000, (12,), generator=gen)
    cb = ClassBalanced(counts, beta=beta)
    ref = ref_cb_class_weights(counts.numpy(), beta)
    np.testing.assert_allclose(cb._weights64.numpy(), ref, rtol=1e-10)
    assert cb.class_weights.sum().item() == pytest.approx(12, rel=1e-6)
    losses = torch.rand(40, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 12, (40,), generator=gen)
    out = cb(losses, target=target)
    w = torch.tensor(ref)[target]
    torch.testing.assert_close(out, (w * losses).mean(), rtol=1e-10, atol=0)
    (g,) = torch.autograd.grad(out, losses)
    torch.testing.assert_close(g, w / 40, rtol=1e-10, atol=0)
    assert not cb.weights(losses, target=target).requires_grad


def test_class_balanced_beta_limits():
    counts = torch.tensor([100, 10, 1])
    torch.testing.assert_close(ClassBalanced(counts, beta=0.0).class_weights, torch.ones(3))
    inv = 1 / counts.double()
    near_one = ClassBalanced(counts, beta=1 - 1e-9)._weights64
    torch.testing.assert_close(near_one, inv / inv.sum() * 3, rtol=1e-6, atol=0)


def test_class_balanced_ignore_index_and_shapes():
    cb = ClassBalanced([3, 1], beta=0.9)
    losses = torch.tensor([[1.0, 5.0], [2.0, 7.0]])
    target = torch.tensor([[0, -100], [1, -100]])
    w = cb.weights(losses, target=target)
    assert w.shape == (2, 2) and w[0, 1] == 0 and w[1, 1] == 0
    expected = (cb.class_weights[0] * 1.0 + cb.class_weights[1] * 2.0) / 2
    torch.testing.assert_close(cb(losses, target=target), expected)
    assert cb(losses, target=torch.full((2, 2), -100)).item() == 0.0


def test_class_balanced_errors():
    with pytest.raises(ValueError, match="non-negative"):
        ClassBalanced([10, -1])
    with pytest.raises(ValueError, match="count 0"):
        ClassBalanced([10, 0, 3])
    with pytest.raises(ValueError, match="beta"):
        ClassBalanced([1, 2], beta=1.0)
    with pytest.raises(ValueError, match="1-D"):
        ClassBalanced([[1, 2]])
    cb = ClassBalanced([1, 2])
    with pytest.raises(ValueError, match="outside"):
        cb(torch.ones(2), target=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        cb(torch.ones(2), target=torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError):
        cb(torch.ones(2), target=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError):
        cb([1.0, 2.0], target=torch.tensor([0, 1]))


def ref_la_bias(priors, tau):
    return torch.log(torch.as_tensor(priors, dtype=torch.float64) ** tau + 1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_logit_adjusted_loss_against_reference(tau):
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 1000, (8,), generator=gen).double()
    priors = counts / counts.sum()
    la = LogitAdjustment(priors, tau=tau)
    torch.testing.assert_close(la.bias, ref_la_bias(priors, tau).float())
    z = torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 8, (16,), generator=gen)
    for out in (la(z, y), xe.cross_entropy(z, y, loss=la.loss()), xe.cross_entropy(z, y, loss=la.loss("ce"))):
        ref = F.cross_entropy(z + ref_la_bias(priors, tau), y)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)  # bias stored in float32
        g, g_ref = torch.autograd.grad(out, z)[0], torch.autograd.grad(ref, z)[0]
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)
    # keyword arguments go through to cross_entropy
    out = la(z, y, reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(z + ref_la_bias(priors, tau), y, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_logit_adjustment_other_base_loss():
    la = LogitAdjustment([0.7, 0.2, 0.1])
    z = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    out = xe.cross_entropy(z, y, loss=la.loss(xe.losses.ZLoss(0.5)), reduction="none")
    ref = 0.5 * torch.logsumexp(z + la.bias.double(), -1) ** 2
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_posthoc_adjustment():
    priors = torch.tensor([0.6, 0.3, 0.1])
    la = LogitAdjustment(priors, tau=1.0)
    z = torch.tensor([[1.0, 0.5, 0.2], [0.0, 0.0, -1.0]])
    adjusted = la.adjust(z)
    torch.testing.assert_close(adjusted, z - torch.log(priors + 1e-12))
    # row 0: (1.511, 1.704, 2.503) -> 2; row 1: (0.511, 1.204, 1.303) -> 2
    assert la.predict(z).tolist() == [2, 2]
    assert la.predict(z.unsqueeze(0)).shape == (1, 2)  # classes in the last dimension
    assert torch.equal(LogitAdjustment(priors, tau=0.0).predict(z), z.argmax(-1))  # tau = 0: no adjustment


def test_logit_adjustment_from_counts_and_errors():
    la = LogitAdjustment.from_counts(torch.tensor([30, 10]))
    torch.testing.assert_close(la.priors, torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        LogitAdjustment([0.5, -0.1])
    with pytest.raises(ValueError, match="all be zero"):
        LogitAdjustment.from_counts([0, 0])
    with pytest.raises(ValueError, match="classes"):
        la.adjust(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="3 classes"):
        xe.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), loss=la.loss())
    with pytest.raises(TypeError):
        la.adjust(torch.zeros(2, 2, dtype=torch.long))
