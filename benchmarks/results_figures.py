"""The figures and tables of docs/results.md, from the results folders of benchmarks/regenerate_results.sh.

    python benchmarks/results_figures.py --results results/docs --img docs/img

Writes the PNGs into --img and prints every table of the page (Markdown) on stdout, each followed by the
provenance its runs recorded (commit, torch, CPU, threads). A folder that is missing is skipped with a
note on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from crossent_harness.experiments import noise, plots, protocols, report  # noqa: E402
from crossent_harness.records import describe  # noqa: E402

# MNIST-1D reference figures: the README's (best of the evaluations) and the notebook's last evaluation
MNIST1D_PUBLISHED = {"logistic": (32, 31.5), "MLP": (68, 65.1), "CNN": (94, 92.3)}


def load(folder: Path) -> dict | None:
    """The results of ``folder``: its results.json, or those of its seed-K subfolders merged (finished runs only)."""
    paths = [folder / "results.json"] if (folder / "results.json").exists() else sorted(folder.glob("seed-*/results.json"))
    if not paths:
        print(f"skipped: no results in {folder}", file=sys.stderr)
        return None
    parts = [json.loads(p.read_text()) for p in paths]
    runs, seen = [], set()
    for r in (r for part in parts for r in part["runs"]):
        key = (r["method"], r["rate"], r["seed"])
        if key not in seen:  # a (loss, rate, seed) that two folders hold counts once
            seen.add(key)
            runs.append(r)
    merged = {**parts[0], "runs": runs, "provenance": [part.get("provenance") for part in parts]}
    unfinished = [str(p.parent) for p, part in zip(paths, parts) if part.get("complete") is False]
    if unfinished:
        print(f"note: unfinished runs in {', '.join(unfinished)}", file=sys.stderr)
    return merged


def provenance(*results: dict) -> str:
    """The line under a table: what its runs recorded of their commit, torch, CPU and threads."""
    records = [p for res in results for p in res["provenance"]]
    known = list(dict.fromkeys(describe(p) for p in records if p))
    missing = sum(1 for p in records if not p)
    if not known:
        return ("Provenance: not recorded (these runs predate it); rerun `benchmarks/regenerate_results.sh` "
                "to record it.")
    text = "Produced at: " + "; ".join(known)
    if missing:
        text += f"; {missing} of {len(records)} result folders predate the record"
    return text + "."


def fmt(pair, scale=100, dec=2) -> str:
    mean, std = pair
    return f"{mean * scale:.{dec}f} ± {std * scale:.{dec}f}"


def cell(row: dict | None, key: str = "acc", of: int | None = None) -> str:
    """``mean ± std``, with the seed count when it differs from ``of`` (one seed: the value alone)."""
    if row is None or key not in row:
        return ""
    if row["n"] == 1:
        return f"{100 * row[key][0]:.2f}" + (" (1 seed)" if of != 1 else "")
    return fmt(row[key]) + (f" ({row['n']} seeds)" if of is not None and row["n"] != of else "")


def n_seeds(res: dict) -> int:
    return len({r["seed"] for r in res["runs"]})


def seeds_label(res: dict) -> str:
    n = n_seeds(res)
    return f"{n} seed{'s' * (n != 1)}"


def seeds_range(rows: list[dict]) -> str:
    """``5 seeds``, or ``1-5 seeds`` when the losses of one setting have different counts."""
    low, high = min(r["n"] for r in rows), max(r["n"] for r in rows)
    return f"{high} seed{'s' * (high != 1)}" if low == high else f"{low}-{high} seeds"


def relabel(res: dict, label: str) -> list[dict]:
    return [{**r, "method": label} for r in res["runs"]]


# -- Letter ----------------------------------------------------------------------------------------
def letter(results: Path, img: Path) -> None:
    settings = [("clean labels", "letter-clean"), ("ldr-uniform 0.6", "letter-uniform"),
                ("ldr-class-dependent 0.3", "letter-class-dependent")]
    loaded = [(label, load(results / name)) for label, name in settings]
    loaded = [(label, res) for label, res in loaded if res]
    if not loaded:
        return
    aggregated = [(label, report.aggregate(res["runs"])) for label, res in loaded]
    groups = [(f"{label}\n({seeds_range(rows)})", rows) for label, rows in aggregated]
    plots.accuracy_by_setting(
        groups, img / "letter_accuracy.png",
        title="Letter under the LDR-KL reference setup (FFNN 16-16-16 tanh, SGD, 100 epochs), 2,000 clean test rows\n"
              "mean test accuracy over seeds; error bars: ±1 std",
    )
    print("\n### Letter, reference network: test accuracy %\n")
    methods = list(dict.fromkeys(r["method"] for _, res in loaded for r in res["runs"]))
    print("| loss | " + " | ".join(f"{label} ({seeds_label(res)})" for label, res in loaded) + " |")
    print("|---|" + "---:|" * len(loaded))
    for m in methods:
        cells = []
        for _, res in loaded:
            row = next((r for r in report.aggregate(res["runs"]) if r["method"] == m), None)
            cells.append(cell(row, of=n_seeds(res)))
        print(f"| `{m}` | " + " | ".join(cells) + " |")
    for label, res in loaded:
        print(f"\n{label}, ECE % / NLL / mean confidence % against accuracy % (pooled over seeds):")
        for r in report.aggregate(res["runs"]):
            bins = plots.pooled_bins([x["reliability"] for x in res["runs"] if x["method"] == r["method"]])
            conf = sum(n * c for n, c in zip(bins["count"], bins["confidence"]) if n) / sum(bins["count"])
            print(f"- {r['method']}: ECE {fmt(r['ece'], dec=1)}, NLL {r['nll'][0]:.2f}, confidence {100 * conf:.1f} "
                  f"against accuracy {100 * r['acc'][0]:.1f}")
        noise = [r["actual_noise"] for r in res["runs"]]
        print(f"labels changed: {100 * min(noise):.2f}-{100 * max(noise):.2f} %")
    print("\n" + provenance(*(res for _, res in loaded)))


def letter_width(results: Path, img: Path) -> None:
    pairs = [("ldr-uniform 0.6", "letter-uniform", "letter-wide-uniform"),
             ("ldr-class-dependent 0.3", "letter-class-dependent", "letter-wide-class-dependent")]
    groups, lines, loaded = [], [], []
    for label, ref_name, wide_name in pairs:
        ref, wide = load(results / ref_name), load(results / wide_name)
        if not (ref and wide):
            continue
        loaded += [ref, wide]
        keep = {r["method"] for r in wide["runs"]}
        ref_rows = [r for r in report.aggregate(ref["runs"]) if r["method"] in keep]
        wide_rows = report.aggregate(wide["runs"])
        groups += [(f"{label}\n16-16-16 ({seeds_range(ref_rows)})", ref_rows),
                   (f"{label}\n100-100 ({seeds_range(wide_rows)})", wide_rows)]
        for wr in wide_rows:
            rr = next(r for r in ref_rows if r["method"] == wr["method"])
            lines.append(f"| {label} | `{wr['method']}` | {cell(rr, of=rr['n'])} ({rr['n']}) | {cell(wr, of=wr['n'])} ({wr['n']}) |")
    if not groups:
        return
    plots.accuracy_by_setting(
        groups, img / "letter_width.png",
        title="Letter, LDR-KL setup: the reference network (16-16-16) against the wider 100-100 variant\n"
              "mean test accuracy over seeds; error bars: ±1 std",
    )
    print("\n### Letter, network width: test accuracy %\n")
    print("| noise | loss | 16-16-16, the reference (seeds) | 100-100, ldr-wide (seeds) |\n|---|---|---:|---:|")
    print("\n".join(lines))
    print("\n" + provenance(*loaded))


def forward_correction(results: Path) -> None:
    res = load(results / "letter-forward-correction")
    if not res:
        return
    print("\n### Letter, forward correction (ldr-class-dependent 0.3)\n")
    for row in report.aggregate(res["runs"]):
        errors = [r["info"].get("T_error") for r in res["runs"] if r["method"] == row["method"]]
        err = f", T error (mean L1 per row) {sum(errors) / len(errors):.2f}" if None not in errors else ""
        print(f"- `{row['method']}`: {cell(row)}{err}")
    print("\n" + provenance(res))


# -- MNIST-1D ---------------------------------------------------------------------------------------
def mnist1d(results: Path, img: Path) -> None:
    rows = []
    for label, name in (("logistic", "mnist1d-linear"), ("MLP", "mnist1d-mlp"), ("CNN", "mnist1d-cnn"),
                        ("MLP without the residual connection", "mnist1d-mlp-plain"),
                        ("MLP 256-256 (residual)", "mnist1d-mlp256")):
        res = load(results / name)
        if res:
            rows.append((label, res))
    if not rows:
        return
    print("\n### MNIST-1D: test accuracy %\n")
    print("| model | published best (README) | published final (notebook) | best, mean ± std | final, mean ± std "
          "| final, min-max | step of the best, median (range) | seeds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, res in rows:
        agg = report.aggregate(res["runs"])[0]
        finals = sorted(100 * r["acc"] for r in res["runs"])
        steps = sorted(r["best_step"] for r in res["runs"])
        best, final = MNIST1D_PUBLISHED.get(label, ("", ""))
        print(f"| {label} | {best} | {final} | {fmt(agg['best_acc'])} | {fmt(agg['acc'])} | "
              f"{finals[0]:.1f}-{finals[-1]:.1f} | {steps[len(steps) // 2]} ({steps[0]}-{steps[-1]}) | {agg['n']} |")
    print("\n" + provenance(*(res for _, res in rows)))
    mlps = [(label, res) for label, res in rows if label.startswith("MLP")]
    names = {"MLP": "MLP 100-100, residual (the reference's)"}
    runs = [r for label, res in mlps for r in relabel(res, names.get(label, label))]
    if not runs:
        return
    plots.training_curves(
        runs, img / "mnist1d_mlp.png",
        title=f"MNIST-1D, reference protocol (Adam 1e-2, batch 100, 6000 steps), "
              f"{plots.seeds_text(r['seed'] for r in runs)}",
        references={"README's MLP figure (68)": 68.0, "notebook's final MLP figure (65.1)": 65.1},
    )


# -- Fashion-MNIST ------------------------------------------------------------------------------------
def fashion(results: Path, img: Path) -> None:
    res = load(results / "fashion-calibration")
    if res:
        title = (f"Fashion-MNIST, clean labels, MLP 784-256-128-100-10, 40 epochs: reliability on the 10,000 test "
                 f"images, {seeds_label(res)} pooled; 15 equal-width bins, empty bins left blank")
        plots.reliability(plots.reliability_panels(res["runs"]), img / "fashion_calibration_reliability.png",
                          title=title)
        print("\n### Fashion-MNIST calibration\n")
        print(report.markdown_table(report.aggregate(res["runs"])))
        print("\n" + provenance(res))
    res = load(results / "fashion-lt")
    if res:
        print("\n### Fashion-MNIST-LT\n")
        print(report.markdown_table(report.aggregate(res["runs"])))
        print("\n" + provenance(res))


# -- the presets and noise definitions, as the code states them -------------------------------------------
def definitions() -> None:
    print("\n### Protocols\n")
    print("| preset | setup | source | what still differs |\n|---|---|---|---|")
    for p in protocols.PROTOCOLS.values():
        differs = "; ".join(p.deviations) or "-"
        print(f"| `{p.name}` | {p.summary} | {p.source} | {differs} |")
    print("\n### Noise definitions\n")
    print("| `--noise` | definition | source |\n|---|---|---|")
    for m in noise.MODELS.values():
        print(f"| `{m.name}` | {m.summary} | {m.source} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/docs", help="folder of the result folders (default: results/docs)")
    parser.add_argument("--img", default="docs/img", help="where the PNGs go (default: docs/img)")
    args = parser.parse_args(argv)
    results, img = Path(args.results), Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    definitions()
    letter(results, img)
    letter_width(results, img)
    forward_correction(results)
    mnist1d(results, img)
    fashion(results, img)


if __name__ == "__main__":
    main()
