"""Transition-matrix estimation (Patrini et al. 2017), RENT and Dirichlet weight sampling (Bae et al. 2024)
against references written from docs/weighting.md."""

import numpy as np
import pytest
import torch

import crossent as xe
from crossent.weighting import RENT, DirichletWeightSampling, estimate_transition_matrix
from crossent.weighting._noisy_labels import _anchor_below_percentile


def ref_estimate(eta, percentile, labels=None):
    """The anchor-point estimator of the official code (numpy; on a copy, without its in-place write)."""
    eta = np.array(eta, dtype=np.float64)
    c = eta.shape[1]
    T = np.empty((c, c))
    for i in range(c):
        rows = eta if labels is None else eta[labels == i]
        col = rows[:, i].copy()
        if percentile is not None:
            threshold = np.percentile(col, percentile, method="higher")
            col[col >= threshold] = 0.0
        T[i] = rows[np.argmax(col)]
    return T / T.sum(1, keepdims=True)


def random_probs(n, c, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, c, generator=gen, dtype=torch.float64), -1)


@pytest.mark.parametrize("percentile", [None, 97.0, 90.0, 50.0])
def test_estimate_matches_reference(percentile):
    probs = random_probs(300, 6, seed=0)
    got = estimate_transition_matrix(probs, percentile=percentile)
    np.testing.assert_allclose(got.numpy(), ref_estimate(probs.numpy(), percentile), rtol=1e-12)
    labels = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(1))
    got = estimate_transition_matrix(probs, labels, percentile=percentile)
    np.testing.assert_allclose(got.numpy(), ref_estimate(probs.numpy(), percentile, labels.numpy()), rtol=1e-12)
    assert torch.allclose(got.sum(1), torch.ones(6, dtype=torch.float64))


def test_percentile_rule_matches_numpy_for_every_size():
    gen = torch.Generator().manual_seed(2)
    for n in range(2, 160):
        scores = torch.rand(n, generator=gen, dtype=torch.float64)
        for q in (97.0, 75.0):
            col = scores.numpy().copy()
            col[col >= np.percentile(col, q, method="higher")] = 0.0
            assert _anchor_below_percentile(scores, q) == int(np.argmax(col)), (n, q)


def test_estimate_recovers_a_known_matrix():
    # an ideal noisy-label model: examples of clean class i predict T[i] (with a margin), others are blurred
    T = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.0, 0.7]], dtype=torch.float64)
    blurred = 0.5 * T + 0.5 / 3
    probs = torch.cat([T, blurred, blurred])
    torch.testing.assert_close(estimate_transition_matrix(probs, percentile=None), T)


