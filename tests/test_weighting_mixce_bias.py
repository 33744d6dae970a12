"""MixCE token weights (Zhang et al. 2023) and bias-loss weights (Abrahamyan et al. 2021, official code) against
references written from docs/weighting.md."""

import math

import pytest
import torch

import crossent as xe
from crossent.weighting import BiasLossWeights, MixCEWeights, Strategy, bias_loss_weights


def ref_mixce(token_losses, mask, eta, reduction):
    # official gpt2.py: q = exp(-loss) without gradient; loss = eta*l + (1-eta)*q*l
    with torch.no_grad():
        q = torch.exp(-token_losses.detach())
    mixed = eta * token_losses + (1.0 - eta) * q * token_losses
    if reduction == "sum":
        return mixed.sum()
    return (mixed * mask).sum() / (1e-15 + mask.sum())


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mixce_against_reference(eta, reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, 4:] = -100
    mask = labels != -100
    token_losses = xe.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    mix = MixCEWeights(eta, reduction=reduction)
    out = mix(token_losses, mask=mask)
    ref = ref_mixce(token_losses, mask.double(), eta, reduction)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(out, logits, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    w = mix.weights(token_losses, mask=mask)
    assert not w.requires_grad
    gold = torch.softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(w, eta + (1 - eta) * gold.where(mask, 1.0))


def test_mixce_eta_one_is_mle_and_errors():
    losses = torch.tensor([0.3, 2.0])
    torch.testing.assert_close(MixCEWeights(1.0)(losses), losses.mean())
    with pytest.raises(ValueError, match="eta"):
        MixCEWeights(1.5)
    with pytest.raises(ValueError, match="reduction"):
        MixCEWeights(reduction="none")
    with pytest.raises(ValueError, match="shape"):
        MixCEWeights()(losses, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError):
        MixCEWeights()(torch.tensor([1, 2]))


class RefBiasLoss:
    """The official BiasLoss (bias_loss/biasloss.py), weights and loss, with its running global minimum.

    ``version="2022"``: the weights since 2022-09, ``exp(alpha v) - beta`` (the paper's); ``"2021"``:
    the first commits', ``exp(beta v) - 1 + alpha``.
    """

    def __init__(self, alpha=0.3, beta=0.3, mode="global", version="2022"):
        self.alpha, self.beta, self.mode, self.global_min = alpha, beta, mode, 100000
        self.version = version

    def __call__(self, features, ce):
        v = torch.var(features.clone().detach().reshape(features.shape[0], -1), dim=1)
        vmin, vmax = v.min(), v.max()
        if self.mode == "global":
            if vmin < self.global_min:
                self.global_min = vmin
            v = (v - self.global_min) / (vmax - vmin)
        else:
            v = (v - vmin) / (vmax - vmin)
        if self.version == "2022":
            weights = torch.exp(v * self.alpha) - self.beta
        else:
            weights = ((torch.exp(v * self.beta) - 1.0) / 1.0) + self.alpha
        return (weights * ce).mean(), weights


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.3), (0.5, 1.0)])
@pytest.mark.parametrize("form,version", [(None, "2022"), ("paper", "2022"), ("code", "2021")])
def test_bias_loss_against_official_over_several_steps(mode, alpha, beta, form, version):
    gen = torch.Generator().manual_seed(1)
    kw = {} if form is None else {"form": form}  # the default is the current official form
    ours, ref = BiasLossWeights(alpha, beta, normalisation=mode, **kw), RefBiasLoss(alpha, beta, mode, version)
    for step in range(4):
        # variances shrink over the steps so the running minimum moves, then a step with larger ones
        scale = [2.0, 1.0, 0.5, 3.0][step]
        features = scale * torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
        ce = torch.rand(6, generator=gen, dtype=torch.float64, requires_grad=True)
        w = ours.weights(ce, features=features)
        out = ours(ce, features=features)
        expected, w_ref = ref(features, ce)
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(out, ce)[0]
        torch.testing.assert_close(g, w_ref / 6, rtol=1e-12, atol=1e-12)
        if mode == "global":
            assert ours.running_min == pytest.approx(float(ref.global_min), rel=1e-12)
    if mode == "global":  # the last batch is normalised by the older, smaller minimum: values exceed 1
        top = math.exp(alpha) - beta if version == "2022" else alpha + math.exp(beta) - 1
        assert (w > top + 1e-9).any()


def test_bias_loss_function_is_local_normalisation_and_paper_form():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    ce = torch.ones(5, dtype=torch.float64)
    _, w_ref = RefBiasLoss(mode="local")(features, ce)
    torch.testing.assert_close(bias_loss_weights(features), w_ref)
    _, w_2021 = RefBiasLoss(mode="local", version="2021")(features, ce)
    torch.testing.assert_close(bias_loss_weights(features, form="code"), w_2021)
    v = features.var(1)
    v = (v - v.min()) / (v.max() - v.min())
    torch.testing.assert_close(bias_loss_weights(features, 0.3, 0.2), torch.exp(0.3 * v) - 0.2)
    assert bias_loss_weights(features).min().item() == pytest.approx(0.7)  # exp(0) - beta
    assert bias_loss_weights(features, form="code").min().item() == pytest.approx(0.3)


def test_bias_state_and_edge_cases():
    b = BiasLossWeights()
    features = torch.randn(4, 10)
    b(torch.ones(4), features=features)
    state = b.state_dict()
    c = BiasLossWeights()
    c.load_state_dict(state)
    assert c.running_min == b.running_min == pytest.approx(features.var(1).min().item())
    # equal variances: v = 0, weights exp(0) - beta (the official code divides by zero)
    same = torch.ones(3, 4) * torch.tensor([0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(bias_loss_weights(same), torch.full((3,), 0.7))
    # the running minimum starts at 1e5: variances (5e5, 2e6) are shifted by 1e5, not by their own minimum
    huge = BiasLossWeights()
    w = huge.weights(torch.ones(2), features=torch.tensor([[0.0, 1000.0], [0.0, 2000.0]]))
    v = (torch.tensor([5e5, 2e6]) - 1e5) / 1.5e6
    torch.testing.assert_close(w, torch.exp(0.3 * v) - 0.3)
    assert huge.running_min == 1e5


def test_bias_errors():
    with pytest.raises(ValueError, match="normalisation"):
        BiasLossWeights(normalisation="batch")
    with pytest.raises(ValueError, match="form"):
        bias_loss_weights(torch.ones(2, 3), form="other")
    with pytest.raises(TypeError):
        bias_loss_weights(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        bias_loss_weights(torch.ones(3, 1))
    with pytest.raises(ValueError, match="rows"):
        BiasLossWeights()(torch.ones(3), features=torch.randn(4, 5))


def test_every_strategy_follows_the_contract():
    assert all(issubclass(cls, Strategy) for cls in (MixCEWeights, BiasLossWeights, xe.weighting.ClassBalanced,
                                                       xe.weighting.LossReweighting, xe.weighting.DoReMi,
                                                       xe.weighting.RENT, xe.weighting.DirichletWeightSampling))
    assert MixCEWeights().state_dict() == {}
    with pytest.raises(ValueError, match="stateless"):
        MixCEWeights().load_state_dict({"x": 1})
    assert "eta=0.5" in repr(MixCEWeights())
