r"""Scaling laws of cross-entropy: power-law fits, bootstrap intervals, compute-optimal allocation.

The cross-entropy of a model family falls as a power law in its size (parameters ``N``, training tokens
``D``, compute ``C``) towards a floor. Henighan et al. 2020 ("Scaling Laws for Autoregressive Generative
Modeling") read the floor ``L_inf`` as the entropy of the data (irreducible loss) and the rest as the
KL divergence from the data to the model (reducible loss); Kaplan et al. 2020 ("Scaling Laws for Neural
Language Models") fit the same forms. Two forms are fitted here:

* one variable (:func:`fit_power_law`), Henighan et al.'s eq. 1.1::

      L(x) = L_inf + (x0 / x) ** alpha

* two variables (:func:`fit_chinchilla`), Hoffmann et al. 2022 ("Training Compute-Optimal Large
  Language Models", eq. 2; the "Chinchilla" fit)::

      L(N, D) = E + A / N ** alpha + B / D ** beta

Both are fitted as Hoffmann et al. fit theirs (their Approach 3): the model's log-loss is written as a
log-sum-exp of its terms,

    log L_hat(N, D) = LSE(a - alpha log N, b - beta log D, e),    A = exp(a), B = exp(b), E = exp(e)

(the one-variable form drops the ``D`` term, with ``x0 = exp(a / alpha)``), and the Huber loss of the
residual ``log L_hat - log L`` with ``delta = 1e-3`` is minimised by L-BFGS from a grid of
initialisations, keeping the best fit. The Huber loss with so small a ``delta`` is nearly the absolute
error in log space: an outlying run moves the fit little. Intervals are percentile bootstrap intervals:
resample the points with replacement, refit, take the ``(1 - confidence) / 2`` quantiles of each
parameter (and of each prediction) over the refits.

From the two-variable fit, minimising ``L(N, D)`` under the FLOPs budget ``C = 6 N D`` gives
(Hoffmann et al., eq. 4 and Appendix D.2)::

    N_opt(C) = G (C / 6) ** a,    D_opt(C) = G ** -1 (C / 6) ** b,
    a = beta / (alpha + beta),    b = alpha / (alpha + beta),    G = (alpha A / (beta B)) ** (1 / (alpha + beta))

Example: points drawn from Hoffmann et al.'s published fit give it back.

>>> import torch
>>> from crossent.scaling import ChinchillaFit, fit_chinchilla
>>> true = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
>>> n, d = torch.meshgrid(torch.logspace(7, 10, 5, dtype=torch.float64),
...                       torch.logspace(9, 12, 5, dtype=torch.float64), indexing="ij")
>>> fit = fit_chinchilla(n.flatten(), d.flatten(), true.predict(n, d).flatten())
>>> round(fit.alpha, 3), round(fit.beta, 3), round(fit.E, 3)
(0.34, 0.28, 1.69)
>>> round(fit.params_exponent, 4), round(fit.tokens_exponent, 4)
(0.4516, 0.5484)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PowerLawFit",
    "ChinchillaFit",
    "ComputeOptimal",
    "fit_power_law",
    "fit_chinchilla",
    "HUBER_DELTA",
]

#: Hoffmann et al.'s Huber threshold on the residual of log-loss.
HUBER_DELTA = 1e-3

#: Hoffmann et al.'s grid of initialisations (Appendix D.2): exponents from 0 to 2 by 0.5, log-coefficients
#: from 0 to 25 by 5, log-floor from -1 to 1 by 0.5.
EXPONENT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
LOG_COEFFICIENT_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
LOG_FLOOR_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)

ArrayLike = Union[Tensor, Sequence[float]]

#: a percentile interval ``(low, high)`` per parameter name
Intervals = dict[str, tuple[float, float]]


# -- the model and its objective -----------------------------------------------------------------------
def _log_model(theta: Tensor, log_x: Tensor) -> Tensor:
    """``log L_hat = LSE(c_1 - k_1 log x_1, ..., c_K - k_K log x_K, e)`` for ``theta[..., :] = (c_1..c_K,
    k_1..k_K, e)`` and ``log_x`` of shape ``[P, K]``: ``(a, alpha, e)`` for the power law,
    ``(a, b, alpha, beta, e)`` for Chinchilla's form. Returns ``[..., P]``."""
    k = log_x.shape[-1]
    c, exponents, e = theta[..., None, :k], theta[..., None, k : 2 * k], theta[..., -1:, None]
    terms = c - exponents * log_x  # [..., P, K]
    return torch.logsumexp(torch.cat([terms, e.expand(*terms.shape[:-1], 1)], dim=-1), dim=-1)


