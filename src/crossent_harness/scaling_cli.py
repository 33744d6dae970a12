"""``crossent scaling fit``: a scaling law fitted to the runs of a CSV file, with intervals and forecasts.

One column of sizes (``--x``, e.g. parameters) and one of losses (``--y``) fit
``L(x) = L_inf + (x0 / x) ** alpha`` (:func:`crossent.scaling.fit_power_law`); a second column of sizes
(``--x2``, e.g. training tokens) fits ``L(N, D) = E + A / N ** alpha + B / D ** beta``
(:func:`crossent.scaling.fit_chinchilla`) and with ``--compute`` prints the compute-optimal allocation.
Both fits minimise the Huber loss of log-loss residuals as Hoffmann et al. 2022; intervals are percentile
bootstrap intervals (``--bootstrap`` resamples, ``--seed``). ``--forecast`` predicts the loss at sizes
beyond the points (``N:D`` pairs for two columns); ``--plot`` draws the fit (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from .argtypes import finite_float, positive_int


class ScalingInputError(ValueError):
    """A CSV file or an option that cannot be fitted; the message names the file, row or option."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scaling_command", metavar="fit", required=True, parser_class=type(parser))
    p = sub.add_parser("fit", help="fit a scaling law to the runs of a CSV file",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("csv", type=Path, help="a CSV file with a header row, one run a row")
    p.add_argument("--x", required=True, help="the column of sizes (e.g. params)")
    p.add_argument("--y", required=True, help="the column of losses (e.g. loss); every value > 0")
    p.add_argument("--x2", default=None,
                   help="a second column of sizes (e.g. tokens): fits E + A / x^alpha + B / x2^beta (default: none)")
    p.add_argument("--forecast", default=None,
                   help="sizes to predict the loss at, comma-separated: 1e9,1e10; with --x2, pairs x:x2 such as "
                   "1e9:2e10 (default: none)")
    p.add_argument("--compute", default=None,
                   help="with --x2: FLOP budgets C = 6 x x2, comma-separated, for the compute-optimal x and x2 "
                   "(default: none)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples for the intervals; 0: none (default: 200)")
    p.add_argument("--confidence", type=finite_float, default=0.95, help="interval coverage (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    p.add_argument("--starts", type=positive_int, default=None,
                   help="L-BFGS starts from the best points of the initialisation grid (default: the library's)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the fit here (default: none)")
    p.add_argument("--dry-run", action="store_true", help="check the options, say what would be fitted, read nothing")


def _numbers(text: str | None, option: str, pairs: bool) -> list:
    if text is None:
        return []
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != (2 if pairs else 1):
            shape = "x:x2 pairs such as 1e9:2e10" if pairs else "numbers such as 1e9 (x:x2 pairs need --x2)"
            raise ScalingInputError(f"{option}: expected {shape}, got {item!r}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ScalingInputError(f"{option}: expected numbers, got {item!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ScalingInputError(f"{option}: sizes must be finite and > 0, got {item!r}")
        out.append(tuple(values) if pairs else values[0])
    return out


def read_columns(path: Path, names: list[str]) -> list[list[float]]:
    """The columns ``names`` of the CSV file ``path`` as numbers, every one finite and > 0."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [n for n in names if n not in header]
            if missing:
                columns = ", ".join(header) or "none"
                raise ScalingInputError(f"{path}: no column {missing[0]!r}; the columns are {columns}")
            columns: list[list[float]] = [[] for _ in names]
            for line, row in enumerate(reader, start=2):
                for name, column in zip(names, columns):
                    text = row[name]
                    try:
                        value = float(text)
                    except (TypeError, ValueError):
                        raise ScalingInputError(f"{path}, line {line}: {name} is not a number: {text!r}") from None
                    if not (math.isfinite(value) and value > 0):
                        raise ScalingInputError(
                            f"{path}, line {line}: {name} must be finite and > 0 (the fit is in log space), got {text}")
                    column.append(value)
    except OSError as e:
        raise ScalingInputError(f"cannot read {path}: {e.strerror or e}") from None
    return columns


def check_args(args) -> None:
    if args.bootstrap < 0:
        raise ScalingInputError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        raise ScalingInputError(f"--confidence: must be in (0, 1), got {args.confidence:g}")
    if args.compute is not None and args.x2 is None:
        raise ScalingInputError("--compute: the compute-optimal allocation needs two sizes (--x2)")
    args.forecast_points = _numbers(args.forecast, "--forecast", pairs=args.x2 is not None)
    args.compute_budgets = _numbers(args.compute, "--compute", pairs=False)


def plan(args) -> str:
    """What ``run`` would do, in words (``--dry-run``)."""
    law = "L_inf + (x0 / x)^alpha" if args.x2 is None else "E + A / N^alpha + B / D^beta"
    sizes = args.x if args.x2 is None else f"N = {args.x}, D = {args.x2}"
    lines = [f"fit {args.y} = {law} against {sizes} from {args.csv}",
             f"intervals: {args.bootstrap} bootstrap resamples, seed {args.seed}, {args.confidence:.0%}"
             if args.bootstrap else "intervals: none (--bootstrap 0)"]
    if args.forecast_points:
        lines.append(f"forecast at {args.forecast}")
    if args.compute_budgets:
        lines.append(f"compute-optimal {args.x} and {args.x2} at C = {args.compute}")
    if args.plot is not None:
        lines.append(f"plot to {args.plot}")
    return "\n".join(lines)


def run(args) -> int:
    check_args(args)
    if args.dry_run:
        print(plan(args))
        return 0
    import torch

    from crossent.scaling import fit_chinchilla, fit_power_law

    names = [args.x] + ([args.x2] if args.x2 else []) + [args.y]
    *sizes, loss = read_columns(args.csv, names)
    options = {"bootstrap": args.bootstrap, "confidence": args.confidence,
               "generator": torch.Generator().manual_seed(args.seed)}
    if args.starts is not None:
        options["starts"] = args.starts
    try:
        fit = (fit_power_law if len(sizes) == 1 else fit_chinchilla)(*sizes, loss, **options)
    except ValueError as e:
        raise ScalingInputError(f"{args.csv}: {e}") from None
    against = args.x if args.x2 is None else f"{args.x} and {args.x2}"
    print(f"{args.y} against {against}: {len(loss)} rows of {args.csv}")
    print(fit.format())
    if args.forecast_points:
        print("\n" + forecast_table(fit, args, args.forecast_points))
    if args.compute_budgets:
        print("\n" + compute_table(fit, args, args.compute_budgets))
    if args.plot is not None:
        plot(fit, args, sizes, loss)
        print(f"\nwrote {args.plot}")
    return 0


def _interval(fit, *point) -> str:
    if fit.samples is None:
        return ""
    low, high = fit.predict_interval(*point)
    return f"[{float(low):.4g}, {float(high):.4g}]"


def forecast_table(fit, args, points) -> str:
    two = args.x2 is not None
    head = [args.x, *([args.x2] if two else []), f"{args.y} forecast"]
    if fit.samples is not None:
        head.append(f"{fit.confidence:.0%} interval")
    rows = []
    for point in points:
        point = point if two else (point,)
        rows.append([f"{v:.6g}" for v in point] + [f"{float(fit.predict(*point)):.4g}"]
                    + ([_interval(fit, *point)] if fit.samples is not None else []))
    return _table(head, rows)


def compute_table(fit, args, budgets) -> str:
    import torch

    head = [f"compute (6 {args.x} {args.x2})", f"{args.x} opt", f"{args.x2} opt", f"{args.y} at the optimum"]
    opt = fit.compute_optimal(torch.tensor(budgets, dtype=torch.float64))
    rows = [[f"{c:.4g}", f"{n:.4g}", f"{d:.4g}", f"{l:.4g}"]
            for c, n, d, l in zip(budgets, opt.params.tolist(), opt.tokens.tolist(), opt.loss.tolist())]
    return _table(head, rows)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ScalingInputError("--plot needs matplotlib: pip install 'crossent[bench]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot(fit, args, sizes, loss) -> None:
    """The points, the fitted law with its bootstrap band, and the forecasts with their intervals (one
    variable); the fitted against the measured loss (two variables)."""
    import torch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if len(sizes) == 1:
        xs = sizes[0] + list(args.forecast_points)
        grid = torch.logspace(math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1, 200, dtype=torch.float64)
        ax.plot(grid.tolist(), fit.predict(grid).tolist(), color="C0", label=f"fit: {fit!r}".replace("PowerLawFit", ""))
        if fit.samples is not None:
            low, high = fit.predict_interval(grid)
            ax.fill_between(grid.tolist(), low.tolist(), high.tolist(), color="C0", alpha=0.2,
                            label=f"{fit.confidence:.0%} bootstrap band")
        ax.axhline(fit.loss_inf, color="C0", linestyle=":", linewidth=1, label="irreducible loss L_inf")
        ax.plot(sizes[0], loss, "o", color="C1", label="fitted points")
        for x in args.forecast_points:
            y = float(fit.predict(x))
            err = None
            if fit.samples is not None:
                low, high = fit.predict_interval(x)
                err = [[y - float(low)], [float(high) - y]]
            ax.errorbar([x], [y], yerr=err, fmt="s", color="C2", capsize=4)
        if args.forecast_points:
            ax.plot([], [], "s", color="C2", label="forecast")
        ax.set_xscale("log")
        ax.set_xlabel(args.x)
        ax.set_title("L(x) = L_inf + (x0 / x)^alpha", fontsize=10)
    else:
        fitted = fit.predict(sizes[0], sizes[1]).tolist()
        ax.plot(loss, fitted, "o", color="C1", label="runs")
        lo, hi = min(loss + fitted), max(loss + fitted)
        ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=1, label="fitted = measured")
        ax.set_xlabel(f"measured {args.y}")
        ax.set_title(f"L(N, D) = E + A / N^alpha + B / D^beta, N = {args.x}, D = {args.x2}", fontsize=10)
    ax.set_ylabel(args.y)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
