"""The correctness-aware calibration objective and calibrator (Liu et al. 2024) against their formulas.

References are written from the formulas in float64 with plain autograd: the confidence as
``1 / sum_k exp(z_k - max z)``, the two groups' means as explicit sums, the calibrator's features by
looping over views and classes.
"""

from __future__ import annotations

import pytest
import torch

from crossent.calibration import CorrectnessAwareCalibrator, correctness_aware_loss
from crossent_harness.experiments import metrics


def reference_loss(z: torch.Tensor, y: torch.Tensor, balanced: bool) -> torch.Tensor:
    conf = 1 / torch.exp(z - z.max(-1, keepdim=True).values).sum(-1)
    correct = [int(z[i].argmax()) == int(y[i]) for i in range(len(y))]
    right = [(1 - conf[i]) ** 2 for i in range(len(y)) if correct[i]]
    wrong = [conf[i] ** 2 for i in range(len(y)) if not correct[i]]
    if not balanced:
        return (sum(right) + sum(wrong)) / len(y)
    means = [sum(group) / len(group) for group in (right, wrong) if group]
    return sum(means) / len(means)


def batch(n=64, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("case", ["mixed", "all_right", "all_wrong", "one_row"])
def test_loss_values_and_gradients_match_the_formula(balanced, case):
    z, y = batch()
    if case == "all_right":
        y = z.detach().argmax(-1)
    elif case == "all_wrong":
        y = (z.detach().argmax(-1) + 1) % z.shape[1]
    elif case == "one_row":
        z, y = z.detach()[:1].requires_grad_(), y[:1]
    got = correctness_aware_loss(z, y, balanced=balanced)
    want = reference_loss(z, y, balanced)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    g_got, = torch.autograd.grad(got, z)
    g_want, = torch.autograd.grad(want, z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)
    assert g_got.abs().sum() > 0


def test_balanced_loss_weighs_the_groups_as_the_official_code():
    # weights (1 - accuracy) on right rows and accuracy on wrong rows, normalised by their sum
    z, y = batch(n=40, seed=3)
    conf = torch.softmax(z, -1).amax(-1)
    correct = z.argmax(-1) == y
    acc = correct.double().mean()
    w = torch.where(correct, 1 - acc, acc)
    official = (w * (conf - correct.double()) ** 2).sum() / w.sum()
    torch.testing.assert_close(correctness_aware_loss(z, y), official, rtol=1e-12, atol=0)


def test_loss_lowers_confidence_of_wrong_rows_and_raises_it_of_right_ones():
    z, y = batch(n=200, scale=1.0)
    loss = correctness_aware_loss(z, y)
    # d loss / d T_i at T = 1 for z_i / T_i: a flatter right row and a sharper wrong row cost more
    t = torch.ones(len(y), dtype=torch.float64, requires_grad=True)
    correctness_aware_loss(z.detach() / t[:, None], y).backward()
    right = z.detach().argmax(-1) == y
    assert bool((t.grad[right] >= 0).all()) and bool((t.grad[~right] <= 0).all())
    assert loss.item() > 0


# -- the calibrator ----------------------------------------------------------------------------------
def reference_features(z, views, k):
    n, v, c = views.shape
    rows = []
    for i in range(n):
        top = sorted(range(c), key=lambda j: -float(z[i, j]))[:k]
        row = []
        for view in range(v):
            p = torch.exp(views[i, view]) / torch.exp(views[i, view]).sum()
            row += [p[j] for j in top]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def overconfident(n=2000, c=5, views=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(u, -1), 1, generator=g).squeeze(1)
    noisy = 3 * (u.unsqueeze(1) + 0.5 * torch.randn(n, views, c, generator=g, dtype=torch.float64))
    return 3 * u, noisy, y


def test_forward_is_the_formula():
    z, views, _ = overconfident(n=12, c=6, views=2)
    cal = CorrectnessAwareCalibrator(num_views=2, top_k=3, hidden=4).double()
    with torch.no_grad():  # weights off the T = 1 start
        for p in cal.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=torch.float64))
    f = reference_features(z, views, 3)
    torch.testing.assert_close(cal.features(z, views), f, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # half the rows below the clamp
        cal.net[2].bias -= cal.net(f).median() - 0.1
    w1, b1, w2, b2 = (p.detach() for p in cal.net.parameters())
    t = (torch.relu(f @ w1.T + b1) @ w2.T + b2).squeeze(-1).clamp(0.1, 10.0)
    assert bool((t == 0.1).any()) and bool((t > 0.1).any())  # both sides of the clamp
    torch.testing.assert_close(cal.temperature(z, views), t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(cal(z, views), z / t[:, None], rtol=1e-12, atol=1e-15)


def test_starts_at_temperature_one():
    z, views, _ = overconfident(n=20)
    cal = CorrectnessAwareCalibrator(num_views=3).double()
    torch.testing.assert_close(cal(z, views), z)


@pytest.mark.parametrize("balanced", [True, False])
def test_fit_lowers_ece_on_overconfident_logits_and_keeps_predictions(balanced):
    z, views, y = overconfident()
    cal = CorrectnessAwareCalibrator(num_views=3).fit(z.float(), views.float(), y, balanced=balanced,
                                                      generator=torch.Generator().manual_seed(0))
    assert not cal.training
    with torch.no_grad():
        out = cal(z, views)
    assert torch.equal(out.argmax(-1), z.argmax(-1))
    before, after = metrics.ece(z, y, 15), metrics.ece(out.double(), y, 15)
    assert after < 0.6 * before, (before, after)
    if not balanced:  # the unweighted gap is a proper score of the top-label confidence
        assert after < 0.03


def test_fit_reduces_the_objective():
    z, views, y = overconfident(n=1000)
    cal = CorrectnessAwareCalibrator(num_views=3).double()
    before = correctness_aware_loss(cal(z, views), y).item()
    cal.fit(z, views, y, epochs=30, generator=torch.Generator().manual_seed(0))
    assert correctness_aware_loss(cal(z, views), y).item() < before


def test_state_dict_round_trip():
    z, views, y = overconfident(n=500)
    cal = CorrectnessAwareCalibrator(num_views=3).fit(z.float(), views.float(), y, epochs=5)
    state = cal.state_dict()
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    fresh = CorrectnessAwareCalibrator(num_views=3)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(z.float(), views.float()), cal(z.float(), views.float()), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_calling_the_calibrator_updates_nothing(mode):
    z, views, y = overconfident(n=200)
    cal = CorrectnessAwareCalibrator(num_views=3).fit(z.float(), views.float(), y, epochs=3)
    cal.train(mode == "train")
    before = {k: v.clone() for k, v in cal.state_dict().items()}
    first = cal(z.float(), views.float())
    first.sum().backward()  # a caller's backward fills .grad but changes no weight
    second = cal(z.float(), views.float())
    assert all(torch.equal(before[k], v) for k, v in cal.state_dict().items())
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_bad_input():
    z, views, y = overconfident(n=8, c=5)
    cal = CorrectnessAwareCalibrator(num_views=3)
    cases = [
        ((z[0], views), ValueError, r"logits must be \[N, C\]"),
        ((z, views[:, 0]), ValueError, r"views must be \[N, V, C\] = \[8, 3, 5\]"),
        ((z, views[:4]), ValueError, r"views must be \[N, V, C\]"),
        ((z, views[..., :4]), ValueError, r"views must be \[N, V, C\]"),
        ((z, views[:, :2]), ValueError, "holds 2 views per sample; this calibrator was built for num_views=3"),
        ((z[:, :3], views[..., :3]), ValueError, "top_k=4 needs at least 4 classes, got 3"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            cal(*args)
        with pytest.raises(error, match=message):
            cal.fit(*args, y)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[8\]"):
        cal.fit(z, views, y[:3])
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        cal.fit(z, views, y.double())
    bad = views.clone()
    bad[2, 1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"views must be finite to fit a calibrator; views\[2, 1, 4\] = nan"):
        cal.fit(z, bad, y)
    with pytest.raises(ValueError, match="at least one sample"):
        cal.fit(z[:0], views[:0], y[:0])
    for kwargs, message in [(dict(num_views=0), "num_views must be a positive integer"),
                            (dict(num_views=2, top_k=2.0), "top_k must be a positive integer"),
                            (dict(num_views=2, min_temperature=0.0), "0 < min_temperature < max_temperature"),
                            (dict(num_views=2, min_temperature=3.0, max_temperature=2.0), "min_temperature")]:
        with pytest.raises(ValueError, match=message):
            CorrectnessAwareCalibrator(**kwargs)


def test_loss_bad_input():
    z, y = batch(n=4)
    with pytest.raises(ValueError, match=r"expected logits \[N, C\] and target \[N\]"):
        correctness_aware_loss(z[0], y)
    with pytest.raises(ValueError, match=r"expected logits \[N, C\] and target \[N\]"):
        correctness_aware_loss(z, y[:2])
    with pytest.raises(TypeError, match="target must be integer class indices"):
        correctness_aware_loss(z, y.double())
    with pytest.raises(ValueError, match="at least one row"):
        correctness_aware_loss(z[:0], y[:0])