def _objective(theta: Tensor, log_x: Tensor, log_y: Tensor, delta: float) -> Tensor:
    """``sum_i Huber_delta(log L_hat_i - log L_i)``, per row of ``theta`` when it is a batch."""
    pred = _log_model(theta, log_x)
    return F.huber_loss(pred, log_y.expand_as(pred), reduction="none", delta=delta).sum(-1)


def _objective_and_grad(theta: Tensor, log_x: Tensor, log_y: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """The objective divided by ``delta``, and its gradient in ``theta`` (``[2K + 1]``), by hand.

    With ``w`` the softmax of the terms, ``d log L_hat / d c_j = w_j``, ``d / d k_j = -w_j log x_j``,
    ``d / d e = w_e``, and ``Huber_delta'(r) = clamp(r, -delta, delta)``. Autograd would give the same,
    at several times the cost on these few numbers, and L-BFGS calls it hundreds of times per start.
    """
    k = log_x.shape[-1]
    terms = torch.cat([theta[:k] - theta[k : 2 * k] * log_x, theta[-1:].expand(len(log_x), 1)], dim=-1)
    pred = torch.logsumexp(terms, dim=-1)
    r = pred - log_y
    small = r.abs() <= delta
    # divided by delta: beyond delta each point's slope is then of size 1, so that L-BFGS's tolerances
    # mean the same for every delta (the minimiser is unchanged)
    value = torch.where(small, 0.5 * r * r / delta, r.abs() - 0.5 * delta).sum()
    slope = r.clamp(-delta, delta) / delta
    w = torch.softmax(terms, dim=-1) * slope[:, None]  # [P, K + 1]
    grad = torch.cat([w[:, :k].sum(0), -(w[:, :k] * log_x).sum(0), w[:, k:].sum(0)])
    return value, grad


# -- fitting -------------------------------------------------------------------------------------------
def _lbfgs(start: Tensor, log_x: Tensor, log_y: Tensor, delta: float, max_iter: int) -> tuple[Tensor, float]:
    """L-BFGS (strong Wolfe line search) from ``start``; returns the parameters and the objective."""
    theta = start.clone()
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        value, theta.grad = _objective_and_grad(theta, log_x, log_y, delta)
        return value

    with torch.no_grad():
        opt.step(closure)
        value = _objective(theta, log_x, log_y, delta).item()
    finite = math.isfinite(value) and bool(torch.isfinite(theta).all())
    return theta, value if finite else math.inf


def _best_fit(grid: Tensor, log_x: Tensor, log_y: Tensor, delta: float, starts: int | None,
              extra_starts: Sequence[Tensor] = (), max_iter: int = 500) -> tuple[Tensor, float]:
    """The best L-BFGS fit from the ``starts`` best points of ``grid`` (every point with ``None``) and
    ``extra_starts``. The whole grid is scored at once; L-BFGS runs from the best of it, since runs from
    nearby poor starts end in the same minima at many times the cost."""
    chosen: list[Tensor] = []
    if starts != 0:
        with torch.no_grad():
            scores = _objective(grid, log_x, log_y, delta)
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
        order = torch.argsort(scores, stable=True)
        chosen = [grid[i] for i in (order if starts is None else order[:starts])]
    best, best_value = None, math.inf
    for start in [*extra_starts, *chosen]:
        theta, value = _lbfgs(start, log_x, log_y, delta, max_iter)
        if value < best_value:
            best, best_value = theta, value
    if best is None:
        raise RuntimeError("no start of the fit reached a finite objective")
    return best, best_value


def _bootstrap(log_x: Tensor, log_y: Tensor, delta: float, theta: Tensor, resamples: int,
               generator: torch.Generator | None, distinct: int) -> Tensor:
    """Parameters ``[resamples, 2K + 1]`` refitted on points drawn with replacement, each refit by L-BFGS
    from the fit to all points (a resample's optimum lies near it). A resample with fewer than
    ``distinct`` distinct values of a size, on which the law is not determined, is drawn again."""
    n = len(log_y)
    out = []
    while len(out) < resamples:
        for _ in range(1000):
            idx = torch.randint(n, (n,), generator=generator)
            if all(len(torch.unique(column)) >= distinct for column in log_x[idx].T):
                break
        else:
            raise ValueError(f"resamples of these {n} points rarely hold {distinct} distinct sizes: fit more points")
        fitted, _ = _best_fit(torch.empty(0), log_x[idx], log_y[idx], delta, starts=0, extra_starts=(theta,))
        out.append(fitted)
    return torch.stack(out)


def _percentiles(samples: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    tail = (1 - confidence) / 2
    q = torch.tensor([tail, 1 - tail], dtype=samples.dtype)
    low, high = torch.quantile(samples, q, dim=0)
    return low, high


# -- input checks --------------------------------------------------------------------------------------
def _as_positive(name: str, values: ArrayLike, vector: bool = True) -> Tensor:
    """``values`` as a float64 CPU tensor; ValueError naming the first value that is not finite and > 0."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if vector and t.dim() != 1:
        raise ValueError(f"{name} must be one value per point (1-D), got shape {tuple(t.shape)}")
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        i = tuple(torch.nonzero(bad)[0].tolist())
        where = f"position {i[0]}" if len(i) == 1 else f"index {i}" if i else "the value"
        raise ValueError(f"{name} must be finite and > 0 (the fit is in log space), got {t[bad][0].item():g} "
                         f"at {where}")
    return t


def _check_points(columns: dict[str, ArrayLike], parameters: int) -> list[Tensor]:
    tensors = [_as_positive(name, values) for name, values in columns.items()]
    lengths = {name: len(t) for name, t in zip(columns, tensors)}
    if len(set(lengths.values())) > 1:
        raise ValueError("the point coordinates must have one length, got " + ", ".join(
            f"{name}: {n}" for name, n in lengths.items()))
    n = len(tensors[0])
    if n < parameters:
        raise ValueError(f"a fit of {parameters} parameters needs at least {parameters} points, got {n}")
    return tensors


def _check_options(delta: float, bootstrap: int, confidence: float) -> None:
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a finite number > 0, got {delta:g}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence:g}")


def _format_value(v: float) -> str:
    return f"{v:.4g}"


def _format_rows(rows: list[tuple[str, float]], intervals: Intervals | None, confidence: float | None) -> list[str]:
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, value in rows:
        line = f"  {name:<{width}}  {_format_value(value):>10}"
        if intervals and name in intervals:
            low, high = intervals[name]
            line += f"   [{_format_value(low)}, {_format_value(high)}]"
        lines.append(line)
    if intervals:
        lines.append(f"  ({confidence:.0%} percentile bootstrap intervals)")
    return lines


def _prediction_interval(predict: Callable, samples: Tensor, confidence: float, *x: Tensor) -> tuple[Tensor, Tensor]:
    preds = torch.stack([predict(s, *x) for s in samples])
    low, high = _percentiles(preds, confidence)
    return low, high


# -- one variable --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    r"""``L(x) = L_inf + (x0 / x) ** alpha`` (Henighan et al. 2020, eq. 1.1).

    ``loss_inf`` is the irreducible loss (the entropy of the data, for a cross-entropy in nats), and
    ``(x0 / x) ** alpha`` the reducible part. ``intervals`` maps ``"loss_inf"``, ``"x0"``, ``"alpha"`` to
    ``(low, high)`` percentile bootstrap intervals (``None`` without bootstrap); ``samples`` holds the
    bootstrap refits as rows ``(loss_inf, x0, alpha)``.

    >>> fit = PowerLawFit(loss_inf=0.5, x0=1e3, alpha=0.5)
    >>> float(fit.predict(1e5))
    0.6
    >>> fit
    PowerLawFit(loss_inf=0.5, x0=1000, alpha=0.5)
    """

    loss_inf: float
    x0: float
    alpha: float
    points: int = 0
    objective: float = math.nan
    confidence: float | None = None
    intervals: Intervals | None = None
    samples: Tensor | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def _predict(params: Tensor, x: Tensor) -> Tensor:
        loss_inf, x0, alpha = params.unbind(-1)
        return loss_inf + (x0 / x) ** alpha

    def _params(self) -> Tensor:
        return torch.tensor([self.loss_inf, self.x0, self.alpha], dtype=torch.float64)

    def predict(self, x: ArrayLike | float) -> Tensor:
        """``L(x)``, a float64 tensor of the shape of ``x``."""
        return self._predict(self._params(), torch.as_tensor(x, dtype=torch.float64))

    def reducible(self, x: ArrayLike | float) -> Tensor:
        """``L(x) - L_inf = (x0 / x) ** alpha``: the reducible loss (a KL divergence for cross-entropy)."""
        return self.predict(x) - self.loss_inf

    def predict_interval(self, x: ArrayLike | float) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval ``(low, high)`` of ``L(x)``; needs a fit with ``bootstrap > 0``."""
        if self.samples is None:
            raise ValueError("this fit has no bootstrap refits: fit with bootstrap > 0")
        x = torch.as_tensor(x, dtype=torch.float64)
        return _prediction_interval(self._predict, self.samples, self.confidence, x)

    def format(self) -> str:
        """The fit as a few lines of text: the formula, each parameter and its interval."""
        head = "L(x) = L_inf + (x0 / x)^alpha"
        if self.points:
            head += f"   ({self.points} points, Huber loss of log L: {self.objective:.3g})"
        rows = [("loss_inf", self.loss_inf), ("x0", self.x0), ("alpha", self.alpha)]
        return "\n".join([head, *_format_rows(rows, self.intervals, self.confidence)])

    def __repr__(self) -> str:
        text = (f"PowerLawFit(loss_inf={_format_value(self.loss_inf)}, x0={_format_value(self.x0)}, "
                f"alpha={_format_value(self.alpha)}")
        return text + (f", points={self.points})" if self.points else ")")


def _power_law_grid() -> Tensor:
    # theta = (a, alpha, e)
    return torch.tensor(list(itertools.product(LOG_COEFFICIENT_GRID, EXPONENT_GRID, LOG_FLOOR_GRID)),
                        dtype=torch.float64)


def _power_law_params(theta: Tensor) -> Tensor:
    """``(a, alpha, e)`` -> ``(L_inf, x0, alpha)``; ``x0 = exp(a / alpha)``."""
    a, alpha, e = theta.unbind(-1)
    return torch.stack([e.exp(), (a / alpha).exp(), alpha], dim=-1)


def fit_power_law(
    x: ArrayLike,
    loss: ArrayLike,
    *,
    delta: float = HUBER_DELTA,
    starts: int | None = 8,
    bootstrap: int = 0,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> PowerLawFit:
    r"""Fit ``L(x) = L_inf + (x0 / x) ** alpha`` to points ``(x_i, L_i)``.

    Minimises ``sum_i Huber_delta(LSE(a - alpha log x_i, e) - log L_i)`` with ``x0 = exp(a / alpha)``,
    ``L_inf = exp(e)``, by L-BFGS from the ``starts`` best points of Hoffmann et al.'s grid of
    initialisations (all of them with ``starts=None``), keeping the best. With ``bootstrap = B > 0`` the
    points are resampled with replacement ``B`` times (drawn from ``generator``: pass a seeded
    ``torch.Generator`` for repeatable intervals; a resample with fewer than 3 distinct ``x`` is drawn
    again), refitted, and each parameter gets its percentile interval at ``confidence``. Points may
    repeat a size: several seeds of one model are best given as one point each, so that the bootstrap
    resamples runs and their spread enters the intervals.

    Args:
        x: sizes (parameters, tokens, compute...), ``[P]``, all > 0.
        loss: the measured losses, ``[P]``, all > 0; at least 3 points at 3 distinct sizes.

    >>> import torch
    >>> x = torch.logspace(3, 6, 7, dtype=torch.float64)
    >>> fit = fit_power_law(x, 0.4 + (2e2 / x) ** 0.3)
    >>> round(fit.loss_inf, 4), round(fit.x0, 1), round(fit.alpha, 4)
    (0.4, 200.0, 0.3)
    """
    _check_options(delta, bootstrap, confidence)
    x, loss = _check_points({"x": x, "loss": loss}, parameters=3)
    if len(torch.unique(x)) < 3:
        raise ValueError(f"a power law with a floor needs at least 3 distinct x, got {torch.unique(x).tolist()}")
    log_x, log_y = x.log()[:, None], loss.log()
    grid = _power_law_grid()
    theta, value = _best_fit(grid, log_x, log_y, delta, starts)
    loss_inf, x0, alpha = _power_law_params(theta).tolist()
    fit = PowerLawFit(loss_inf, x0, alpha, points=len(x), objective=value)
    if not bootstrap:
        return fit
    samples = _power_law_params(_bootstrap(log_x, log_y, delta, theta, bootstrap, generator, distinct=3))
    low, high = _percentiles(samples, confidence)
    names = ("loss_inf", "x0", "alpha")
    intervals = {name: (lo, hi) for name, lo, hi in zip(names, low.tolist(), high.tolist())}
    return replace(fit, confidence=confidence, intervals=intervals, samples=samples)


# -- two variables -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComputeOptimal:
    """The compute-optimal model for FLOPs ``compute = 6 params tokens`` and its predicted ``loss``
    (float64 tensors of the shape of ``compute``)."""

    compute: Tensor
    params: Tensor
    tokens: Tensor
    loss: Tensor

    def __repr__(self) -> str:
        def show(t: Tensor) -> str:
            return _format_value(t.item()) if t.numel() == 1 else "[" + ", ".join(map(_format_value, t.tolist())) + "]"

        return (f"ComputeOptimal(compute={show(self.compute)}, params={show(self.params)}, "
                f"tokens={show(self.tokens)}, loss={show(self.loss)})")


@dataclass(frozen=True)
class ChinchillaFit:
    r"""``L(N, D) = E + A / N ** alpha + B / D ** beta`` (Hoffmann et al. 2022, eq. 2).

    ``E`` is the irreducible loss; ``A / N ** alpha`` and ``B / D ** beta`` what a finite model and finite
    data add. Hoffmann et al.'s published fit is ``E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28``.
    ``intervals`` maps each parameter (and the derived ``params_exponent``, ``tokens_exponent``) to its
    percentile bootstrap interval; ``samples`` holds the refits as rows ``(E, A, B, alpha, beta)``.

    >>> fit = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    >>> round(float(fit.predict(70e9, 1.4e12)), 3)  # Chinchilla itself: 70B parameters, 1.4T tokens
    1.937
    >>> opt = fit.compute_optimal(5.76e23)  # Gopher's budget
    >>> round(float(opt.params) / 1e9, 1), round(float(opt.tokens) / 1e12, 2)
    (32.2, 2.98)
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    points: int = 0
    objective: float = math.nan
    confidence: float | None = None
    intervals: Intervals | None = None
    samples: Tensor | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def _predict(params: Tensor, n: Tensor, d: Tensor) -> Tensor:
        E, A, B, alpha, beta = params.unbind(-1)
        return E + A / n**alpha + B / d**beta

    def _params(self) -> Tensor:
        return torch.tensor([self.E, self.A, self.B, self.alpha, self.beta], dtype=torch.float64)

    def predict(self, params: ArrayLike | float, tokens: ArrayLike | float) -> Tensor:
        """``L(N, D)``, a float64 tensor of the broadcast shape of ``params`` (N) and ``tokens`` (D)."""
        n, d = (torch.as_tensor(v, dtype=torch.float64) for v in (params, tokens))
        return self._predict(self._params(), n, d)

    def predict_interval(self, params: ArrayLike | float, tokens: ArrayLike | float) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval ``(low, high)`` of ``L(N, D)``; needs a fit with ``bootstrap > 0``."""
        if self.samples is None:
            raise ValueError("this fit has no bootstrap refits: fit with bootstrap > 0")
        n, d = (torch.as_tensor(v, dtype=torch.float64) for v in (params, tokens))
        return _prediction_interval(self._predict, self.samples, self.confidence, n, d)

    @property
    def params_exponent(self) -> float:
        """``a = beta / (alpha + beta)``: ``N_opt`` grows as ``C ** a``."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """``b = alpha / (alpha + beta)``: ``D_opt`` grows as ``C ** b``."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """``G = (alpha A / (beta B)) ** (1 / (alpha + beta))``."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def compute_optimal(self, compute: ArrayLike | float) -> ComputeOptimal:
        """The ``N, D`` minimising ``L(N, D)`` subject to ``6 N D = compute`` (Hoffmann et al., eq. 4):
        ``N_opt = G (C / 6) ** a``, ``D_opt = (C / 6) ** b / G``."""
        c = _as_positive("compute", compute, vector=False)
        n = self.G * (c / 6) ** self.params_exponent
        d = (c / 6) ** self.tokens_exponent / self.G
        return ComputeOptimal(c, n, d, self.predict(n, d))

    def format(self) -> str:
        """The fit as a few lines of text: the formula, each parameter and its interval, the exponents of
        the compute-optimal allocation."""
        head = "L(N, D) = E + A / N^alpha + B / D^beta"
        if self.points:
            head += f"   ({self.points} points, Huber loss of log L: {self.objective:.3g})"
        rows = [("E", self.E), ("A", self.A), ("B", self.B), ("alpha", self.alpha), ("beta", self.beta),
                ("params_exponent", self.params_exponent), ("tokens_exponent", self.tokens_exponent)]
        lines = _format_rows(rows, self.intervals, self.confidence)
        lines.insert(5, "  compute-optimal: N_opt ~ C^params_exponent, D_opt ~ C^tokens_exponent (C = 6 N D)")
        return "\n".join([head, *lines])

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={_format_value(getattr(self, k))}" for k in ("E", "A", "B", "alpha", "beta"))
        return f"ChinchillaFit({values}" + (f", points={self.points})" if self.points else ")")


def _chinchilla_grid() -> Tensor:
    # theta = (a, b, alpha, beta, e)
    return torch.tensor(list(itertools.product(LOG_COEFFICIENT_GRID, LOG_COEFFICIENT_GRID, EXPONENT_GRID,
                                               EXPONENT_GRID, LOG_FLOOR_GRID)), dtype=torch.float64)


def _chinchilla_params(theta: Tensor) -> Tensor:
    """``(a, b, alpha, beta, e)`` -> ``(E, A, B, alpha, beta)``."""
    a, b, alpha, beta, e = theta.unbind(-1)
    return torch.stack([e.exp(), a.exp(), b.exp(), alpha, beta], dim=-1)


def fit_chinchilla(
    params: ArrayLike,
    tokens: ArrayLike,
    loss: ArrayLike,
    *,
    delta: float = HUBER_DELTA,
    starts: int | None = 8,
    bootstrap: int = 0,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> ChinchillaFit:
    r"""Fit ``L(N, D) = E + A / N ** alpha + B / D ** beta`` to runs ``(N_i, D_i, L_i)`` as Hoffmann et al.

    Minimises ``sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)`` (``A = exp(a)``,
    ``B = exp(b)``, ``E = exp(e)``, ``delta = 1e-3``) by L-BFGS from the ``starts`` best points of their
    grid of initialisations (all 4500 with ``starts=None``), keeping the best. ``bootstrap``,
    ``confidence`` and ``generator`` as in :func:`fit_power_law` (a resample needs 2 distinct ``N`` and 2
    distinct ``D``); the intervals also cover the
    compute-optimal exponents ``params_exponent`` and ``tokens_exponent``.

    Args:
        params: model sizes ``N``, ``[P]``, all > 0.
        tokens: training tokens ``D``, ``[P]``, all > 0.
        loss: the measured losses, ``[P]``, all > 0; at least 5 points, with 2 distinct ``N`` and 2 distinct ``D``.
    """
    _check_options(delta, bootstrap, confidence)
    n, d, loss = _check_points({"params": params, "tokens": tokens, "loss": loss}, parameters=5)
    for name, v in (("params", n), ("tokens", d)):
        if len(torch.unique(v)) < 2:
            raise ValueError(f"a two-variable fit needs at least 2 distinct {name}, got {torch.unique(v).tolist()}")
    log_x, log_y = torch.stack([n.log(), d.log()], dim=-1), loss.log()
    grid = _chinchilla_grid()
    theta, value = _best_fit(grid, log_x, log_y, delta, starts)
    E, A, B, alpha, beta = _chinchilla_params(theta).tolist()
    fit = ChinchillaFit(E, A, B, alpha, beta, points=len(loss), objective=value)
    if not bootstrap:
        return fit
    samples = _chinchilla_params(_bootstrap(log_x, log_y, delta, theta, bootstrap, generator, distinct=2))
    alphas, betas = samples[:, 3], samples[:, 4]
    derived = torch.cat([samples, torch.stack([betas / (alphas + betas), alphas / (alphas + betas)], -1)], -1)
    low, high = _percentiles(derived, confidence)
    names = ("E", "A", "B", "alpha", "beta", "params_exponent", "tokens_exponent")
    intervals = {name: (lo, hi) for name, lo, hi in zip(names, low.tolist(), high.tolist())}
    return replace(fit, confidence=confidence, intervals=intervals, samples=samples)
