"""The smooth adversarial comp-sum objective and its margin PGD.

The comp-sum term is checked against its definition Phi^tau(sum_{k != y} exp((z_k - z_y)/rho)); the PGD
against closed-form suprema for linear models (L2 ball: epsilon times the top singular value of the
margin map; L-inf ball with two classes: epsilon times the L1 norm of the weight difference).
"""

from __future__ import annotations

import pytest
import torch

import crossent as xe
import reference_whole_row as ref
from crossent.adversarial import margin_pgd, smooth_adversarial_comp_sum


def _linear(c, d, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, c).double()


def _data(n, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("rho", [1.0, 2.5])
def test_comp_sum_term_matches_its_definition(tau, rho):
    model = _linear(4, 3, seed=0)
    x, y = _data(6, 4, 3, seed=1)
    got = smooth_adversarial_comp_sum(model, x, y, tau=tau, rho=rho, nu=0.0, epsilon=0.1, step_size=0.1, steps=1)
    (g_got,) = torch.autograd.grad(got, [model.weight])
    expect = ref.comp_sum_from_definition(model(x) / rho, y, tau).mean()
    (g_exp,) = torch.autograd.grad(expect, [model.weight])
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7, 2.0])
def test_comp_sum_term_agrees_with_the_registry_loss_when_present(tau):
    if "comp_sum" not in xe.losses.available():
        pytest.skip("the comp_sum registry loss is not part of this build")
    model = _linear(5, 3, seed=2)
    x, y = _data(7, 5, 3, seed=3)
    got = smooth_adversarial_comp_sum(model, x, y, tau=tau, rho=2.0, nu=0.0, epsilon=0.0, step_size=0.0, steps=0)
    expect = xe.cross_entropy(model(x) / 2.0, y, loss=xe.losses.get("comp_sum", tau=tau))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


def test_l2_pgd_reaches_the_top_singular_value():
    model = _linear(4, 5, seed=4)
    x, y = _data(3, 4, 5, seed=5)
    eps = 0.3
    x_adv = margin_pgd(model, x, y, epsilon=eps, step_size=0.2, steps=200, p=2, generator=torch.Generator().manual_seed(0))
    delta = x_adv - x
    assert (torch.linalg.vector_norm(delta, dim=-1) <= eps * (1 + 1e-12)).all()
    w = model.weight.detach()
    for i in range(3):
        a = w - w[y[i]]  # rows: the change of each margin per unit input change
        sup = eps * torch.linalg.matrix_norm(a, ord=2)
        torch.testing.assert_close(torch.linalg.vector_norm(a @ delta[i]), sup, rtol=1e-6, atol=0)


def test_linf_pgd_reaches_the_vertex_optimum_for_two_classes():
    model = _linear(2, 6, seed=6)
    x, y = _data(4, 2, 6, seed=7)
    eps = 0.05
    x_adv = margin_pgd(model, x, y, epsilon=eps, step_size=eps, steps=3, p="inf")
    delta = x_adv - x
    assert delta.abs().max() <= eps * (1 + 1e-12)
    a = (model.weight[1] - model.weight[0]).detach()
    # Delta(x')-Delta(x) has one non-zero entry, +-(a . delta): its sup over the box is eps * ||a||_1.
    gap = (delta @ a).abs()
    torch.testing.assert_close(gap, torch.full((4,), eps * a.abs().sum().item(), dtype=torch.float64), rtol=1e-12, atol=0)


def test_full_objective_value_and_gradient():
    model = _linear(3, 4, seed=8)
    x, y = _data(5, 3, 4, seed=9)
    x = x.clamp(-1.0, 1.0)  # inputs inside the valid range given by clip
    kw = dict(epsilon=0.2, step_size=0.05, steps=7, p="inf", clip=(-1.0, 1.0))
    got = smooth_adversarial_comp_sum(
        model, x, y, tau=1.5, rho=2.0, nu=0.7, reduction="sum", generator=torch.Generator().manual_seed(3), **kw
    )
    grads = torch.autograd.grad(got, list(model.parameters()))
    x_adv = margin_pgd(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    assert (x_adv <= 1).all() and (x_adv >= -1).all() and ((x_adv - x).abs() <= 0.2 + 1e-12).all()
    z, z_adv = model(x), model(x_adv)
    margins = lambda t: t - t.gather(-1, y[:, None])  # noqa: E731
    expect = (
        ref.comp_sum_from_definition(z / 2.0, y, 1.5) + 0.7 * ((margins(z_adv) - margins(z)) ** 2).sum(-1).sqrt()
    ).sum()
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(expect, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # the attack leaves no parameter gradients


def test_reductions_and_zero_radius():
    model = _linear(3, 2, seed=10)
    x, y = _data(4, 3, 2, seed=11)
    common = dict(tau=1.0, rho=1.0, nu=1.0, epsilon=0.0, step_size=0.1, steps=2)
    per = smooth_adversarial_comp_sum(model, x, y, reduction="none", **common)
    assert per.shape == (4,)
    # With epsilon = 0 the smooth term vanishes: plain cross-entropy.
    torch.testing.assert_close(per, torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(smooth_adversarial_comp_sum(model, x, y, **common), per.mean())
    torch.testing.assert_close(smooth_adversarial_comp_sum(model, x, y, reduction="sum", **common), per.sum())


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(p=1), ValueError, "p must be 'inf'"),
        (dict(rho=0.0), ValueError, "rho must be > 0"),
        (dict(tau=-1.0), ValueError, "tau must be >= 0"),
        (dict(nu=-0.1), ValueError, "nu must be >= 0"),
        (dict(steps=1.5), TypeError, "steps must be an int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(clip=(1.0, 0.0)), ValueError, "clip must be"),
    ],
)
def test_errors(change, exc, match):
    model = _linear(3, 2, seed=12)
    x, y = _data(2, 3, 2, seed=13)
    kw = dict(tau=1.0, rho=1.0, nu=1.0, epsilon=0.1, step_size=0.1, steps=1) | change
    with pytest.raises(exc, match=match):
        smooth_adversarial_comp_sum(model, x, y, **kw)
    with pytest.raises(TypeError, match="required keyword-only argument"):
        smooth_adversarial_comp_sum(model, x, y, tau=1.0, rho=1.0, epsilon=0.1, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="one class index per input"):
        smooth_adversarial_comp_sum(model, x, y[:1], tau=1.0, rho=1.0, nu=1.0, epsilon=0.1, step_size=0.1, steps=1)
