"""crossent.scaling: the fits give back the laws that drew their points, from the formulas.

* ``L(x) = L_inf + (x0 / x) ** alpha`` and ``L(N, D) = E + A / N ** alpha + B / D ** beta`` are
  recovered from points drawn from them, exactly without noise and within the noise with it;
  Hoffmann et al.'s published fit (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28) is the fixture.
* The compute-optimal allocation is the minimum of ``L`` on the line ``6 N D = C``, found here by a
  search along it, and grows as ``C ** 0.4516`` (parameters) and ``C ** 0.5484`` (tokens).
* Bootstrap intervals cover the truth, and repeat exactly for one seed.
* The fit minimises the documented objective, the Huber loss of the log-loss residuals, and an outlier
  moves it little (that loss is nearly the absolute error).
* Bad input raises a ValueError naming the value.
"""

from __future__ import annotations

import math

import pytest
import torch

from crossent.scaling import ChinchillaFit, PowerLawFit, fit_chinchilla, fit_power_law

CHINCHILLA = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
NOISE = 0.005  # multiplicative noise of the synthetic losses: log L_i + N(0, 0.005^2)


def noisy(loss: torch.Tensor, seed: int, scale: float = NOISE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return loss * torch.exp(scale * torch.randn(loss.shape, generator=g, dtype=torch.float64))


def chinchilla_points():
    """A 5 x 5 grid of model sizes 1e7..1e10 and token counts 1e9..1e12 (Hoffmann et al.'s range)."""
    n, d = torch.meshgrid(torch.logspace(7, 10, 5, dtype=torch.float64), torch.logspace(9, 12, 5, dtype=torch.float64),
                          indexing="ij")
    return n.flatten(), d.flatten()


def huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))


@pytest.fixture(scope="module")
def noisy_chinchilla():
    n, d = chinchilla_points()
    loss = noisy(CHINCHILLA.predict(n, d), seed=1)
    return n, d, loss, fit_chinchilla(n, d, loss, bootstrap=40, generator=torch.Generator().manual_seed(0))


# -- one variable ----------------------------------------------------------------------------------------
def test_power_law_recovered_exactly_without_noise():
    x = torch.logspace(2, 6, 8, dtype=torch.float64)
    fit = fit_power_law(x, 1.3 + (5e3 / x) ** 0.45)
    assert fit.loss_inf == pytest.approx(1.3, rel=1e-5)
    assert fit.x0 == pytest.approx(5e3, rel=1e-4)
    assert fit.alpha == pytest.approx(0.45, rel=1e-5)
    assert fit.points == 8 and fit.objective < 1e-10


def test_power_law_recovered_from_noisy_points_and_intervals_cover_it():
    x = torch.logspace(3, 7, 10, dtype=torch.float64)
    true = PowerLawFit(loss_inf=0.8, x0=2e4, alpha=0.3)
    fit = fit_power_law(x, noisy(true.predict(x), seed=3), bootstrap=60, generator=torch.Generator().manual_seed(0))
    assert fit.loss_inf == pytest.approx(0.8, abs=0.05)
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    assert math.log(fit.x0) == pytest.approx(math.log(2e4), abs=0.5)
    for name in ("loss_inf", "x0", "alpha"):
        low, high = fit.intervals[name]
        assert low <= getattr(true, name) <= high, (name, fit.intervals[name])
    # the forecast a decade beyond the points, and its interval
    low, high = fit.predict_interval(1e8)
    assert float(low) <= float(true.predict(1e8)) <= float(high)
    assert float(fit.reducible(1e8)) == pytest.approx(float(fit.predict(1e8)) - fit.loss_inf)


def test_fit_minimises_the_huber_loss_of_log_residuals():
    # the documented objective written here from the formula: sum_i Huber_1e-3(log L_hat(x_i) - log L_i)
    x = torch.logspace(3, 7, 9, dtype=torch.float64)
    loss = noisy(0.8 + (2e4 / x) ** 0.3, seed=5, scale=0.02)
    fit = fit_power_law(x, loss)

    def objective(loss_inf, x0, alpha):
        return float(huber((loss_inf + (x0 / x) ** alpha).log() - loss.log(), 1e-3).sum())

    best = objective(fit.loss_inf, fit.x0, fit.alpha)
    assert best == pytest.approx(fit.objective, rel=1e-9)
    for i in range(3):
        for step in (1e-3, -1e-3):
            moved = [fit.loss_inf, fit.x0, fit.alpha]
            moved[i] *= 1 + step
            assert objective(*moved) > best


