"""A compiled training step of a small Llama-shaped transformers model with a 128K vocabulary: stock
against patched, both under ``torch.compile(model, fullgraph=True)``.

Methods, each in a fresh process (imports and model first, then the measured steps):

* ``stock``: the transformers model as it is, compiled (``[B, T, V]`` logits, ``ForCausalLMLoss``);
* ``crossent``: patched by ``crossent.integrations.transformers.apply(model)``, then compiled;
* ``stock_eager``, ``crossent_eager``: the same models uncompiled, for reference.

A step is forward and backward (no optimizer), gradients set to ``None`` before it. The first step
compiles (with inductor's caches off): its time is reported apart ("first step s"), with the number
of graphs compiled over all the steps (``torch._dynamo`` counts each graph it compiles; a model that
recompiles shows more than one).
Every timed step feeds new tokens of the same shape. Memory on CPU: the peak resident set (``VmHWM``)
of the timed steps after ``echo 5 > /proc/self/clear_refs`` resets the mark, as ``bench_hf.py``
reports it; on CUDA ``torch.cuda.max_memory_allocated`` after a reset.

    python benchmarks/bench_hf_compile.py                          # CPU, inductor
    python benchmarks/bench_hf_compile.py --backend aot_eager      # CPU, no code generation
    python benchmarks/bench_hf_compile.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("stock", "crossent", "stock_eager", "crossent_eager")


def worker(spec: dict) -> dict:
    import torch
    import torch._dynamo

    import crossent.integrations.transformers as xt
    from crossent_harness.bench.rss import reset_peak, status_kib

    from _tiny_llama import tiny_llama

    model = tiny_llama(spec)
    device = torch.device(spec["device"])
    method = spec["method"]
    if method.startswith("crossent"):
        xt.apply(model)
    compiled = not method.endswith("_eager")
    run = torch.compile(model, backend=spec["backend"], fullgraph=True) if compiled else model
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g).to(device)
        for _ in range(spec["repeats"] + 1)
    ]

    def step(ids):
        model.zero_grad(set_to_none=True)
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.loss.item()

    start = time.perf_counter()
    loss = step(batches[0])  # compiles (or warms up)
    first = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = status_kib("VmRSS") * 1024
        reset_peak()
    times = []
    for ids in batches[1:]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return dict(method=method, loss=loss, first_s=first, graphs=graphs, peak_mib=peak / 2**20,
                growth_mib=(peak - before) / 2**20, median_s=statistics.median(times), times=times)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    keys = ("device", "dtype", "backend", "vocab", "hidden", "layers", "seq", "batch", "repeats", "threads")
    spec = {k: getattr(args, k) for k in keys}
    print(f"# {json.dumps(spec)}; load average {os.getloadavg()[0]:.1f}")
    print("| method | loss | graphs | first step s | median step s | peak MiB | growth MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        # Inductor's caches off: the first step's time is a whole compilation, whatever ran before.
        env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
        run = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "method": method})],
                             capture_output=True, text=True, check=False, env=env)  # fmt: skip
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {method} | fails: {reason[:160]} | | | | | |", flush=True)
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        graphs = r["graphs"] if not method.endswith("_eager") else "-"
        print(f"| {method} | {r['loss']:.4f} | {graphs} | {r['first_s']:.2f} | {r['median_s']:.3f} | "
              f"{r['peak_mib']:.0f} | {r['growth_mib']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
