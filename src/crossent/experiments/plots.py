"""PNG plots of a comparison: accuracy against noise rate, reliability diagrams, test accuracy over training.

matplotlib is imported lazily with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'crossent[bench]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_noise(rows: list[dict], path: Path, key: str = "acc") -> Path:
    """One line per method: mean test accuracy (± std band) against the noise rate."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method and key in r), key=lambda r: r["rate"])
        x = [r["rate"] for r in rs]
        m = [100 * r[key][0] for r in rs]
        s = [100 * r[key][1] for r in rs]
        ax.plot(x, m, marker="o", label=method)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)
    ax.set_xlabel(f"{rows[0]['noise']} noise rate")
    ax.set_ylabel("test accuracy %" if key == "acc" else key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability(panels: list[tuple[str, dict]], path: Path, cols: int = 4) -> Path:
    """Reliability diagrams: per-bin accuracy against confidence, one panel per ``(title, bins)``."""
    plt = _plt()
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, (title, bins) in zip(axes.flat, panels):
        edges = bins["edges"]
        width = edges[1] - edges[0]
        acc = [0.0 if a != a else a for a in bins["accuracy"]]  # NaN (empty bin) -> no bar
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="k", linewidth=0.5, label="accuracy")
        conf = [c for c in bins["confidence"]]
        gaps = [(e, a, c) for e, a, c, n in zip(edges[:-1], acc, conf, bins["count"]) if n]
        ax.bar([g[0] for g in gaps], [g[2] - g[1] for g in gaps], bottom=[g[1] for g in gaps], width=width,
               align="edge", fill=False, hatch="//", edgecolor="tab:red", linewidth=0.5, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_curves(runs: list[dict], path: Path) -> Path:
    """Test accuracy against optimizer step for every run that recorded a history."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r.get("history"):
            ax.plot([h["step"] for h in r["history"]], [100 * h["test_acc"] for h in r["history"]],
                    label=f"{r['method']} rate {r['rate']:g} seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict, rows: list[dict], out: Path) -> list[Path]:
    """Every plot that applies to ``results``; returns the files written."""
    written = []
    if len({r["rate"] for r in rows}) > 1:
        written.append(accuracy_vs_noise(rows, out / "accuracy_vs_noise.png"))
    first_seed = results["runs"][0]["seed"]
    for rate in dict.fromkeys(r["rate"] for r in results["runs"]):
        sel = [r for r in results["runs"] if r["rate"] == rate and r["seed"] == first_seed]
        panels = []
        for r in sel:
            panels.append((f"{r['method']}  ECE {100 * r['ece']:.1f}%", r["reliability"]))
            if "reliability_ts" in r:
                panels.append((f"{r['method']} +TS  ECE {100 * r['ece_ts']:.1f}%", r["reliability_ts"]))
        suffix = f"_{rate:g}" if len({r['rate'] for r in rows}) > 1 else ""
        written.append(reliability(panels, out / f"reliability{suffix}.png"))
    if any(r.get("history") for r in results["runs"]):
        written.append(training_curves(results["runs"], out / "training_curves.png"))
    return written
