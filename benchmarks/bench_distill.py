"""Knowledge distillation at a large vocabulary: ``crossent.linear_distillation`` against the dense forms.

Each (method, divergence) runs in a fresh process: inputs are made and everything is imported first
(``torch._dynamo`` included), the peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``) and one
forward + backward step runs: "peak MiB" is the growth of VmHWM over the RSS before it, less the
student's gradients (every method returns the same ones). The timed steps follow ("median s", over
every process). The peak varies from process to process (glibc keeps some freed row-block temporaries
of the dense forms in its heap, more in some runs than in others): the table gives its range.
Methods:

* ``fused``: ``xe.linear_distillation(e_s, c_s, e_t, c_t)``, no ``[N, V]`` matrix;
* ``dense``: ``xe.distillation(e_s @ c_s.T, e_t @ c_t.T)`` on materialised logits (teacher under no_grad);
* ``naive``: the same logits and the divergence written with ``log_softmax`` and plain autograd.

    python benchmarks/bench_distill.py                                  # N=1024, D=256, D_t=384, V=131072
    python benchmarks/bench_distill.py --shape 2048 1024 1024 131072 --divergences kl jsd akl --processes 1
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


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


def worker(spec: dict) -> dict:
    import torch
    import torch._dynamo  # noqa: F401 - imported before the measurement (crossent imports it lazily)

    import crossent as xe

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n, d, dt, v = spec["shape"]
    teacher_dtype = getattr(torch, spec["teacher_dtype"])
    g = torch.Generator().manual_seed(0)
    e_s = torch.randn(n, d, generator=g).requires_grad_()
    c_s = (torch.randn(v, d, generator=g) * d**-0.5).requires_grad_()
    e_t = torch.randn(n, dt, generator=g).to(teacher_dtype)
    c_t = (torch.randn(v, dt, generator=g) * 1.5 * dt**-0.5).to(teacher_dtype)
    method, divergence = spec["method"], spec["divergence"]

    def step():
        e_s.grad = c_s.grad = None
        if method == "fused":
            loss = xe.linear_distillation(e_s, c_s, e_t, c_t, divergence=divergence, chunk_size=spec.get("chunk_size"))
        else:
            zs = e_s @ c_s.T
            with torch.no_grad():
                zt = (e_t @ c_t.T).float()
            loss = xe.distillation(zs, zt, divergence=divergence) if method == "dense" else _naive(zs, zt, divergence)
        loss.backward()
        return float(loss.detach())

    # Memory: the first step after the reset mark (a warm-up step first would leave the process's RSS
    # at a level that varies from run to run). Time: the steps after it.
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kib("VmRSS")
    loss = step()
    grads = (e_s.numel() + c_s.numel()) * 4
    peak = (_status_kib("VmHWM") - rss0) * 1024 - grads
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "median": statistics.median(times), "peak_mib": peak / 2**20, "loss": loss,
            "threads": torch.get_num_threads(), "rss0_mib": rss0 / 1024}  # fmt: skip


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[1024, 256, 384, 131072], metavar=("N", "D", "D_T", "V"))
    parser.add_argument("--divergences", nargs="+", default=["kl", "jsd"])
    parser.add_argument("--methods", nargs="+", default=["fused", "dense", "naive"])
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    rows = []
    n, d, dt, v = args.shape
    print(f"N={n} D={d} D_t={dt} V={v}, student float32, teacher {args.teacher_dtype}; "
          f"{args.processes} processes x {args.repeats} timed steps")  # fmt: skip
    print("| divergence | method | median s | peak MiB (min - max) | loss |")
    print("|---|---|---:|---:|---:|")
    for divergence in args.divergences:
        for method in args.methods:
            if method == "naive" and divergence not in ("kl", "jsd"):
                continue
            spec = dict(shape=args.shape, method=method, divergence=divergence, repeats=args.repeats,
                        teacher_dtype=args.teacher_dtype, chunk_size=args.chunk_size, threads=args.threads)  # fmt: skip
            runs = []
            for _ in range(args.processes):
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                     text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
                if out.returncode != 0:
                    print(f"| {divergence} | {method} | failed: {out.stderr.strip().splitlines()[-1]} | | |", flush=True)
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            times = [t for r in runs for t in r["times"]]
            peaks = [r["peak_mib"] for r in runs]
            rows.append({**spec, "runs": runs})
            print(f"| {divergence} | {method} | {statistics.median(times):.2f} | {min(peaks):.0f} - {max(peaks):.0f} "
                  f"| {runs[0]['loss']:.6f} |", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
