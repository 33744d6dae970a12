"""Speed and memory of fused linear cross-entropy: crossent against the naive path and its peers.

Every configuration runs in a fresh process and reports the median of repeated forward + backward
timings, their range (fastest to slowest: the noise of the measurement), and the most memory the step held at once beyond the inputs and gradients: on CPU the exact
replay of the allocation events that PyTorch's allocator reports to its profiler
(:func:`crossent_harness.bench.memory.allocator_peak`; fused operators and compiled code included), on CUDA
the allocator's statistics. The growth of the peak RSS is a secondary column; it is never negative,
but the allocator's reuse of freed memory can hide a step's memory from it. Methods:

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

Ratios: time to the floor, to the fastest peer (any non-crossent method but the floors) and, for
crossent's losses, to crossent's CE; memory to the naive path and to that fastest peer. A ratio whose
reference is missing or zero is left out, never printed as 0 or infinity. A time ratio between two
methods whose ranges of timings overlap is printed ``~1.0``: within the noise, neither is ranked
faster. ``cpu share`` is the smallest
share of its threads' time a configuration got on the CPUs: well below 1, another process competed and
its timing is suspect (``--quiet-wait`` makes each configuration wait for idle CPUs first).

The default (the ``make demo`` run) is one shape with a realistic vocabulary, QUICK_SHAPES, in well
under a minute; ``--full`` runs the recorded shapes (N=4096, D=1024, V in {32768, 131072}, float32,
plus bfloat16 at V=131072), tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from crossent.losses import Loss
from crossent.stats import LSE, TARGET

from ..argtypes import finite_float
from ..records import provenance, strict_json
from ..text import MAX_WIDTH, HelpFormatter, width

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
# floor_t differs from floor only for half precision, which the quick shape does not use
QUICK_METHODS = ("floor", "naive", "torch_lce_512", "crossent_ce", "crossent_focal", "crossent_z_loss")
FLOORS = ("floor", "floor_t")
PEERS = ("naive", "naive_compile", "torch_lce", "torch_lce_auto", "torch_lce_512", "cce_compile")
# A language model's vocabulary (32768 entries, Mistral 7B's); N and D small enough for under a minute.
QUICK_SHAPES = ((1024, 256, 32768, "float32"),)
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


DTYPES = ("float32", "bfloat16", "float16")


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first option that cannot run (before any configuration starts)."""
    for shape in args.shape or ():
        n, d, v, dtype = shape
        for name, value in zip("NDV", (n, d, v)):
            if not (value.isdigit() and int(value) > 0):
                raise ValueError(f"--shape: {name} must be an integer >= 1, got {value!r}")
        if dtype not in DTYPES:
            raise ValueError(f"--shape: DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
    checks = (
        ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--rounds", args.rounds, 1),
        ("--chunk-size", args.chunk_size, 1), ("--threads", args.threads, 1),
    )
    for flag, value, low in checks:
        if value is not None and value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout: must be > 0, got {args.timeout:g}")
    if args.quiet_wait < 0:
        raise ValueError(f"--quiet-wait: must be >= 0, got {args.quiet_wait:g}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device: must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: CUDA is not available on this machine")
    out = Path(args.out)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out: {parent} exists and is not a folder")
            break


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmark (shared by ``benchmarks/bench_linear.py`` and ``crossent bench``)."""
    quick = ", ".join(f"N={n} D={d} V={v} {t}" for n, d, v, t in QUICK_SHAPES)
    parser.add_argument("--full", action="store_true", help="the recorded shapes and every method (tens of minutes)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                        help=f"methods to run, of {', '.join(METHODS)} (default: {' '.join(QUICK_METHODS)}; "
                        "every method with --full)")  # fmt: skip
    parser.add_argument("--shape", nargs=4, action="append", metavar=("N", "D", "V", "DTYPE"),
                        help=f"a shape to run instead of the defaults (repeatable), e.g. --shape 4096 1024 32768 "
                        f"float32 (default: {quick})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per configuration (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first; compilation happens here (default: 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, round-robin, each in a fresh process; the median "
                        "is over all rounds' timings, robust to load that changes during the run (default: 1)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=None, help="crossent chunk_size (default: its own)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per run (default: torch's)")
    parser.add_argument("--timeout", type=finite_float, default=1800.0,
                        help="seconds before one configuration is abandoned (default: 1800)")
    parser.add_argument("--quiet-wait", type=finite_float, default=0.0, metavar="SECONDS",
                        help="before each configuration, wait up to this long for other processes to leave the "
                        "CPUs idle (shared machines); 0: do not wait (default: 0)")  # fmt: skip
    parser.add_argument("--out", default="results/bench_linear",
                        help="folder for linear.json, linear.md, linear.png (default: results/bench_linear)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the options, say what would run, and stop (default: off)")


def _selection(args: argparse.Namespace) -> tuple[tuple, list]:
    """The methods and the shapes ``(n, d, v, dtype)`` that ``args`` select."""
    full = getattr(args, "full", False)
    methods = args.methods or (METHODS if full else QUICK_METHODS)
    if args.shape:
        return methods, [(int(n), int(d), int(v), dt) for n, d, v, dt in args.shape]
    return methods, list(FULL_SHAPES if full else QUICK_SHAPES)


def plan(args: argparse.Namespace) -> str:
    """What :func:`run` would do with ``args`` (``--dry-run``), as text for a terminal."""
    methods, shapes = _selection(args)
    configs = sum(len([m for m in methods if dtype in ("bfloat16", "float16") or m not in HALF_ONLY])
                  for *_, dtype in shapes)
    rounds = max(1, getattr(args, "rounds", 1))
    text = (f"dry run: the options are valid. Would run {configs * rounds} fresh processes ({configs} configurations "
            f"x {rounds} round{'s' * (rounds != 1)}), each {args.warmup} warm-up and {args.repeats} timed steps, at "
            + "; ".join(f"N={n} D={d} V={v} {dt}" for n, d, v, dt in shapes) + f", into {args.out}.")
    return textwrap.fill(text, width(), break_on_hyphens=False)


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
    # the worker imports this harness and this crossent, from wherever each of them was loaded
    roots = dict.fromkeys(str(Path(f).resolve().parents[n]) for f, n in ((__file__, 2), (crossent.__file__, 1)))
    env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "crossent_harness.bench._linear_worker", strict_json(spec)]
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
    """One row per method: the median and the range of every timing of every round, the largest memory peak."""
    ok = [r for r in runs if "median" in r]
    if not ok:
        return {"method": method, "error": runs[0].get("error", "no run") if runs else "no run"}
    times = sorted(t for r in ok for t in r["times"])
    out = {"method": method, "times": times, "median": times[len(times) // 2], "min": times[0], "max": times[-1],
           "rounds": len(ok), "loss": ok[0].get("loss")}
    shares = [r["cpu_share"] for r in ok if "cpu_share" in r]
    if shares:
        out["cpu_share"] = min(shares)
    for key in ("peak_live_bytes", "rss_growth"):
        values = [r[key] for r in ok if key in r]
        if values:
            out[key] = max(values)
    for key in ("grad_bytes", "memory_source", "memory_error"):
        if key in ok[0]:
            out[key] = ok[0][key]
    if "peak_live_bytes" in out:
        # the gradients are alive at the end of every step, so the peak is never below them
        out["peak_bytes"] = max(0, out["peak_live_bytes"] - out.get("grad_bytes", 0))
    return out


def _ratio(value: float | None, ref: float | None) -> float | None:
    """``value / ref`` when both are known and ``ref`` is positive; otherwise no ratio at all."""
    if value is None or ref is None or not ref > 0:
        return None
    return value / ref


def within_noise(a: dict, b: dict) -> bool:
    """Whether two methods' timings cannot be ranked: their ranges (fastest to slowest) overlap.

    >>> within_noise({"min": 1.0, "max": 1.2}, {"min": 1.1, "max": 1.3})
    True
    >>> within_noise({"min": 1.0, "max": 1.05}, {"min": 1.1, "max": 1.3})
    False
    """
    return a["min"] <= b["max"] and b["min"] <= a["max"]


#: the time ratios, each with the method it is taken against
TIME_RATIOS = ("x_floor", "x_best_peer", "x_ce")


def _ratios(rows: list[dict]) -> None:
    """Add every ratio to ``rows``, and ``noise``: the time ratios whose two methods are within the noise."""
    ok = {r["method"]: r for r in rows if "median" in r}
    floors = [r for m, r in ok.items() if m in FLOORS]
    floor = min(floors, key=lambda r: r["median"]) if floors else None
    peers = [r for m, r in ok.items() if m in PEERS]
    best = min(peers, key=lambda r: r["median"]) if peers else None
    naive, ce = ok.get("naive"), ok.get("crossent_ce")
    for r in ok.values():
        ratios = {
            "x_floor": _ratio(r["median"], floor and floor["median"]),
            "x_best_peer": _ratio(r["median"], best and best["median"]),
            "x_ce": _ratio(r["median"], ce and ce["median"]) if r["method"].startswith("crossent") else None,
            "mem_x_naive": _ratio(r.get("peak_bytes"), naive and naive.get("peak_bytes")),
            "mem_x_best_peer": _ratio(r.get("peak_bytes"), best and best.get("peak_bytes")),
        }
        r.update({k: v for k, v in ratios.items() if v is not None})
        against = {"x_floor": floor, "x_best_peer": best, "x_ce": ce}
        # a method against itself is exactly 1; against another, overlapping timings rank nothing
        r["noise"] = [k for k in TIME_RATIOS if k in r and against[k] is not r and "min" in r
                      and "min" in against[k] and within_noise(r, against[k])]
        if best:
            r["best_peer"] = best["method"]


#: (key, column title, format, scale) of the printed and Markdown tables
COLUMNS = (
    ("median", "median s", ".3f", 1),
    ("range", "min-max s", ".3f", 1),
    ("x_floor", "x floor", ".2f", 1),
    ("x_best_peer", "x peer", ".2f", 1),
    ("x_ce", "x ce", ".2f", 1),
    ("peak_bytes", "peak MiB", ".0f", 2**-20),
    ("mem_x_naive", "mem/naive", ".3f", 1),
    ("mem_x_best_peer", "mem/peer", ".3f", 1),
    ("rss_growth", "RSS MiB", ".0f", 2**-20),
    ("cpu_share", "cpu", ".2f", 1),
)


#: how a time ratio within the noise is printed
WITHIN_NOISE = "~1.0"


def _cell(r: dict, key: str, spec: str, scale: float) -> str:
    if key == "range":
        return f"{r['min']:{spec}}-{r['max']:{spec}}" if "min" in r else "-"
    if key in r.get("noise", ()):
        return WITHIN_NOISE
    return format(r[key] * scale, spec) if key in r else "-"


def noise_note(rows: list[dict]) -> str:
    """What the spread of the timings says about the ratios of a table (one paragraph, or "")."""
    notes = []
    if any(r.get("noise") for r in rows):
        notes.append(f"{WITHIN_NOISE}: the two methods' ranges of timings (min-max s) overlap; the difference is "
                     "within the noise of this measurement, and neither is ranked faster.")
    if any(len(r.get("times", ())) == 1 for r in rows):
        notes.append("One timing per method measures no spread: run --repeats 3 or more before ranking methods.")
    return " ".join(notes)


def _table(rows: list[dict]) -> str:
    cells = {id(r): [_cell(r, k, f, s) for k, _, f, s in COLUMNS] for r in rows if "error" not in r}
    widths = [max(len(title) + 1, 9, *(len(c[i]) + 2 for c in cells.values())) for i, (_, title, _, _) in enumerate(COLUMNS)]
    head = f"{'method':<24}" + "".join(f"{t:>{w}}" for (_, t, _, _), w in zip(COLUMNS, widths)) + "  loss"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['method']:<24}  skipped: {r['error']}")
            continue
        line = "".join(f"{c:>{w}}" for c, w in zip(cells[id(r)], widths))
        loss = "-" if r.get("loss") is None else format(r["loss"], ".6f")
        out.append(f"{r['method']:<24}{line}  {loss}")
    notes = sorted({f"{r['method']}: {r['memory_error']}" for r in rows if "memory_error" in r})
    out += [f"  memory not measured, {n}" for n in notes]
    noise = noise_note(rows)
    return "\n".join(out + ([textwrap.fill(noise, MAX_WIDTH, initial_indent="  ", subsequent_indent="  ")] if noise else []))


MEMORY_NOTE = (
    "peak MiB: the most memory the step held at once beyond the inputs and the gradients (exact: the "
    "CPU allocator's events, or the CUDA allocator's statistics); RSS MiB: growth of the process's peak "
    "resident set over the timed steps (secondary: the allocator reuses freed memory)."
)


def markdown(result: dict) -> str:
    """The results as Markdown tables, one per shape (for BENCHMARKS.md)."""
    out = []
    groups: dict = {}
    for r in result["results"]:
        groups.setdefault((r["n"], r["d"], r["v"], r["dtype"]), []).append(r)
    titles = [t for _, t, _, _ in COLUMNS]
    for (n, d, v, dtype), rows in groups.items():
        out += [f"N={n}, D={d}, V={v}, {dtype}", "", "| method | " + " | ".join(titles) + " |",
                "|---|" + "---:|" * len(titles)]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['method']} | skipped: {r['error']} |" + " |" * (len(titles) - 1))
                continue
            cells = [_cell(r, k, f, s) for k, _, f, s in COLUMNS]
            out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        best = next((r["best_peer"] for r in rows if "best_peer" in r), None)
        notes = " ".join(filter(None, [f"Fastest peer: `{best}`." if best else "", noise_note(rows), MEMORY_NOTE]))
        out += ["", notes, ""]
    return "\n".join(out)


GROUP_COLORS = {"crossent": "tab:green", "peer": "tab:blue", "floor": "tab:gray"}


def _group(method: str) -> str:
    return "crossent" if method.startswith("crossent") else "floor" if method in FLOORS else "peer"


def _plot(groups: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 0.5 + 3.2 * len(groups)), squeeze=False)
    for (title, rows), (ax_t, ax_m) in zip(groups.items(), axes):
        ok = [r for r in rows if "median" in r]
        names = [r["method"] for r in ok]
        colors = [GROUP_COLORS[_group(n)] for n in names]
        spread = [[r["median"] - r.get("min", r["median"]) for r in ok], [r.get("max", r["median"]) - r["median"] for r in ok]]
        bars = ax_t.barh(names, [r["median"] for r in ok], color=colors, xerr=spread, error_kw={"lw": 0.8, "capsize": 2})
        ax_t.bar_label(bars, labels=[f"{r['median']:.3g}" for r in ok], fontsize=7, padding=2)
        ax_t.set_xlabel("forward + backward, median seconds (bars: fastest to slowest timing)")
        ax_t.set_title(f"time, {title}", fontsize=9)
        ax_t.invert_yaxis()
        mem = [r.get("peak_bytes") for r in ok]
        bars = ax_m.barh(names, [0 if m is None else m / 2**20 for m in mem], color=colors)
        ax_m.bar_label(bars, labels=["not measured" if m is None else f"{m / 2**20:.3g}" for m in mem], fontsize=7,
                       padding=2)
        ax_m.set_xlabel("peak MiB allocated beyond inputs and gradients")
        ax_m.set_title(f"memory, {title}", fontsize=9)
        ax_m.invert_yaxis()
        for ax in (ax_t, ax_m):
            ax.margins(x=0.15)
    legend = [Patch(color=GROUP_COLORS[g], label=label) for g, label in
              (("crossent", "crossent"), ("peer", "other implementations"), ("floor", "matrix products alone"))]
    fig.legend(handles=legend, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (0.5 + 3.2 * len(groups))))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table per shape, write ``linear.json``, ``linear.md`` (and ``linear.png``)
    to ``args.out``; return the results (``{"meta": ..., "results": [...]}``)."""
    methods, shapes = _selection(args)
    threads = args.threads or torch.get_num_threads()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        **provenance(threads),
        "machine": platform.machine(),
        "device": args.device,
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    groups: dict[str, list[dict]] = {}
    for n, d, v, dtype in shapes:
        title = f"N={n} D={d} V={v} {dtype} ({args.device}, {threads} thread{'s' * (threads != 1)})"
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
                status = (f"{res['median']:.3f} s ({min(res['times']):.3f}-{max(res['times']):.3f}, "
                          f"{len(res['times'])} timings)" if "median" in res else res["error"])
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
    (out_dir / "linear.json").write_text(strict_json(result, indent=1))
    (out_dir / "linear.md").write_text(markdown(result))
    if _plot(groups, out_dir / "linear.png"):
        result["plot"] = str(out_dir / "linear.png")
    print(f"\nwrote {out_dir / 'linear.json'}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(plan(args))
        return {}
    return run(args)


if __name__ == "__main__":
    main()