def test_estimate_does_not_modify_probs_and_errors():
    probs = random_probs(50, 3, seed=3)
    copy = probs.clone()
    estimate_transition_matrix(probs)
    assert torch.equal(probs, copy)
    with pytest.raises(TypeError):
        estimate_transition_matrix(torch.ones(3))
    with pytest.raises(ValueError, match="percentile"):
        estimate_transition_matrix(probs, percentile=0)
    with pytest.raises(ValueError, match="non-negative"):
        estimate_transition_matrix(-probs)
    with pytest.raises(ValueError, match="no example is labelled 1"):
        estimate_transition_matrix(probs, torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        estimate_transition_matrix(probs, torch.zeros(49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        estimate_transition_matrix(probs, torch.full((50,), 3))


def random_T(c, seed, noise=0.4):
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(c, c, generator=gen, dtype=torch.float64)
    return (1 - noise) * torch.eye(c, dtype=torch.float64) + noise * m / m.sum(1, keepdim=True)


def problem(n=24, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=gen)
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return logits, target, losses


def ref_rent_weights(T, probs, target):
    transition = T.T  # the official code stores T transposed: row = noisy label
    true = torch.gather(probs, 1, target.reshape(-1, 1)).squeeze()
    noisy = torch.sum(transition[target] * probs, dim=1)
    return true / (noisy + 1e-12)


def test_rent_matches_official_sampling():
    T = random_T(5, 0)
    logits, target, losses = problem()
    probs = torch.softmax(logits, -1)
    for ratio in (1.0, 0.5, 2.0):
        torch.manual_seed(7)
        w = ref_rent_weights(T, probs, target)
        idx = torch.multinomial(w, num_samples=int(ratio * len(target)), replacement=True)
        expected = losses[idx].mean()
        torch.manual_seed(7)
        got = RENT(T, resample_ratio=ratio)(losses, target=target, probs=probs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(RENT(T).importance(target=target, logits=logits), ref_rent_weights(T, probs, target))


def test_rent_generator_weights_and_state():
    T = random_T(5, 1)
    logits, target, losses = problem(seed=1)
    losses = losses.clone().requires_grad_()
    rent = RENT(T, generator=torch.Generator().manual_seed(3))
    w1 = rent.weights(losses, target=target, logits=logits)
    w2 = rent.weights(losses, target=target, logits=logits)
    assert torch.equal(w1, w2)  # weights() only peeks
    assert w1.sum().item() == pytest.approx(len(target))
    state = rent.state_dict()
    out = rent(losses, target=target, logits=logits)
    torch.testing.assert_close(out, (w1 * losses).mean(), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out, losses)
    torch.testing.assert_close(g, w1 / len(target), rtol=1e-12, atol=1e-12)
    w_ref = ref_rent_weights(T, torch.softmax(logits, -1), target)
    reference = torch.multinomial(w_ref, len(target), replacement=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, losses[reference].mean())
    assert not torch.equal(rent.weights(losses, target=target, logits=logits), w1)  # __call__ moved the generator
    rent.load_state_dict(state)
    assert torch.equal(rent.weights(losses, target=target, logits=logits), w1)


def test_rent_weights_leave_the_global_rng_alone():
    T = random_T(5, 2)
    logits, target, losses = problem(seed=2)
    torch.manual_seed(11)
    RENT(T).weights(losses, target=target, logits=logits)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))


def test_rent_identity_T_weights_are_one():
    logits, target, losses = problem(seed=4)
    w = RENT(torch.eye(5)).importance(target=target, logits=logits)
    torch.testing.assert_close(w, torch.ones(24, dtype=torch.float64))


def test_dws_matches_official_sampling():
    T = random_T(5, 5)
    logits, target, losses = problem(seed=5)
    probs = torch.softmax(logits, -1)
    for alpha, draws in ((10.0, None), (1000.0, 7)):
        torch.manual_seed(13)
        true = torch.gather(probs, 1, target.reshape(-1, 1)).squeeze() + 1e-12
        noisy = torch.sum(T.T[target] * probs, dim=1) + 1e-12
        w = true / noisy
        m = torch.distributions.Dirichlet(alpha * w / w.sum())
        expected = torch.mean(torch.matmul(m.sample((1, draws or len(target)))[0], losses))
        torch.manual_seed(13)
        got = DirichletWeightSampling(T, alpha=alpha, num_draws=draws)(losses, target=target, probs=probs)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dws_generator_weights_and_limits():
    T = random_T(5, 6)
    logits, target, losses = problem(seed=6)
    losses = losses.clone().requires_grad_()
    dws = DirichletWeightSampling(T, alpha=50.0, generator=torch.Generator().manual_seed(0))
    w = dws.weights(losses, target=target, logits=logits)
    assert torch.equal(w, dws.weights(losses, target=target, logits=logits))
    out = dws(losses, target=target, logits=logits)
    torch.testing.assert_close(out, (w * losses).mean(), rtol=1e-10, atol=1e-12)
    assert w.sum().item() == pytest.approx(len(target))
    # a very large alpha approaches the normalised importance weights
    big = DirichletWeightSampling(T, alpha=1e9, generator=torch.Generator().manual_seed(0))
    imp = RENT(T).importance(target=target, logits=logits)
    w_big = big.weights(losses, target=target, logits=logits)
    torch.testing.assert_close(w_big, imp / imp.sum() * len(target), rtol=1e-3, atol=1e-3)
    state = dws.state_dict()
    a = dws(losses, target=target, logits=logits)
    dws.load_state_dict(state)
    torch.testing.assert_close(dws(losses, target=target, logits=logits), a)


@pytest.mark.parametrize("cls,kwargs", [(RENT, {}), (DirichletWeightSampling, {"alpha": 1.0})])
def test_sampling_errors(cls, kwargs):
    with pytest.raises(ValueError, match="row-stochastic"):
        cls(torch.tensor([[0.9, 0.2], [0.0, 1.0]]), **kwargs)
    with pytest.raises(ValueError, match="square"):
        cls(torch.ones(2, 3) / 3, **kwargs)
    with pytest.raises(TypeError, match="Generator"):
        cls(torch.eye(2), generator=0, **kwargs)
    s = cls(torch.eye(2), **kwargs)
    losses, target = torch.ones(3), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="exactly one"):
        s(losses, target=target)
    with pytest.raises(ValueError, match="exactly one"):
        s(losses, target=target, probs=torch.ones(3, 2) / 2, logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        s(losses, target=target, logits=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        s(losses, target=torch.tensor([0, 2, 1]), logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        s(losses, target=torch.tensor([0, 1]), logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-negative"):
        s(losses, target=target, probs=-torch.ones(3, 2))
    with pytest.raises(ValueError, match="no generator"):
        s.load_state_dict({"generator": torch.Generator().get_state()})


def test_sampling_hyperparameter_errors():
    with pytest.raises(ValueError, match="resample_ratio"):
        RENT(torch.eye(2), resample_ratio=0)
    with pytest.raises(ValueError, match="draws no row"):
        RENT(torch.eye(2), resample_ratio=0.1)(torch.ones(3), target=torch.tensor([0, 1, 1]), logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="alpha"):
        DirichletWeightSampling(torch.eye(2), alpha=0)
    with pytest.raises(ValueError, match="num_draws"):
        DirichletWeightSampling(torch.eye(2), alpha=1, num_draws=0)


def test_end_to_end_with_crossent_losses():
    """Per-row losses from crossent feed the strategies; T estimated from the model's probabilities."""
    logits, target, _ = problem(n=60, c=4, seed=8)
    logits = logits.clone().requires_grad_()
    T = estimate_transition_matrix(torch.softmax(logits.detach(), -1), target)
    losses = xe.cross_entropy(logits, target, reduction="none")
    out = RENT(T, generator=torch.Generator().manual_seed(0))(losses, target=target, logits=logits)
    out.backward()
    assert torch.isfinite(logits.grad).all()
    fwd = xe.cross_entropy(logits, target, loss=xe.weighting.ForwardCorrection(T))
    assert torch.isfinite(fwd)
