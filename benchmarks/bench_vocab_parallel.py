"""Vocabulary-parallel cross-entropy on gloo ranks: each rank's peak memory and time, against the materialising recipes.

    python benchmarks/bench_vocab_parallel.py                       # N=2048, D=1024, V=131072 over 4 ranks
    python benchmarks/bench_vocab_parallel.py --n 4096 --d 1024 --vocab 131072 --world 4 --rounds 3

Each rank holds ``c_shard`` (``[V / world, D]``, float32) and the same ``e`` (``[N, D]``) and targets,
and runs forward + backward (gradients of ``e``, summed over the ranks, and of ``c_shard``) of
cross-entropy (mean over the rows) with:

* ``crossent``: :func:`crossent.distributed.vocab_parallel_linear_cross_entropy` (default chunk);
* ``megatron``: Megatron-LM's recipe, written here from its description: the logit shard
  ``e @ c_shard.T`` materialised; all-reduces of the row maxima, the target logits and the sums of
  exponentials; the softmax formed in place in the logit buffer and kept for backward, where it
  becomes the gradient in place; ``e``'s gradient all-reduced (a column-parallel layer's input);
* ``loss_parallel``: PyTorch's recipe: an ``nn.Linear`` head parallelised with
  ``ColwiseParallel(use_local_output=False)`` and ``F.cross_entropy`` under ``loss_parallel()``.

Memory: after imports, inputs and a warm-up step, each timed step starts with the gradients dropped and
the kernel's peak-RSS mark reset (``echo 5 > /proc/self/clear_refs``); "peak MiB" is the step's
``VmHWM`` minus the RSS before it, minus the gradients' bytes (which every method must produce).
Time: each step starts after a barrier; "median s" is over the timed steps of every round (the methods
run in turn, each round starting one method later). Ranks get ``cores // world`` threads (at least 1).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

METHODS = ("crossent", "megatron", "loss_parallel")


def _megatron(group):
    """Megatron-LM's vocab-parallel cross-entropy on the materialised logit shard (its recipe, our code)."""
    import torch
    import torch.distributed as dist

    class CopyToShards(torch.autograd.Function):
        @staticmethod
        def forward(ctx, e):
            return e.view_as(e)

        @staticmethod
        def backward(ctx, grad):
            dist.all_reduce(grad, group=group)
            return grad

    class VocabParallelCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, vocab_start):
            peak = logits.amax(1)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(peak[:, None])  # in place, as Megatron does
            local = target - vocab_start
            outside = (local < 0) | (local >= logits.shape[1])
            local = local.masked_fill(outside, 0)
            picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
            dist.all_reduce(picked, group=group)
            torch.exp(logits, out=logits)
            sum_exp = logits.sum(1)
            dist.all_reduce(sum_exp, group=group)
            logits.div_(sum_exp[:, None])  # the softmax, kept for backward
            ctx.save_for_backward(logits, local, outside)
            return sum_exp.log() - picked

        @staticmethod
        def backward(ctx, grad_loss):
            softmax, local, outside = ctx.saved_tensors
            grad = softmax  # becomes the gradient in place
            grad.scatter_add_(1, local[:, None], (~outside).to(grad.dtype).neg()[:, None])
            grad.mul_(grad_loss[:, None])
            return grad, None, None

    def loss(e, c_shard, target, vocab_start):
        logits = CopyToShards.apply(e) @ c_shard.T
        return VocabParallelCE.apply(logits, target, vocab_start).mean()

    return loss


def _worker(rank: int, args, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    from crossent_harness.bench.rss import reset_peak, status_kib
    from crossent.distributed import vocab_parallel_linear_cross_entropy

    world = args.world
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group(0)
    shard = args.vocab // world
    start = rank * shard
    g = torch.Generator().manual_seed(0)
    e = torch.randn(args.n, args.d, generator=g)
    target = torch.randint(0, args.vocab, (args.n,), generator=g)
    head = torch.nn.Linear(args.d, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, args.d**-0.5, generator=g)
        c_shard = head.weight[start : start + shard].clone().requires_grad_()
    parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))  # keeps only this rank's rows
    megatron = _megatron(group)

    def step(method: str, e_leaf):
        if method == "crossent":
            loss = vocab_parallel_linear_cross_entropy(e_leaf, c_shard, target, vocab_start=start, vocab_size=args.vocab)
            loss.backward()
        elif method == "megatron":
            loss = megatron(e_leaf, c_shard, target, start)
            loss.backward()
        else:
            with loss_parallel():
                loss = F.cross_entropy(head(e_leaf), target)
                loss.backward()
                loss = loss.full_tensor()
        return float(loss.detach())

    grad_bytes = (args.n * args.d + shard * args.d) * 4
    results = {m: {"times": [], "peaks": [], "loss": None} for m in METHODS}
    for rnd in range(args.rounds + 1):  # round 0: warm-up
        order = METHODS[rnd % len(METHODS) :] + METHODS[: rnd % len(METHODS)]
        for method in order:
            e_leaf = e.clone().requires_grad_()
            c_shard.grad = None
            head.weight.grad = None
            gc.collect()
            dist.barrier()
            reset_peak()
            rss0 = status_kib("VmRSS")
            t0 = time.perf_counter()
            value = step(method, e_leaf)
            elapsed = time.perf_counter() - t0
            peak = (status_kib("VmHWM") - rss0) * 1024 - grad_bytes
            if rnd:
                results[method]["times"].append(elapsed)
                results[method]["peaks"].append(peak / 2**20)
            results[method]["loss"] = value
            del e_leaf
    gathered = [None] * world
    dist.all_gather_object(gathered, results, group=group)
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.vocab % args.world:
        parser.error("--vocab must be divisible by --world (the recipes compared split it evenly)")

    import torch.multiprocessing as mp

    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "init"), tmp), nprocs=args.world)
        with open(os.path.join(tmp, "results.json")) as f:
            per_rank = json.load(f)
    print(f"N={args.n}, D={args.d}, V={args.vocab} over {args.world} ranks ({args.vocab // args.world} classes each), "
          f"float32, {args.rounds} rounds; load average {load} at the start\n")  # fmt: skip
    print("| method | rank | median s | peak MiB | loss |")
    print("|---|---:|---:|---:|---:|")
    for method in METHODS:
        for rank, res in enumerate(per_rank):
            r = res[method]
            print(f"| {method} | {rank} | {statistics.median(r['times']):.2f} | {max(r['peaks']):.0f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
