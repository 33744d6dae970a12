"""PNG plots of a comparison that a reader understands without the text around them.

Every figure names its dataset, how many seeds it summarises and what its error marks mean; every
method has its own colour, marker and line style, and methods are spread slightly along the x axis,
so that no line or error bar hides another. Reliability diagrams pool the test predictions of all
seeds (the bins' counts add up), rather than showing one seed.

matplotlib is imported lazily with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

GAP_FILL = (0.84, 0.15, 0.16, 0.3)  # translucent red: the gap shows over an accuracy bar too
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'crossent[bench]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def style(i: int) -> dict:
    """The ``i``-th method's colour, marker and line style (no two of the first 10 share all three)."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def rate_label(rate: float) -> str:
    """``clean`` for rate 0, else the rate."""
    return "clean" if rate == 0 else f"{rate:g}"


def seeds_text(seeds) -> str:
    seeds = sorted(set(seeds))
    if not seeds:
        return "no seeds"
    if len(seeds) == 1:
        return f"1 seed ({seeds[0]})"
    span = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    return f"{len(seeds)} seeds ({span})"


def describe(results: dict) -> str:
    """``letter, 5 seeds (0-4)``: what a figure of ``results`` summarises."""
    cfg = results.get("config", {})
    return f"{cfg.get('dataset', '?')}, {seeds_text(r['seed'] for r in results['runs'])}"


def _spread(count: int, width: float) -> list[float]:
    """Offsets that place ``count`` marks side by side within ``width``."""
    if count == 1:
        return [0.0]
    return [width * (i / (count - 1) - 0.5) for i in range(count)]


def _errorbars(ax, positions: list[float], series: dict[str, list[tuple[float, float] | None]], width: float) -> None:
    """One line per method through its means, error bars of one std, methods spread by ``width``."""
    for i, (offset, (method, points)) in enumerate(zip(_spread(len(series), width), series.items())):
        xs = [p + offset for p, v in zip(positions, points) if v is not None]
        means = [v[0] for v in points if v is not None]
        stds = [v[1] for v in points if v is not None]
        ax.errorbar(xs, means, yerr=stds, capsize=3, markersize=6, linewidth=1.2, label=method,
                    markerfacecolor="white" if i % 2 else None, **style(i))


