"""Speed and memory of fused linear cross-entropy: crossent against the naive path and its peers.

Every configuration runs in a fresh process and reports the median of repeated forward + backward
timings and its peak memory beyond inputs and gradients (RSS on CPU, allocated memory on CUDA):

* ``floor``: the three matrix products alone (``z = e @ c.T``, ``z @ c``, ``z.T @ e``); ``floor_t``: the
  same with the weight gradient's product transposed, ``e.T @ z`` with both operands row-major (the
  faster layout on CPUs with bfloat16 matrix units). "x floor" is against the faster of the two;
* ``naive``: materialised logits + ``F.cross_entropy``; ``naive_compile``: the same under ``torch.compile``;
* ``torch_lce`` (``options=None``), ``torch_lce_auto`` (``LinearCrossEntropyOptions()``) and
  ``torch_lce_512`` (``batch_chunk_size=512``): PyTorch's ``F.linear_cross_entropy`` (torch >= 2.13);
* ``cce_compile``: Cut Cross-Entropy's ``torch_compile`` implementation, when installed;
* ``crossent_ce``, ``crossent_focal`` (a focal loss over ``lse``/``target``), ``crossent_z_loss``,
  ``crossent_smooth`` (label smoothing 0.1): :func:`crossent.linear_cross_entropy`;
  ``crossent_ce_accum_input`` (bfloat16/float16 only): CE with ``accum_dtype`` = the input dtype.

Ratios: time to the floor and to the fastest peer (any non-crossent method but the floors); memory to
the naive path and to that fastest peer. ``cpu share`` is the smallest share of its threads' time a
configuration got on the CPUs: well below 1, another process competed and its timing is suspect
(``--quiet-wait`` makes each configuration wait for idle CPUs first, on shared machines). Quick defaults take about a minute; ``--full`` runs the
recorded shapes (N=4096, D=1024, V in {32768, 131072}, float32, plus bfloat16 at V=131072).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..losses._base import Loss
from ..stats import LSE, TARGET

METHODS = (
    "floor",
    "floor_t",
    "naive",
    "naive_compile",
    "torch_lce",
    "torch_lce_auto",
    "torch_lce_512",
    "cce_compile",
    "crossent_ce",
    "crossent_focal",
    "crossent_z_loss",
    "crossent_smooth",
    "crossent_ce_accum_input",
)
#: Methods that differ from another one only for bfloat16/float16 inputs (skipped for the others).
HALF_ONLY = ("crossent_ce_accum_input",)
QUICK_METHODS = ("floor", "floor_t", "naive", "torch_lce_512", "crossent_ce", "crossent_focal", "crossent_z_loss")
FLOORS = ("floor", "floor_t")
PEERS = ("naive", "naive_compile", "torch_lce", "torch_lce_auto", "torch_lce_512", "cce_compile")
QUICK_SHAPES = ((2048, 512, 8192, "float32"),)
FULL_SHAPES = ((4096, 1024, 32768, "float32"), (4096, 1024, 131072, "float32"), (4096, 1024, 131072, "bfloat16"))


class _FocalLike(Loss):
    """Softmax focal loss ``-(1 - p_y)^gamma log p_y`` over ``lse`` and ``target`` (a non-CE workload)."""

    def __init__(self, gamma: float = 2.0):
        self.gamma = float(gamma)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = s[TARGET] - s[LSE]
        return -((1 - logp.exp()) ** self.gamma) * logp


def focal_like(gamma: float = 2.0) -> Loss:
    return _FocalLike(gamma)


def loss_kwargs() -> dict[str, dict]:
    """The ``linear_cross_entropy`` arguments of each benchmarked loss (``crossent_<name>`` methods)."""
    return {"ce": {}, "focal": {"loss": focal_like()}, "z_loss": {"z_loss": 1e-4}, "smooth": {"label_smoothing": 0.1}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmark (shared by ``benchmarks/bench_linear.py`` and ``crossent bench``)."""
    parser.add_argument("--full", action="store_true", help="the recorded shapes and every method (tens of minutes)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to run (default: quick set, or all with --full)")
    parser.add_argument("--shape", nargs=4, action="append", metavar=("N", "D", "V", "DTYPE"),
                        help="a shape to run instead of the defaults (repeatable), e.g. --shape 4096 1024 32768 float32")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, round-robin, each in a fresh process; the median "
                        "is over all rounds' timings (robust to load that changes during the run)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=None, help="crossent chunk_size (default: its own)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per run (default: torch's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one configuration is abandoned")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each configuration, wait up to this long for other processes to leave the "
                        "CPUs idle (shared machines); 0: do not wait")  # fmt: skip
    parser.add_argument("--out", default="results/bench_linear", help="folder for linear.json, linear.md, linear.png")


