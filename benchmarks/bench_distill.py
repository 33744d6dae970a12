"""Knowledge distillation at a large vocabulary: ``crossent.linear_distillation`` against the dense forms.

Methods (student float32; teacher float32 or bfloat16, under no_grad):

* ``fused``: ``xe.linear_distillation(e_s, c_s, e_t, c_t)``, no ``[N, V]`` matrix;
* ``dense``: ``xe.distillation(e_s @ c_s.T, e_t @ c_t.T)`` on materialised logits;
* ``naive``: the same logits and the divergence written with ``log_softmax`` and plain autograd.

Memory: each (divergence, method) runs in ``--processes`` fresh processes; inputs are made and
everything is imported first (``torch._dynamo`` included), the peak-RSS mark is reset
(``echo 5 > /proc/self/clear_refs``) and one forward + backward step runs. "peak MiB" is the growth
of VmHWM over the RSS before the step, less the student's gradients (every method returns the same
ones); it varies between processes (glibc keeps more or fewer freed row-block temporaries of the
dense forms), so the table gives its range. A warm-up step before the mark would leave the RSS at a
level that varies from run to run, which is why the first step is the measured one.

Time: one process runs every (divergence, method) once per round, each round starting one
configuration later, after a warm-up round; "median s" is over the rounds and "x naive" is the ratio
of medians. Alternating in one process keeps the comparison fair on a machine whose load changes.

    python benchmarks/bench_distill.py                                  # N=1024, D=256, D_t=384, V=131072
    python benchmarks/bench_distill.py --shape 2048 1024 1024 131072 --divergences kl jsd akl --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _naive(zs, zt, divergence: str, beta: float = 0.5):
    import torch
    import torch.nn.functional as F

    log_p, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    if divergence == "kl":
        return F.kl_div(log_p, log_pt, log_target=True, reduction="batchmean")
    if divergence == "jsd":
        log_m = torch.logaddexp(log_pt + math.log(beta), log_p + math.log1p(-beta))
        kl_t = F.kl_div(log_m, log_pt, log_target=True, reduction="batchmean")
        kl_s = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
        return beta * kl_t + (1 - beta) * kl_s
    raise ValueError(f"no naive form of {divergence!r}")


def _inputs(shape, teacher_dtype: str):
    import torch

    n, d, dt, v = shape
    g = torch.Generator().manual_seed(0)
    e_s = torch.randn(n, d, generator=g).requires_grad_()
    c_s = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_()
    e_t = torch.randn(n, dt, generator=g).to(getattr(torch, teacher_dtype))
    c_t = (torch.randn(v, dt, generator=g) * 1.5 * dt**-0.5).to(getattr(torch, teacher_dtype))
    return e_s, c_s, e_t, c_t


def _step(method: str, divergence: str, inputs, chunk_size=None):
    """One forward + backward; returns the loss."""
    import torch

    import crossent as xe

    e_s, c_s, e_t, c_t = inputs
    e_s.grad = c_s.grad = None
    if method == "fused":
        loss = xe.linear_distillation(e_s, c_s, e_t, c_t, divergence=divergence, chunk_size=chunk_size)
    else:
        zs = e_s @ c_s.T
        with torch.no_grad():
            zt = (e_t @ c_t.T).float()
        loss = xe.distillation(zs, zt, divergence=divergence) if method == "dense" else _naive(zs, zt, divergence)
    loss.backward()
    return float(loss.detach())


def memory_worker(spec: dict) -> dict:
    import torch
    import torch._dynamo

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    inputs = _inputs(spec["shape"], spec["teacher_dtype"])
    gc.collect()
    from crossent_harness.bench.rss import reset_peak, status_kib

    reset_peak()
    rss0 = status_kib("VmRSS")
    loss = _step(spec["method"], spec["divergence"], inputs, spec.get("chunk_size"))
    grads = (inputs[0].numel() + inputs[1].numel()) * 4
    return {"peak_mib": ((status_kib("VmHWM") - rss0) * 1024 - grads) / 2**20, "loss": loss}


def timing(configs, args) -> dict:
    import torch
    import torch._dynamo

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = _inputs(args.shape, args.teacher_dtype)
    times = {c: [] for c in configs}
    for r in range(args.rounds + 1):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for divergence, method in order:
            gc.collect()
            t0 = time.perf_counter()
            _step(method, divergence, inputs, args.chunk_size)
            if r:  # round 0 warms up
                times[(divergence, method)].append(time.perf_counter() - t0)
    return {c: statistics.median(ts) for c, ts in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[1024, 256, 384, 131072], metavar=("N", "D", "D_T", "V"))
    parser.add_argument("--divergences", nargs="+", default=["kl", "jsd"])
    parser.add_argument("--methods", nargs="+", default=["fused", "dense", "naive"])
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per configuration (memory)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over every configuration")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return {}
    configs = [(d, m) for d in args.divergences for m in args.methods if not (m == "naive" and d not in ("kl", "jsd"))]
    peaks, losses = {}, {}
    for divergence, method in configs:
        spec = dict(shape=args.shape, method=method, divergence=divergence, teacher_dtype=args.teacher_dtype,
                    chunk_size=args.chunk_size, threads=args.threads)  # fmt: skip
        for _ in range(args.processes):
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                 text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"{divergence} {method}: {out.stderr.strip().splitlines()[-1]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.setdefault((divergence, method), []).append(res["peak_mib"])
            losses[(divergence, method)] = res["loss"]
    medians = timing(configs, args)
    n, d, dt, v = args.shape
    print(f"N={n} D={d} D_t={dt} V={v}, student float32, teacher {args.teacher_dtype}, "
          f"{args.threads or 'default'} threads; memory: {args.processes} processes, time: {args.rounds} rounds")  # fmt: skip
    print("| divergence | method | median s | x naive | peak MiB (min - max) | x naive | loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for divergence, method in configs:
        key, base = (divergence, method), (divergence, "naive")
        p = peaks[key]
        t_ratio = f"{medians[key] / medians[base]:.2f}" if base in medians else "-"
        m_ratio = f"{max(p) / max(peaks[base]):.3f}" if base in peaks else "-"
        print(f"| {divergence} | {method} | {medians[key]:.2f} | {t_ratio} | {min(p):.0f} - {max(p):.0f} | {m_ratio} "
              f"| {losses[key]:.6f} |")  # fmt: skip
    return {"medians": medians, "peaks": peaks, "losses": losses}


if __name__ == "__main__":
    main()