def accuracy_vs_noise(rows: list[dict], path: Path, *, title: str = "", key: str = "acc") -> Path:
    """Mean test accuracy (error bars: one std over seeds) against the noise rate, one line per method."""
    plt = _plt()
    rates = sorted({r["rate"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    series = {}
    for m in methods:
        by_rate = {r["rate"]: r for r in rows if r["method"] == m and key in r}
        series[m] = [(100 * by_rate[x][key][0], 100 * by_rate[x][key][1]) if x in by_rate else None for x in rates]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    span = (max(rates) - min(rates)) or 1.0
    _errorbars(ax, rates, series, width=0.06 * span)
    ax.set_xticks(rates, [rate_label(x) for x in rates])
    noise = next((r["noise"] for r in rows if r["rate"]), "label")
    ax.set_xlabel(f"{noise} noise rate on the training labels")
    ax.set_ylabel("test accuracy % (clean test labels)" if key == "acc" else key)
    seeds = max(r["n"] for r in rows)
    ax.set_title(f"{title}\nmean over {seeds} seed{'s' * (seeds > 1)}; error bars: ±1 std", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_by_setting(groups: list[tuple[str, list[dict]]], path: Path, *, title: str, key: str = "acc",
                        ylabel: str = "test accuracy % (clean test labels)") -> Path:
    """Mean ± std of ``key`` for each method in each setting (``groups``: ``(setting label, aggregated rows)``)."""
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for _, rows in groups for r in rows))
    series = {}
    for m in methods:
        points = []
        for _, rows in groups:
            row = next((r for r in rows if r["method"] == m and key in r), None)
            points.append((100 * row[key][0], 100 * row[key][1]) if row else None)
        series[m] = points
    fig, ax = plt.subplots(figsize=(1.9 * len(groups) + 3.6, 4.2))
    _errorbars(ax, list(range(len(groups))), series, width=0.5)
    for line in ax.get_lines():
        line.set_linestyle("none")  # settings are categories: no line joins them
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pooled_bins(bins_list: list[dict]) -> dict:
    """Reliability bins of several seeds as one: counts add up; accuracy and confidence are count-weighted
    (``None`` for a bin empty in every seed)."""
    edges = bins_list[0]["edges"]
    k = len(edges) - 1
    count = [sum(b["count"][i] for b in bins_list) for i in range(k)]

    def weighted(field):
        out = []
        for i in range(k):
            total = sum(b["count"][i] * b[field][i] for b in bins_list if b["count"][i])
            out.append(total / count[i] if count[i] else None)
        return out

    return {"edges": edges, "count": count, "accuracy": weighted("accuracy"), "confidence": weighted("confidence")}


def reliability(panels: list[tuple[str, dict]], path: Path, *, title: str = "", cols: int = 4) -> Path:
    """Reliability diagrams, one panel per ``(title, bins)``: per-bin accuracy against confidence."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.9), squeeze=False)
    for ax, (panel_title, bins) in zip(axes.flat, panels):
        edges = bins["edges"]
        width = edges[1] - edges[0]
        filled = [(e, a, c) for e, a, c, n in zip(edges[:-1], bins["accuracy"], bins["confidence"], bins["count"]) if n]
        ax.bar([f[0] for f in filled], [f[1] for f in filled], width=width, align="edge", color="tab:blue",
               edgecolor="k", linewidth=0.5)
        # the gap runs from the bin's accuracy to its mean confidence, up (overconfident) or down
        ax.bar([f[0] for f in filled], [f[2] - f[1] for f in filled], bottom=[f[1] for f in filled], width=width,
               align="edge", facecolor=GAP_FILL, hatch="//", edgecolor="tab:red", linewidth=0.5)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel("confidence (max softmax)", fontsize=8)
        ax.set_ylabel("accuracy in the bin", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend = [Patch(facecolor="tab:blue", edgecolor="k", label="accuracy of the bin"),
              Patch(facecolor=GAP_FILL, edgecolor="tab:red", hatch="//", label="gap to the bin's mean confidence"),
              Line2D([0], [0], color="k", linestyle="--", label="perfect calibration")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def reliability_panels(runs: list[dict]) -> list[tuple[str, dict]]:
    """One pooled panel per method (and one more after temperature scaling when fitted), titled with
    the ECE's mean ± std over the seeds."""
    panels = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        for key, bins_key, suffix in (("ece", "reliability", ""), ("ece_ts", "reliability_ts", " + temp. scaling"),
                                      ("ece_ca", "reliability_ca", " + CA calibrator"),
                                      ("ece_ca_plain", "reliability_ca_plain", " + CA, unweighted")):
            if all(bins_key in r for r in rs):
                mean, std = _mean_std([100 * r[key] for r in rs])
                spread = f" ± {std:.1f}" if len(rs) > 1 else ""
                panels.append((f"{method}{suffix}\nECE {mean:.1f}{spread} %", pooled_bins([r[bins_key] for r in rs])))
    return panels


def training_curves(runs: list[dict], path: Path, *, title: str = "", references: dict | None = None) -> Path:
    """Test accuracy against optimizer step: the mean over seeds per method and rate, band of ±1 std.

    ``references`` maps a label to an accuracy in % drawn as a dotted horizontal line (published figures).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    keys = list(dict.fromkeys((r["method"], r["rate"]) for r in runs if r.get("history")))
    for i, (method, rate) in enumerate(keys):
        histories = [r["history"] for r in runs if r["method"] == method and r["rate"] == rate and r.get("history")]
        steps = [h["step"] for h in histories[0]]
        stats = [_mean_std([100 * hist[j]["test_acc"] for hist in histories]) for j in range(len(steps))]
        label = method + ("" if len({k[1] for k in keys}) == 1 else f", {rate_label(rate)}")
        st = style(i)
        ax.plot(steps, [m for m, _ in stats], label=label, markevery=max(1, len(steps) // 8), markersize=5, **st)
        if len(histories) > 1:
            ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=st["color"], alpha=0.15)
    for j, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=("0.1", "0.55")[j % 2], linestyle=("--", ":")[j % 2], linewidth=1.1, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy %")
    seeds = len({r["seed"] for r in runs})
    band = "mean over seeds; band: ±1 std" if seeds > 1 else "one seed"
    ax.set_title("\n".join(textwrap.wrap(title, 90) + [band]), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict, rows: list[dict], out: Path) -> list[Path]:
    """Every plot that applies to ``results``; returns the files written."""
    written = []
    info = describe(results)
    rates = list(dict.fromkeys(r["rate"] for r in results["runs"]))
    noise = results.get("config", {}).get("noise", "none")
    if len(rates) > 1:
        written.append(accuracy_vs_noise(rows, out / "accuracy_vs_noise.png", title=f"{info}, {noise} label noise"))
    for rate in rates:
        runs = [r for r in results["runs"] if r["rate"] == rate]
        setting = "clean training labels" if noise == "none" or rate == 0 else f"{noise} noise {rate:g}"
        title = f"Reliability on the test set: {info} pooled, {setting}; 15 equal-width bins, empty bins left blank"
        suffix = f"_{rate:g}" if len(rates) > 1 else ""
        written.append(reliability(reliability_panels(runs), out / f"reliability{suffix}.png", title=title))
    if any(r.get("history") for r in results["runs"]):
        written.append(training_curves(results["runs"], out / "training_curves.png", title=f"{info}, test accuracy"))
    return written