def busy_fraction(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent busy over ``interval`` seconds (``/proc/stat``; None elsewhere)."""

    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_for_quiet(limit: float, threshold: float = 0.15) -> float | None:
    """Wait (up to ``limit`` seconds) until other processes keep under ``threshold`` of the CPUs busy."""
    waited = 0.0
    busy = busy_fraction()
    while busy is not None and busy > threshold and waited < limit:
        time.sleep(15.0)
        waited += 16.0
        busy = busy_fraction()
    return busy


def _run_one(spec: dict, timeout: float) -> dict:
    import crossent

    env = dict(os.environ)
    src = str(Path(crossent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "crossent.bench._linear_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


def _combine(method: str, runs: list[dict]) -> dict:
    """One row per method: the median of every timing of every round, the largest memory peak."""
    ok = [r for r in runs if "median" in r]
    if not ok:
        return {"method": method, "error": runs[0].get("error", "no run") if runs else "no run"}
    times = sorted(t for r in ok for t in r["times"])
    out = {"method": method, "times": times, "median": times[len(times) // 2], "rounds": len(ok), "loss": ok[0].get("loss")}
    shares = [r["cpu_share"] for r in ok if "cpu_share" in r]
    if shares:
        out["cpu_share"] = min(shares)
    for key in ("peak_rss_growth", "peak_cuda_growth"):
        if key in ok[0]:
            out[key] = max(r[key] for r in ok)
    return out


def _ratios(rows: list[dict]) -> None:
    ok = {r["method"]: r for r in rows if "median" in r}
    floors = [r for m, r in ok.items() if m in FLOORS]
    floor = min(floors, key=lambda r: r["median"]) if floors else None
    peers = [r for m, r in ok.items() if m in PEERS]
    best = min(peers, key=lambda r: r["median"]) if peers else None
    naive = ok.get("naive")
    for r in ok.values():
        if floor:
            r["x_floor"] = r["median"] / floor["median"]
        if best:
            r["best_peer"] = best["method"]
            r["x_best_peer"] = r["median"] / best["median"]
        mem = r.get("peak_cuda_growth", r.get("peak_rss_growth"))
        if mem is not None:
            r["peak_bytes"] = mem
            for key, ref in (("mem_x_naive", naive), ("mem_x_best_peer", best)):
                ref_mem = ref and ref.get("peak_cuda_growth", ref.get("peak_rss_growth"))
                if ref_mem:
                    r[key] = mem / ref_mem


def _table(rows: list[dict]) -> str:
    head = f"{'method':<17}{'median s':>10}{'x floor':>9}{'x peer':>8}{'peak MiB':>10}{'mem/naive':>10}{'mem/peer':>9}{'cpu':>6}  loss"
    out = [head, "-" * len(head)]

    def f(r, k, spec):
        return format(r[k], spec) if k in r else "-"

    for r in rows:
        if "error" in r:
            out.append(f"{r['method']:<17}  skipped: {r['error']}")
            continue
        mib = r["peak_bytes"] / 2**20 if "peak_bytes" in r else None
        out.append(
            f"{r['method']:<17}{r['median']:>10.3f}{f(r, 'x_floor', '.2f'):>9}{f(r, 'x_best_peer', '.2f'):>8}"
            f"{(format(mib, '.0f') if mib is not None else '-'):>10}{f(r, 'mem_x_naive', '.3f'):>10}"
            f"{f(r, 'mem_x_best_peer', '.3f'):>9}{f(r, 'cpu_share', '.2f'):>6}  {'-' if r.get('loss') is None else format(r['loss'], '.6f')}"
        )
    return "\n".join(out)


def markdown(result: dict) -> str:
    """The results as Markdown tables, one per shape (for BENCHMARKS.md)."""
    out = []
    groups: dict = {}
    for r in result["results"]:
        groups.setdefault((r["n"], r["d"], r["v"], r["dtype"]), []).append(r)
    for (n, d, v, dtype), rows in groups.items():
        out += [f"N={n}, D={d}, V={v}, {dtype}", "",
                "| method | median s | x floor | x fastest peer | peak MiB | memory / naive | memory / fastest peer | cpu share |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            if "error" in r:
                out.append(f"| {r['method']} | skipped: {r['error']} | | | | | | |")
                continue

            def f(k, spec):
                return format(r[k], spec) if k in r else "-"

            mib = format(r["peak_bytes"] / 2**20, ".0f") if "peak_bytes" in r else "-"
            out.append(
                f"| {r['method']} | {r['median']:.2f} | {f('x_floor', '.2f')} | {f('x_best_peer', '.2f')} | {mib} "
                f"| {f('mem_x_naive', '.3f')} | {f('mem_x_best_peer', '.3f')} | {f('cpu_share', '.2f')} |"
            )
        best = next((r["best_peer"] for r in rows if "best_peer" in r), None)
        out += ["", f"Fastest peer: `{best}`." if best else "", ""]
    return "\n".join(out)


def _plot(groups: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for (title, rows), (ax_t, ax_m) in zip(groups.items(), axes):
        ok = [r for r in rows if "median" in r]
        names = [r["method"] for r in ok]
        colors = ["tab:green" if n.startswith("crossent") else "tab:gray" if n in FLOORS else "tab:blue" for n in names]
        ax_t.barh(names, [r["median"] for r in ok], color=colors)
        ax_t.set_xlabel("forward + backward, median s")
        ax_t.set_title(title, fontsize=9)
        ax_t.invert_yaxis()
        ax_m.barh(names, [max(r.get("peak_bytes", 0), 0) / 2**20 for r in ok], color=colors)
        ax_m.set_xlabel("peak memory beyond inputs and gradients, MiB")
        ax_m.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table per shape, write ``linear.json``, ``linear.md`` (and ``linear.png``)
    to ``args.out``; return the results (``{"meta": ..., "results": [...]}``)."""
    full = getattr(args, "full", False)
    methods = args.methods or (METHODS if full else QUICK_METHODS)
    if args.shape:
        shapes = [(int(n), int(d), int(v), dt) for n, d, v, dt in args.shape]
    else:
        shapes = FULL_SHAPES if full else QUICK_SHAPES
    threads = args.threads or torch.get_num_threads()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": args.device,
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    groups: dict[str, list[dict]] = {}
    for n, d, v, dtype in shapes:
        title = f"N={n} D={d} V={v} {dtype} ({args.device}, {threads} threads)"
        print(f"\n{title}", flush=True)
        shape_methods = [m for m in methods if dtype in ("bfloat16", "float16") or m not in HALF_ONLY]
        runs: dict[str, list[dict]] = {m: [] for m in shape_methods}
        rounds = max(1, getattr(args, "rounds", 1))
        missing: set[str] = set()
        for k in range(rounds):
            # Each round starts one method later, so a slow spell of the machine does not always
            # fall on the same methods.
            shift = k % len(shape_methods)
            for method in shape_methods[shift:] + shape_methods[:shift]:
                if method in missing:
                    continue
                spec = dict(method=method, n=n, d=d, v=v, dtype=dtype, device=args.device, warmup=args.warmup,
                            repeats=args.repeats, threads=threads, chunk_size=args.chunk_size)  # fmt: skip
                busy = _wait_for_quiet(args.quiet_wait) if getattr(args, "quiet_wait", 0) else busy_fraction(0.2)
                res = _run_one(spec, args.timeout)
                res["busy_before"] = busy
                runs[method].append(res)
                status = f"{res['median']:.3f} s" if "median" in res else res["error"]
                print(f"  {method:<17} {status}" + (f"  (round {k + 1}/{rounds})" if rounds > 1 else ""), flush=True)
                if "error" in res and res["error"].startswith(("ModuleNotFoundError", "ImportError")):
                    missing.add(method)  # a peer that is not installed is not retried
        rows = [_combine(m, rs) for m, rs in runs.items()]
        for r in rows:
            r.update(n=n, d=d, v=v, dtype=dtype)
        _ratios(rows)
        print(_table(rows), flush=True)
        groups[title] = rows
    meta["loadavg_end"] = os.getloadavg()
    result = {"meta": meta, "results": [r for rows in groups.values() for r in rows]}
    (out_dir / "linear.json").write_text(json.dumps(result, indent=1))
    (out_dir / "linear.md").write_text(markdown(result))
    if _plot(groups, out_dir / "linear.png"):
        result["plot"] = str(out_dir / "linear.png")
    print(f"\nwrote {out_dir / 'linear.json'}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