def test_an_outlier_moves_the_fit_little():
    x = torch.logspace(3, 7, 9, dtype=torch.float64)
    loss = 0.8 + (2e4 / x) ** 0.3
    spoiled = loss.clone()
    spoiled[4] *= 1.5  # one run gone wrong
    fit = fit_power_law(x, spoiled)
    assert fit.alpha == pytest.approx(0.3, abs=0.01) and fit.loss_inf == pytest.approx(0.8, abs=0.01)


# -- two variables: Hoffmann et al.'s fit ----------------------------------------------------------------
def test_chinchilla_fit_recovered_exactly_without_noise():
    n, d = chinchilla_points()
    fit = fit_chinchilla(n, d, CHINCHILLA.predict(n, d))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name


def test_chinchilla_fit_recovered_from_noisy_points(noisy_chinchilla):
    _, _, _, fit = noisy_chinchilla
    assert fit.E == pytest.approx(1.69, abs=0.1)
    assert fit.alpha == pytest.approx(0.34, abs=0.04)
    assert fit.beta == pytest.approx(0.28, abs=0.04)
    assert fit.params_exponent == pytest.approx(0.45, abs=0.04)
    assert fit.tokens_exponent == pytest.approx(0.55, abs=0.04)


def test_chinchilla_bootstrap_intervals_cover_the_truth(noisy_chinchilla):
    _, _, _, fit = noisy_chinchilla
    truth = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "params_exponent": 0.28 / 0.62,
             "tokens_exponent": 0.34 / 0.62}
    for name, value in truth.items():
        low, high = fit.intervals[name]
        assert low <= value <= high, (name, fit.intervals[name])
        assert high - low < 10 * max(value, 1)  # an interval, not everything
    low, high = fit.predict_interval(1e11, 1e13)
    assert float(low) <= float(CHINCHILLA.predict(1e11, 1e13)) <= float(high)
    assert fit.samples.shape == (40, 5)


def test_compute_optimal_exponents_of_the_published_fit():
    assert CHINCHILLA.params_exponent == pytest.approx(0.28 / 0.62) and round(CHINCHILLA.params_exponent, 4) == 0.4516
    assert CHINCHILLA.tokens_exponent == pytest.approx(0.34 / 0.62) and round(CHINCHILLA.tokens_exponent, 2) == 0.55
    compute = torch.tensor([1e20, 1e22, 1e24], dtype=torch.float64)
    opt = CHINCHILLA.compute_optimal(compute)
    torch.testing.assert_close(6 * opt.params * opt.tokens, compute)
    # N_opt ~ C^a and D_opt ~ C^b: the slopes in log-log
    slope_n = (opt.params[2] / opt.params[0]).log() / (compute[2] / compute[0]).log()
    slope_d = (opt.tokens[2] / opt.tokens[0]).log() / (compute[2] / compute[0]).log()
    assert float(slope_n) == pytest.approx(0.4516, abs=1e-4) and float(slope_d) == pytest.approx(0.5484, abs=1e-4)
    torch.testing.assert_close(opt.loss, CHINCHILLA.predict(opt.params, opt.tokens))


@pytest.mark.parametrize("compute", [1e18, 5.76e23])
def test_compute_optimal_is_the_minimum_on_the_iso_flop_line(compute):
    # searched here along 6 N D = C, with no use of the closed form
    n = torch.logspace(math.log10(compute) / 2 - 4, math.log10(compute) / 2 + 4, 200_001, dtype=torch.float64)
    loss = CHINCHILLA.E + CHINCHILLA.A / n**CHINCHILLA.alpha + CHINCHILLA.B / (compute / (6 * n)) ** CHINCHILLA.beta
    best = n[loss.argmin()]
    opt = CHINCHILLA.compute_optimal(compute)
    assert float(opt.params) == pytest.approx(float(best), rel=1e-3)
    assert float(opt.loss) == pytest.approx(float(loss.min()), rel=1e-9)


def test_refitted_points_give_the_published_allocation(noisy_chinchilla):
    _, _, _, fit = noisy_chinchilla
    opt, true = fit.compute_optimal(1e22), CHINCHILLA.compute_optimal(1e22)
    # within the range the points span, the allocation is near the published one
    assert float(opt.params) == pytest.approx(float(true.params), rel=0.5)
    assert float(opt.loss) == pytest.approx(float(true.loss), rel=0.01)


