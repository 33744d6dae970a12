"""Non-CE losses against CE in ``crossent.linear_cross_entropy``: forward + backward time, side by side.

The losses share their matrix products and differ only in the per-chunk work, a few percent of the
step, which is below the spread between fresh processes on a shared or virtualised machine. So this
benchmark runs them in one process, alternating within each repeat, and reports each loss's median
and its ratio to CE's median (memory is measured by ``bench_linear.py``). Beside the wall-clock time it
reports the process's CPU time per step: while other processes compete for the cores, wall time grows
with the waiting but CPU time does not, so on a busy machine the CPU-time ratio is the one to read.

    python benchmarks/bench_linear_losses.py                           # N=4096, D=1024, V=32768, float32
    python benchmarks/bench_linear_losses.py --shape 4096 1024 131072 --repeats 3
    python benchmarks/bench_linear_losses.py --shape 1024 256 32768 --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import crossent as xe
from crossent_harness.bench.linear import loss_kwargs

LOSSES = {"label_smoothing" if name == "smooth" else name: kw for name, kw in loss_kwargs().items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 1024, 32768], metavar=("N", "D", "V"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, d, v = args.shape
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)

    def step(kw):
        e.grad = c.grad = None
        start, cpu = time.perf_counter(), time.process_time()
        xe.linear_cross_entropy(e, c, t, **kw).backward()
        return time.perf_counter() - start, time.process_time() - cpu

    for kw in LOSSES.values():  # warm-up
        step(kw)
    times = {name: [] for name in LOSSES}
    cpu_times = {name: [] for name in LOSSES}
    for k in range(args.repeats):
        names = list(LOSSES)[k % len(LOSSES) :] + list(LOSSES)[: k % len(LOSSES)]
        for name in names:
            wall, cpu = step(LOSSES[name])
            times[name].append(wall)
            cpu_times[name].append(cpu)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_medians = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    print(f"N={n} D={d} V={v} {args.dtype}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'loss':<16} {'median s':>9} {'x ce':>6} {'CPU s':>9} {'x ce':>6}")
    for name, m in medians.items():
        cm = cpu_medians[name]
        print(f"{name:<16} {m:>9.3f} {m / medians['ce']:>6.3f} {cm:>9.3f} {cm / cpu_medians['ce']:>6.3f}")
    return {"medians": medians, "times": times, "cpu_medians": cpu_medians, "cpu_times": cpu_times}


if __name__ == "__main__":
    main()
