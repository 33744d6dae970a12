"""Before/after in one run: the fused linear benchmark on two source trees, interleaved.

    python benchmarks/compare_trees.py --trees ../before ../after --shape 4096 1024 32768 float32 \
        --methods floor crossent_ce crossent_focal --rounds 3

Each tree's own benchmark worker (``crossent_harness.bench._linear_worker``, or ``crossent.bench._linear_worker``
in trees from before the harness moved) runs each configuration in a fresh process with that tree's ``src/``
first on ``PYTHONPATH``. Rounds alternate which tree goes first and rotate the methods, so load that changes
during the run falls on both trees alike. Prints, per method, the median and the range of every timing of
every round for each tree, their ratio (after / before), and the peak memory.

``--warmup 0`` measures each process's first call: its RSS figure then includes what that call
imports and initialises on first use (a worker older than that option runs its exact-accounting step
first, which hides it; workers from before that step, such as ``6a96de8``'s, time the first call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def worker_module(tree: Path) -> str:
    """The tree's benchmark worker: in the harness package, or inside the library in trees from before it."""
    if (tree / "src/crossent_harness/bench/_linear_worker.py").exists():
        return "crossent_harness.bench._linear_worker"
    return "crossent.bench._linear_worker"


def run_worker(tree: Path, spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [sys.executable, "-m", worker_module(tree), json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tree)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def rss_beyond_gradients(res: dict) -> float:
    """Peak-RSS growth of the step less the gradients' bytes, from either version of the worker's result.

    Older workers report it as ``peak_rss_growth``; newer ones report ``rss_growth`` (gradients
    included) and ``grad_bytes`` beside the exact ``peak_live_bytes``.
    """
    if "peak_rss_growth" in res:
        return res["peak_rss_growth"]
    if "rss_growth" in res and "grad_bytes" in res:
        return max(0, res["rss_growth"] - res["grad_bytes"])
    return res.get("peak_cuda_growth", float("nan"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"), help="two source trees")
    parser.add_argument("--shape", nargs=4, required=True, metavar=("N", "D", "V", "DTYPE"))
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (0: time the first call)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)

    trees = [Path(t).resolve() for t in args.trees]
    n, d, v, dtype = args.shape
    base = dict(n=int(n), d=int(d), v=int(v), dtype=dtype, device="cpu", warmup=args.warmup, repeats=args.repeats)
    base["seed"] = 0
    times = {(t, m): [] for t in range(2) for m in args.methods}
    peaks = {(t, m): [] for t in range(2) for m in args.methods}
    for r in range(args.rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        methods = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
        for m in methods:
            for t in order:
                res = run_worker(trees[t], dict(base, method=m), args.timeout)
                if "error" in res:
                    print(f"{trees[t].name} {m}: {res['error']}", file=sys.stderr)
                    continue
                times[t, m] += res.get("times", [res["median"]])
                peaks[t, m].append(rss_beyond_gradients(res) / 2**20)
    print(f"\nN={n} D={d} V={v} {dtype}, {args.rounds} rounds x {args.repeats} timings, warm-up {args.warmup}; "
          f"before = {trees[0].name}, after = {trees[1].name}\n")  # fmt: skip
    print("Peak MiB: growth of the peak RSS over the step beyond the gradients, which workers of every")
    print("version report (newer ones also report exact live bytes; BENCHMARKS.md has those).\n")
    print("| method | before median s | after median s | after / before | before range s | after range s "
          "| before peak MiB | after peak MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in args.methods:
        if not times[0, m] or not times[1, m]:
            continue
        a, b = statistics.median(times[0, m]), statistics.median(times[1, m])
        spread = [f"{min(times[t, m]):.3f}-{max(times[t, m]):.3f}" for t in range(2)]
        print(f"| {m} | {a:.3f} | {b:.3f} | {b / a:.3f} | {spread[0]} | {spread[1]} "
              f"| {max(peaks[0, m]):.0f} | {max(peaks[1, m]):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
