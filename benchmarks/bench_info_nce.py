"""InfoNCE with many negatives: ``crossent.contrastive.info_nce`` against ``F.cross_entropy(q @ k.T / t)``.

Each method runs in a fresh process: inputs first, then the peak-RSS mark is reset
(``echo 5 > /proc/self/clear_refs``) and one forward + backward step runs; "peak MiB" is the growth of
VmHWM over the RSS before it, less the gradients of ``q`` and ``k``. Then ``--repeats`` timed steps.

    python benchmarks/bench_info_nce.py                       # 4096 queries, 65536 keys, D = 128
    python benchmarks/bench_info_nce.py --shape 8192 131072 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(spec: dict) -> dict:
    import torch
    import torch._dynamo
    import torch.nn.functional as F

    import crossent as xe

    n, m, d = spec["shape"]
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(m, d, generator=g), dim=1).requires_grad_()
    positive = torch.arange(n)

    def step():
        q.grad = k.grad = None
        if spec["method"] == "fused":
            loss = xe.contrastive.info_nce(q, k, temperature=0.05)
        else:
            loss = F.cross_entropy(q @ k.T / 0.05, positive)
        loss.backward()
        return float(loss.detach())

    from crossent_harness.bench.rss import reset_peak, status_kib

    reset_peak()
    rss0 = status_kib("VmRSS")
    loss = step()
    peak = (status_kib("VmHWM") - rss0) * 1024 - (q.numel() + k.numel()) * 4
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "peak_mib": peak / 2**20, "loss": loss}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 65536, 128], metavar=("QUERIES", "KEYS", "D"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    n, m, d = args.shape
    print(f"{n} queries, {m} keys, D={d}, float32; similarity matrix {n * m * 4 / 2**20:.0f} MiB")
    print("| method | median s | peak MiB | loss |")
    print("|---|---:|---:|---:|")
    for method in ("fused", "naive"):
        spec = dict(shape=args.shape, method=method, repeats=args.repeats)
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
        if out.returncode != 0:
            print(f"| {method} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {method} | {res['median']:.2f} | {res['peak_mib']:.0f} | {res['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
