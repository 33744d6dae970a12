"""Per-token log-probabilities and entropies of a language-model head, forward + backward, side by side.

The objective of a policy-gradient step with an entropy bonus, ``-(adv * logp).sum() - 0.01 * H.sum()``,
from the hidden states ``e [N, D]`` and the head ``c [V, D]``:

* ``log_probs``: ``crossent.linear_log_probs(e, c, y, entropy=True)`` (fused, two sweeps of the engine);
* ``ce_none``: ``crossent.linear_cross_entropy(e, c, y, reduction="none", return_stats="entropy")``
  weighted by the advantages: the fused per-token CE on the same engine, the entropy reported without
  gradient (the reference cost of a per-token fused call);
* ``naive``: ``log_softmax(e @ c.T)``, a gather and the entropy on the materialised float32 logits;
* ``trl``: TRL's fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``, what
  ``trl.trainer.utils.add_fused_lm_head`` calls), outputs ``("log_probs", "entropy")``.

Each (method, dtype) runs in a fresh process: every import and input first, then the peak-RSS mark is
reset (``echo 5 > /proc/self/clear_refs``) and one step runs; "peak MiB" is the growth of VmHWM over the
RSS before it, less the gradients of ``e`` and ``c``. Then ``--repeats`` timed steps (median).

    python benchmarks/bench_token_stats.py                               # N=4096, D=1024, V=151936
    python benchmarks/bench_token_stats.py --shape 512 256 32000 --repeats 2
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
METHODS = ("log_probs", "ce_none", "naive", "trl")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import crossent as xe
    from crossent_harness.bench.rss import reset_peak, status_kib

    if spec["method"] == "trl":
        from trl.kernels import ChunkedLogProbFunction

    n, d, v = spec["shape"]
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(0)
    e = (torch.randn(n, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    c = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)

    def objective():
        method = spec["method"]
        if method == "log_probs":
            out = xe.linear_log_probs(e, c, y, entropy=True)
            return (adv * out.logp).sum() + 0.01 * out.entropy.sum()
        if method == "ce_none":
            ce, stats = xe.linear_cross_entropy(e, c, y, reduction="none", return_stats="entropy")
            return -(adv * ce).sum() + 0.01 * stats.entropy.sum().detach()
        if method == "naive":
            logp_all = torch.log_softmax((e @ c.T).float(), dim=-1)
            logp = logp_all.gather(1, y[:, None])[:, 0]
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            return (adv * logp).sum() + 0.01 * entropy.sum()
        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            e, c, None, y, 1.0, 32768, None, 1.0, ("log_probs", "entropy")
        )  # the chunk size TRL's fused head uses
        return (adv * logp.float()).sum() + 0.01 * entropy.float().sum()

    def step():
        e.grad = c.grad = None
        value = -objective()
        value.backward()
        return float(value.detach())

    reset_peak()
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    value = step()
    first = time.perf_counter() - t0
    peak = (status_kib("VmHWM") - rss0) * 1024 - (e.numel() + c.numel()) * e.element_size()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times) if times else first, "first": first, "peak_mib": peak / 2**20,
            "value": value}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 1024, 151936], metavar=("N", "D", "V"))
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    n, d, v = args.shape
    print(f"N={n}, D={d}, V={v}; float32 logits {n * v * 4 / 2**20:.0f} MiB; {args.repeats} timed step(s)")
    print("| dtype | method | median s | peak MiB | time / ce_none | peak / ce_none | peak / naive | objective |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        results = {}
        for method in args.methods:
            spec = dict(shape=args.shape, dtype=dtype, method=method, repeats=args.repeats)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                 text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
            if out.returncode != 0:
                print(f"| {dtype} | {method} | failed: {out.stderr.strip().splitlines()[-1]} | | | | | |", flush=True)
                continue
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base, naive = results.get("ce_none"), results.get("naive")
        for method, r in results.items():
            t_ratio = f"{r['median'] / base['median']:.2f}" if base else ""
            m_ratio = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else ""
            n_ratio = f"{r['peak_mib'] / naive['peak_mib']:.2f}" if naive else ""
            print(f"| {dtype} | {method} | {r['median']:.2f} | {r['peak_mib']:.0f} | {t_ratio} | {m_ratio} | {n_ratio} "
                  f"| {r['value']:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
