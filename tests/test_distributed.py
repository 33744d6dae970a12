"""The vocabulary-parallel engine against the dense path: one process, and two gloo processes.

Two ranks hold uneven column slices (3 and 6 of 9 classes); each must get the dense path's loss and
the dense gradient of its own columns. Tolerances: float64 1e-10 relative.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossent as xe
from crossent.distributed import vocab_parallel_cross_entropy

SPLIT = (0, 3, 9)


def loss_cases():
    return [
        dict(loss="ce"),
        dict(loss="ce", label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
        dict(loss="ce", weight=torch.linspace(0.2, 2.0, 9, dtype=torch.float64), ignore_index=4, reduction="sum"),
        dict(loss=xe.losses.get("focal", gamma=2.0), reduction="none"),
        dict(loss=xe.losses.get("ngce", q=0.7)),
        dict(loss=xe.losses.get("squentropy")),
        dict(loss=xe.losses.get("ldr_kl", lam=0.5, margin=0.1)),
        dict(loss=xe.losses.get("nce") + 2.0 * xe.losses.get("rce")),
        # Circle loss expects cosine logits: both paths see tanh of the same logits.
        dict(loss=xe.losses.get("circle", m=0.25, gamma=8.0), cosine=True),
    ]


def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    logits[0] = 1e4 * torch.sign(logits[0])
    target = torch.randint(0, 9, (6,), generator=g)
    target[1] = 4
    return logits, target


def check_rank(rank: int, world: int):
    logits, target = data()
    if world == 1:
        lo, hi = 0, 9
    else:
        lo, hi = SPLIT[rank], SPLIT[rank + 1]
    for kw in loss_cases():
        squash = torch.tanh if kw.pop("cosine", False) else (lambda t: t)
        x = logits.clone().requires_grad_()
        ref = xe.cross_entropy(squash(x), target, **kw)
        upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        (ref_grad,) = torch.autograd.grad(ref, x, upstream)
        shard = x.detach()[:, lo:hi].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(squash(shard), target, vocab_start=lo, **kw)
        (grad,) = torch.autograd.grad(out, shard, upstream)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad[:, lo:hi], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"NormalizedFocal.*'vocab-parallel' engine"):
        vocab_parallel_cross_entropy(logits[:, lo:hi], target, vocab_start=lo, loss="nfl")


def _worker(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check_rank(rank, world)
    finally:
        dist.destroy_process_group()


def test_single_process_equals_dense():
    check_rank(0, 1)


@pytest.mark.slow
def test_two_gloo_ranks_with_uneven_shards_equal_dense():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_worker, args=(2, init_file), nprocs=2, join=False, start_method="spawn")
        while not ctx.join(timeout=120):
            pass


def test_errors():
    logits, target = data()
    with pytest.raises(ValueError, match="do not fit"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=2)
    with pytest.raises(ValueError, match="class-index targets"):
        vocab_parallel_cross_entropy(logits, torch.softmax(logits, -1), vocab_start=0)
    with pytest.raises(ValueError, match="target value 9 at position 0"):
        vocab_parallel_cross_entropy(logits[:, :3], torch.full((6,), 9), vocab_start=0, vocab_size=9)