# -- seeds, text, bad input -----------------------------------------------------------------------------
def test_fit_is_deterministic_given_a_seed():
    x = torch.logspace(3, 7, 8, dtype=torch.float64)
    loss = noisy(0.8 + (2e4 / x) ** 0.3, seed=7, scale=0.02)

    def fit(seed):
        return fit_power_law(x, loss, bootstrap=15, generator=torch.Generator().manual_seed(seed))

    a, b, c = fit(0), fit(0), fit(1)
    assert a == b and torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)
    assert (a.loss_inf, a.x0, a.alpha) == (c.loss_inf, c.x0, c.alpha)  # only the resamples differ


def test_repr_and_format():
    x = torch.logspace(3, 7, 8, dtype=torch.float64)
    fit = fit_power_law(x, 0.8 + (2e4 / x) ** 0.3, bootstrap=5, generator=torch.Generator().manual_seed(0))
    assert repr(fit) == "PowerLawFit(loss_inf=0.8, x0=2e+04, alpha=0.3, points=8)"
    text = fit.format()
    assert text.startswith("L(x) = L_inf + (x0 / x)^alpha") and "95% percentile bootstrap intervals" in text
    assert "alpha" in text and "[" in text
    assert repr(CHINCHILLA) == "ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)"
    assert "params_exponent      0.4516" in CHINCHILLA.format()
    assert "params=" in repr(CHINCHILLA.compute_optimal(1e21))


@pytest.mark.parametrize(
    "x, loss, message",
    [
        ([1.0, 10.0, 0.0, 1e3], [1.0, 0.9, 0.8, 0.7], r"x must be finite and > 0 .* got 0 at position 2"),
        ([1.0, 10.0, 100.0, 1e3], [1.0, -0.9, 0.8, 0.7], r"loss must be finite and > 0 .* got -0.9 at position 1"),
        ([1.0, 10.0, 100.0, 1e3], [1.0, 0.9, float("nan"), 0.7], r"loss must be finite and > 0 .* at position 2"),
        ([1.0, 10.0, float("inf")], [1.0, 0.9, 0.8], r"x must be finite and > 0 .* got inf at position 2"),
        ([1.0, 10.0, 100.0], [1.0, 0.9], r"one length, got x: 3, loss: 2"),
        ([1.0, 10.0], [1.0, 0.9], r"3 parameters needs at least 3 points, got 2"),
        ([1.0, 10.0, 10.0, 1.0], [1.0, 0.9, 0.9, 1.0], r"at least 3 distinct x"),
        ([[1.0, 10.0, 100.0]], [1.0, 0.9, 0.8], r"x must be one value per point \(1-D\), got shape \(1, 3\)"),
    ],
)
def test_power_law_bad_points(x, loss, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, loss)


def test_chinchilla_bad_points():
    n, d = chinchilla_points()
    loss = CHINCHILLA.predict(n, d)
    with pytest.raises(ValueError, match=r"tokens must be finite and > 0 .* got -1 at position 3"):
        fit_chinchilla(n, torch.cat([d[:3], torch.tensor([-1.0], dtype=torch.float64), d[4:]]), loss)
    with pytest.raises(ValueError, match=r"one length, got params: 25, tokens: 24, loss: 25"):
        fit_chinchilla(n, d[:-1], loss)
    with pytest.raises(ValueError, match=r"5 parameters needs at least 5 points, got 4"):
        fit_chinchilla(n[:4], d[:4], loss[:4])
    with pytest.raises(ValueError, match=r"at least 2 distinct params"):
        fit_chinchilla(n[:5], d[:5], loss[:5])  # one model size, five token counts
    with pytest.raises(ValueError, match=r"compute must be finite and > 0 .* got 0"):
        CHINCHILLA.compute_optimal(torch.tensor([1e20, 0.0]))


@pytest.mark.parametrize("options, message", [
    ({"delta": 0.0}, "delta must be a finite number > 0"),
    ({"bootstrap": -1}, "bootstrap must be >= 0"),
    ({"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
])
def test_bad_options(options, message):
    x = [1.0, 10.0, 100.0, 1e3]
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, [1.0, 0.9, 0.8, 0.75], **options)


def test_interval_needs_bootstrap():
    with pytest.raises(ValueError, match="no bootstrap refits: fit with bootstrap > 0"):
        CHINCHILLA.predict_interval(1e9, 1e10)


def test_resamples_that_leave_the_law_undetermined_are_drawn_again():
    # three sizes: most resamples of three points repeat one, and two sizes cannot fix a floor and a slope
    x = torch.tensor([1e3, 1e4, 1e5], dtype=torch.float64)
    fit = fit_power_law(x, 0.8 + (2e3 / x) ** 0.5, bootstrap=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fit.samples, torch.tensor([[0.8, 2e3, 0.5]] * 8, dtype=torch.float64), rtol=1e-4,
                               atol=0)
