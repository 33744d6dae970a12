"""One training step of a small Llama-shaped transformers model with a 128K vocabulary: peak memory and time.

Methods, each in a fresh process (imports and model first, then the measured steps):

* ``stock``: the transformers model as it is (``[B, T, V]`` logits, ``ForCausalLMLoss``);
* ``crossent``: patched by ``crossent.integrations.transformers.apply(model)`` (cross-entropy);
* ``crossent_focal``: the same with ``loss="focal"``;
* ``liger``: Liger-Kernel's patch (``apply_liger_kernel_to_llama(model=..., fused_linear_cross_entropy=True)``,
  its other kernels off), where it runs (it needs Triton on a GPU).

A step is forward and backward (no optimizer), gradients set to ``None`` before it. Memory on CPU: the
peak resident set (``VmHWM``) of the timed steps, after ``echo 5 > /proc/self/clear_refs`` resets the
mark; reported as the peak and as its growth over the resident set before the steps. On CUDA:
``torch.cuda.max_memory_allocated`` after a reset, and its growth over the allocated memory before.

    python benchmarks/bench_hf.py                                   # CPU, float32
    python benchmarks/bench_hf.py --device cuda --dtype bfloat16    # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("stock", "crossent", "crossent_focal", "liger")


def worker(spec: dict) -> dict:
    import torch

    import crossent.integrations.transformers as xt
    from crossent_harness.bench.rss import reset_peak, status_kib

    from _tiny_llama import tiny_llama

    model = tiny_llama(spec)
    device = torch.device(spec["device"])
    method = spec["method"]
    if method == "crossent":
        xt.apply(model)
    elif method == "crossent_focal":
        xt.apply(model, loss="focal")
    elif method == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model, fused_linear_cross_entropy=True, cross_entropy=False, rope=False,
                                    rms_norm=False, swiglu=False)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.loss.item()

    loss = step()  # warm-up
    model.zero_grad(set_to_none=True)
    result = {"method": method, "loss": loss}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = status_kib("VmRSS") * 1024
        reset_peak()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
    result.update(
        peak_mib=peak / 2**20, growth_mib=(peak - before) / 2**20, median_s=statistics.median(times), times=times
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    spec = {
        k: getattr(args, k)
        for k in ("device", "dtype", "vocab", "hidden", "layers", "seq", "batch", "repeats", "threads")
    }
    print(f"# {json.dumps(spec)}; load average {os.getloadavg()[0]:.1f}")
    print("| method | loss | peak MiB | growth MiB | median step s |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        run = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "method": method})],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {method} | fails: {reason[:160]} | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {method} | {r['loss']:.4f} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | {r['median_s']:.3f} |")


if __name__ == "__main__":
    main()
