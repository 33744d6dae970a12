"""A GRPO step and a DPO step at a large vocabulary: the fused objectives against fused CE, naive logits and
Liger-Kernel's chunked losses, forward + backward, time and peak memory side by side.

Methods, for each objective (``grpo``: ``B`` sequences of ``T`` tokens; ``dpo``: ``B/2`` chosen then
``B/2`` rejected; ``N = B * T`` token rows, hidden size ``D``, vocabulary ``V``):

* ``fused``: ``xe.linear_grpo_loss`` / ``xe.linear_dpo_loss`` (per-token log-probs from
  ``xe.linear_log_probs``, never ``[N, V]``);
* ``fused_ce``: ``xe.linear_cross_entropy(..., reduction="none")`` and a weighted sum of the per-token
  losses, the fused engine's cost for per-token values with a gradient (the baseline the objectives
  are held to);
* ``naive``: ``e @ c.T`` materialised, ``log_softmax`` in float32, a gather, then the same objective;
* ``liger``: ``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearDPOLoss`` (``liger_kernel.chunked_loss``,
  chunked over sequences; ``--liger-compiled`` runs its chunk function under ``torch.compile``, whose
  compilation the warm-up step absorbs).

GRPO: ``loss_type="dapo"``, ``eps_high=0.28``, ``beta=0.04`` with precomputed reference log-probs (k3),
old log-probs given; DPO: sigmoid, ``beta=0.1``, reference-free (Liger's ``use_ref_model=False``; a
precomputed reference only subtracts two ``[B/2]`` vectors), so every method returns the same loss.

Every (objective, dtype, method) runs in a fresh process: inputs are made and everything is imported
first, the peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), one step runs and "peak MiB" is
the growth of VmHWM over the RSS before it, less the gradients of ``e`` and ``c`` (every method returns
the same ones); then ``--repeats`` timed steps follow in the same process ("median s"). Ratios are to
``fused_ce`` (time) and to ``naive`` (memory).

With ``--alternate ROUNDS`` the chosen methods instead run in one process, each objective's step in
turn within every round (each round starting one method later), after a warm-up round: the fairest
time ratio on a machine whose load changes (no memory figures).

    python benchmarks/bench_rl.py --repeats 2      # N=4096 D=1024 V=151936
    python benchmarks/bench_rl.py --shape 8 128 256 32768 --dtypes float32 --repeats 3
    python benchmarks/bench_rl.py --alternate 4 --dtypes bfloat16 --methods fused fused_ce
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fused", "fused_ce", "naive", "liger")


def _inputs(shape, dtype_name: str):
    import torch

    b, t, d, v = shape
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(b, t, d, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (b, t), generator=g)
    target[:, : t // 8] = -100  # a prompt: not scored
    mask = target != -100
    # log-probs of the policy's neighbourhood (a random head: log p ~ -log V), for old and reference
    old = (-torch.rand(b, t, generator=g) - 11.5) * mask
    ref = (-torch.rand(b, t, generator=g) - 11.5) * mask
    advantages = torch.randn(b, generator=g)
    return dict(e=e, c=c, target=target, mask=mask, old=old, ref=ref, advantages=advantages)


def _objective(objective: str, logp, x):
    import crossent as xe

    if objective == "grpo":
        return xe.grpo_loss(logp, x["old"], x["advantages"], x["mask"], loss_type="dapo", eps_high=0.28,
                            ref_logp=x["ref"], beta=0.04)  # fmt: skip
    seq = xe.preference.sequence_log_prob(logp, x["mask"])
    chosen, rejected = seq.chunk(2)
    return xe.dpo_loss(chosen, rejected, beta=0.1)


def _make_liger(objective: str, compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss

    if objective == "grpo":
        return LigerFusedLinearGRPOLoss(beta=0.04, compiled=compiled, use_ref_model=True, epsilon_low=0.2,
                                        epsilon_high=0.28, loss_type="dapo")  # fmt: skip
    return LigerFusedLinearDPOLoss(beta=0.1, compiled=compiled, use_ref_model=False)


def _step(objective: str, method: str, x, liger=None) -> float:
    import torch

    import crossent as xe

    e, c, target = x["e"], x["c"], x["target"]
    e.grad = c.grad = None
    if method == "fused":
        if objective == "grpo":
            loss = xe.linear_grpo_loss(e, c, target, x["old"], x["advantages"], loss_type="dapo", eps_high=0.28,
                                       ref_logp=x["ref"], beta=0.04)  # fmt: skip
        else:
            loss = xe.linear_dpo_loss(e, c, target, beta=0.1)
    elif method == "fused_ce":
        ce = xe.linear_cross_entropy(e, c, target, reduction="none")
        loss = (ce * x["weights"]).sum()
    elif method == "naive":
        logits = e @ c.T
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        loss = _objective(objective, logp * x["mask"], x)
    else:
        if objective == "grpo":
            out = liger(e, c, target, x["mask"].long(), x["advantages"], ref_per_token_logps=x["ref"],
                        old_per_token_logps=x["old"])  # fmt: skip
        else:
            out = liger(c, e, target)
        loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return float(loss.detach())


def worker(spec: dict) -> dict:
    import torch
    import torch._dynamo  # noqa: F401  (imported before the baseline: Liger's compiled path needs it)

    import crossent  # noqa: F401
    from crossent_harness.bench.rss import reset_peak, status_kib

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    x = _inputs(spec["shape"], spec["dtype"])
    x["weights"] = torch.randn(x["target"].shape) * 1e-3
    liger = _make_liger(spec["objective"], spec["liger_compiled"]) if spec["method"] == "liger" else None
    gc.collect()
    reset_peak()
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = _step(spec["objective"], spec["method"], x, liger)
    first = time.perf_counter() - t0
    grads = (x["e"].numel() + x["c"].numel()) * x["e"].element_size()
    peak = ((status_kib("VmHWM") - rss0) * 1024 - grads) / 2**20
    times = []
    for _ in range(spec["repeats"]):
        gc.collect()
        t0 = time.perf_counter()
        _step(spec["objective"], spec["method"], x, liger)
        times.append(time.perf_counter() - t0)
    return {"peak_mib": peak, "loss": loss, "first_s": first, "times": times}


def alternate(args) -> dict:
    """Median step times of every (objective, method), alternating in one process, per dtype."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for dtype in args.dtypes:
        x = _inputs(args.shape, dtype)
        x["weights"] = torch.randn(x["target"].shape) * 1e-3
        configs = [(o, m) for o in args.objectives for m in args.methods]
        ligers = {o: _make_liger(o, args.liger_compiled) for o in args.objectives if "liger" in args.methods}
        times = {cfg: [] for cfg in configs}
        for r in range(args.alternate + 1):
            for objective, method in configs[r % len(configs) :] + configs[: r % len(configs)]:
                gc.collect()
                t0 = time.perf_counter()
                _step(objective, method, x, ligers.get(objective))
                if r:  # round 0 warms up
                    times[(objective, method)].append(time.perf_counter() - t0)
        for (objective, method), ts in times.items():
            out[(objective, dtype, method)] = statistics.median(ts)
    print("| objective | dtype | method | median s | x fused_ce |")
    print("|---|---|---|---:|---:|")
    for (objective, dtype, method), med in out.items():
        base = out.get((objective, dtype, "fused_ce"))
        print(f"| {objective} | {dtype} | {method} | {med:.2f} | {med / base:.3f} |" if base else
              f"| {objective} | {dtype} | {method} | {med:.2f} | - |")  # fmt: skip
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 512, 1024, 151936], metavar=("B", "T", "D", "V"))
    parser.add_argument("--objectives", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured first one")
    parser.add_argument("--liger-compiled", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="time the methods alternating in one process, ROUNDS timed rounds (no memory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.alternate:
        return alternate(args)
    results = {}
    for objective in args.objectives:
        for dtype in args.dtypes:
            for method in args.methods:
                spec = dict(shape=args.shape, objective=objective, dtype=dtype, method=method, repeats=args.repeats,
                            liger_compiled=args.liger_compiled, threads=args.threads)  # fmt: skip
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                     text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})  # fmt: skip
                if out.returncode != 0:
                    lines = out.stderr.strip().splitlines() or ["(no output)"]
                    results[(objective, dtype, method)] = {"error": lines[-1]}
                else:
                    results[(objective, dtype, method)] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"# {objective} {dtype} {method}: {results[(objective, dtype, method)]}", flush=True)
    b, t, d, v = args.shape
    print(f"\nN={b * t} (B={b}, T={t}) D={d} V={v}, {args.threads or 'default'} threads, {args.repeats} timed steps "
          f"per process after the measured one; Liger {'compiled' if args.liger_compiled else 'eager'}")  # fmt: skip
    print("| objective | dtype | method | median s | x fused_ce | peak MiB | x naive | loss |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (objective, dtype, method), res in results.items():
        if "error" in res:
            print(f"| {objective} | {dtype} | {method} | failed: {res['error'][:60]} | | | | |")
            continue
        med = statistics.median(res["times"]) if res["times"] else res["first_s"]
        base_t = results.get((objective, dtype, "fused_ce"), {})
        base_m = results.get((objective, dtype, "naive"), {})
        t_ratio = f"{med / statistics.median(base_t['times'] or [base_t['first_s']]):.2f}" if "times" in base_t else "-"
        m_ratio = f"{res['peak_mib'] / base_m['peak_mib']:.3f}" if "peak_mib" in base_m else "-"
        loss = "-" if method == "fused_ce" else f"{res['loss']:.6f}"
        print(f"| {objective} | {dtype} | {method} | {med:.2f} | {t_ratio} | {res['peak_mib']:.0f} | {m_ratio} | {loss} |")
    return results


if __name__ == "__main__":
    main()
