"""Dense path vs torch.nn.functional.cross_entropy: forward + backward time, side by side.

Runs the two implementations alternately (so that machine load affects both alike) and reports the
median of the repeats and their ratio.

    python benchmarks/bench_dense.py                 # N=8192, C in {1000, 32000}, float32
    python benchmarks/bench_dense.py --classes 32000 --dtype bfloat16 --repeats 9
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import crossent as xe


def step(fn, logits, target, kwargs):
    x = logits.detach().requires_grad_()
    start = time.perf_counter()
    fn(x, target, **kwargs).backward()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 32000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    kwargs = {"label_smoothing": args.label_smoothing}
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'N':>6} {'C':>7} {'dtype':>9} {'F.cross_entropy s':>18} {'crossent s':>11} {'ratio':>6}")
    for c in args.classes:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(args.rows, c, generator=g).to(dtype)
        target = torch.randint(0, c, (args.rows,), generator=g)
        for fn in (F.cross_entropy, xe.cross_entropy):  # warm-up
            step(fn, logits, target, kwargs)
        ref, ours = [], []
        for _ in range(args.repeats):
            ref.append(step(F.cross_entropy, logits, target, kwargs))
            ours.append(step(xe.cross_entropy, logits, target, kwargs))
        row = {
            "rows": args.rows,
            "classes": c,
            "dtype": args.dtype,
            "torch_median_s": statistics.median(ref),
            "crossent_median_s": statistics.median(ours),
        }
        row["ratio"] = row["crossent_median_s"] / row["torch_median_s"]
        results.append(row)
        print(
            f"{args.rows:>6} {c:>7} {args.dtype:>9} {row['torch_median_s']:>18.4f} "
            f"{row['crossent_median_s']:>11.4f} {row['ratio']:>6.2f}"
        )
    return results


if __name__ == "__main__":
    main()
