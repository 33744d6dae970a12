"""Two source trees of crossent in one process, step for step: did a change make the hot paths slower?

A baseline tree (e.g. ``git archive <commit> src | tar -x -C /some/dir``) is loaded as the package
``crossent_baseline`` next to this tree's ``crossent``; every case then alternates one baseline step and
one new step (each side first in every other pair), ``--repeats`` times, so load from other processes
affects both alike. Reported: the median of each side and their ratio (new / baseline). Cases: the
dense forward + backward of ``benchmarks/bench_dense.py`` (CE, ``N = 8192``, ``C`` in {1000, 32000},
float32) and the fused one of ``benchmarks/bench_linear.py`` (``N, D, V = 4096, 1024, 32768``,
float32, or ``--fused-shape``: CE, z-loss 1e-4, label smoothing 0.1) with the three-matrix-product
floor for scale; ``--skip-dense`` / ``--skip-fused`` leave either group out.

    python benchmarks/bench_ab.py --baseline /path/to/old/src --repeats 9
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def load_tree(src: Path, name: str):
    """The package ``src/crossent`` imported under ``name`` (its imports are relative)."""
    init = src / "crossent" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dense_step(xe, logits, target, kwargs):
    x = logits.detach().requires_grad_()
    start = time.perf_counter()
    xe.cross_entropy(x, target, **kwargs).backward()
    return time.perf_counter() - start


def fused_step(xe, e, c, target, kwargs):
    e, c = e.detach().requires_grad_(), c.detach().requires_grad_()
    start = time.perf_counter()
    xe.linear_cross_entropy(e, c, target, **kwargs).backward()
    return time.perf_counter() - start


def floor_step(e, c):
    start = time.perf_counter()
    z = e @ c.T
    z @ c, z.T @ e
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the baseline tree's src folder (holding crossent/)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-fused", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--fused-shape", nargs=3, type=int, default=(4096, 1024, 32768), metavar=("N", "D", "V"))
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent / "src"
    sys.path.insert(0, str(here))
    new = load_tree(here, "crossent")
    old = load_tree(Path(args.baseline).resolve(), "crossent_baseline")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    g = torch.Generator().manual_seed(0)
    cases = []
    for c in () if args.skip_dense else (1000, 32000):
        logits, target = torch.randn(8192, c, generator=g), torch.randint(0, c, (8192,), generator=g)
        cases.append((f"dense ce N=8192 C={c}", lambda xe, a=logits, b=target: dense_step(xe, a, b, {})))
    if not args.skip_fused:
        n, d, v = args.fused_shape
        shape = f"{n}x{d}x{v}"
        e = torch.randn(n, d, generator=g) / d**0.5
        w = torch.randn(v, d, generator=g) / d**0.5
        y = torch.randint(0, v, (n,), generator=g)
        for label, kw in (("ce", {}), ("z_loss", {"z_loss": 1e-4}), ("smooth", {"label_smoothing": 0.1})):
            cases.append((f"fused {label} {shape}", lambda xe, kw=kw: fused_step(xe, e, w, y, kw)))
        cases.append((f"floor (3 products) {shape}", lambda xe: floor_step(e, w)))
    print(f"{'case':<36} {'baseline s':>10} {'new s':>8} {'new/baseline':>12} "
          f"{'baseline range s':>17} {'new range s':>17}")  # fmt: skip
    results = []
    for label, step in cases:
        step(old), step(new)  # warm-up
        a, b = [], []
        for k in range(args.repeats):  # each side goes first in every other pair
            if k % 2:
                b.append(step(new))
                a.append(step(old))
            else:
                a.append(step(old))
                b.append(step(new))
        row = {"case": label, "baseline_s": statistics.median(a), "new_s": statistics.median(b)}
        row["ratio"] = row["new_s"] / row["baseline_s"]
        row["baseline_range_s"], row["new_range_s"] = (min(a), max(a)), (min(b), max(b))
        results.append(row)
        spread = [f"{lo:.4f}-{hi:.4f}" for lo, hi in (row["baseline_range_s"], row["new_range_s"])]
        print(f"{label:<36} {row['baseline_s']:>10.4f} {row['new_s']:>8.4f} {row['ratio']:>12.3f} "
              f"{spread[0]:>17} {spread[1]:>17}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
