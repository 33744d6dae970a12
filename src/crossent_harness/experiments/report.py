"""Aggregation over seeds and the files of a results folder: markdown table, CSV, JSON."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..records import describe, strict_json

#: (record key, column title, scale, decimals)
COLUMNS = (
    ("acc", "acc %", 100, 2),
    ("bacc", "bal. acc %", 100, 2),
    ("nll", "NLL", 1, 3),
    ("ece", "ECE %", 100, 2),
    ("best_acc", "best acc %", 100, 2),
    ("ece_ts", "ECE % (TS)", 100, 2),
    ("nll_ts", "NLL (TS)", 1, 3),
    ("temperature", "T", 1, 2),
    ("ece_ca", "ECE % (CA)", 100, 2),
    ("ece_ca_plain", "ECE % (CA, unweighted)", 100, 2),
)
PER_RUN = ("method", "noise", "rate", "seed", "actual_noise", "acc", "bacc", "nll", "ece", "best_acc", "best_step",
           "ece_ts", "nll_ts", "temperature", "ece_ca", "nll_ca", "ece_ca_plain", "nll_ca_plain", "seconds")


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (method, rate) in first-seen order: ``{key: (mean, std)}`` over seeds, plus ``n``."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["rate"]), []).append(r)
    rows = []
    for (method, rate), rs in groups.items():
        row = {"method": method, "rate": rate, "noise": rs[0]["noise"], "n": len(rs)}
        for key, *_ in COLUMNS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if len(vals) == len(rs):
                row[key] = _mean_std(vals)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The aggregate as a markdown table (``mean ± std`` when several seeds)."""
    keys = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    show_rate = len({r["rate"] for r in rows}) > 1 or any(r["rate"] for r in rows)
    head = ["loss"] + (["noise"] if show_rate else []) + [c[1] for c in keys] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [f"`{r['method']}`"]
        if show_rate:
            cells.append("clean" if r["rate"] == 0 else f"{r['noise']} {r['rate']:g}")
        for key, _, scale, dec in keys:
            if key not in r:
                cells.append("")
                continue
            mean, std = r[key]
            cells.append(f"{mean * scale:.{dec}f}" + (f" ± {std * scale:.{dec}f}" if r["n"] > 1 else ""))
        cells.append(str(r["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: dict, out: Path, command: str | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``runs.csv`` and ``results.json`` into ``out``; returns their paths.

    ``results.json`` is strict JSON: a value that is not a finite number is ``null`` (an empty reliability
    bin; the NLL of a run that diverged). ``summary.md`` names the provenance of the runs.

    ``results["complete"] = False`` marks the files of a grid still running (or interrupted); each file
    is replaced whole, so that an interruption never leaves a half-written one.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results["runs"])
    table = markdown_table(rows)
    paths = {"markdown": out / "summary.md", "csv": out / "runs.csv", "json": out / "results.json"}
    header = f"Dataset: {results['dataset']}\n\n" + (f"Command: `{command}`\n\n" if command else "")
    if "provenance" in results:
        header += f"Run at: {describe(results['provenance'])}.\n\n"
    if results.get("complete") is False:
        header += f"Incomplete: the {len(results['runs'])} runs finished so far.\n\n"
    _replace(paths["markdown"], header + table + "\n")
    tmp = paths["csv"].with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_RUN, extrasaction="ignore")
        w.writeheader()
        for r in results["runs"]:
            w.writerow({k: r.get(k, "") for k in PER_RUN})
    tmp.replace(paths["csv"])
    summary = [
        {k: (v if not isinstance(v, tuple) else {"mean": v[0], "std": v[1]}) for k, v in row.items()} for row in rows
    ]
    payload = {**results, "summary": summary, "command": command}
    _replace(paths["json"], strict_json(payload, indent=1, default=str))
    return paths


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
