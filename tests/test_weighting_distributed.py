"""LossReweighting and DoReMi under 2 gloo processes equal one process on the concatenated batch."""

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossent.weighting import DoReMi, LossReweighting

WORLD = 2
TIMEOUT_S = 60
# rank r holds sizes[r] sequences: unequal on purpose
SIZES = (5, 3)


def make_batch():
    gen = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    return {
        "seq": 2 + torch.randn(n, generator=gen, dtype=torch.float64),
        "ntok": torch.randint(1, 20, (n,), generator=gen),
        "proxy": 3 + torch.randn(n, 4, generator=gen, dtype=torch.float64),
        "reference": 3 + torch.randn(n, 4, generator=gen, dtype=torch.float64),
        "domain": torch.randint(0, 3, (n,), generator=gen),
        "mask": torch.rand(n, 4, generator=gen) > 0.25,
    }


def shard(t, rank):
    start = sum(SIZES[:rank])
    return t[start : start + SIZES[rank]]


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        batch = make_batch()
        out = {}
        for strategy in ("linupper", "quadratic", "extremes"):
            rw = LossReweighting(strategy, r=0.4, warmup_steps=1)
            seq = shard(batch["seq"], rank).requires_grad_()
            warm = rw(seq, num_tokens=shard(batch["ntok"], rank))  # step 0: warm-up
            out[f"{strategy}/warm_loss"] = warm.detach()
            out[f"{strategy}/weights"] = rw.weights(seq)
            out[f"{strategy}/loss"] = rw(seq).detach()
        doremi = DoReMi(3, eta=1.0, smoothing=1e-3)
        for step in range(2):
            proxy = shard(batch["proxy"], rank) + step
            loss = doremi(
                proxy,
                reference_losses=shard(batch["reference"], rank),
                domain_ids=shard(batch["domain"], rank),
                mask=shard(batch["mask"], rank),
            )
            out[f"doremi/loss{step}"] = loss.detach()
        out["doremi/weights"] = doremi.domain_weights
        out["doremi/average"] = doremi.average_weights
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(tmp):
    init_file = os.path.join(tmp, "init")
    ctx = mp.start_processes(worker, args=(init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        results = run_workers(tmp)
    batch = make_batch()
    n = sum(SIZES)
    for strategy in ("linupper", "quadratic", "extremes"):
        single = LossReweighting(strategy, r=0.4, warmup_steps=1, distributed=False)
        single.step()
        expected = single.weights(batch["seq"])
        got = torch.cat([results[r][f"{strategy}/weights"] for r in range(WORLD)])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, torch.ones(n, dtype=torch.float64))
        # each rank's loss is its share: sum_local(N w_i l_i) / B_local; data parallelism then averages
        for r in range(WORLD):
            seq_r = shard(batch["seq"], r)
            w_r = shard(expected, r)
            expected_loss = (w_r * seq_r).sum() / SIZES[r]
            torch.testing.assert_close(results[r][f"{strategy}/loss"], expected_loss, rtol=1e-12, atol=1e-12)
            ntok = shard(batch["ntok"], r).double()
            warm = (ntok * seq_r).sum() / ntok.sum()
            torch.testing.assert_close(results[r][f"{strategy}/warm_loss"], warm, rtol=1e-12, atol=1e-12)
    single = DoReMi(3, eta=1.0, smoothing=1e-3, distributed=False)
    for step in range(2):
        loss = single(
            batch["proxy"] + step, reference_losses=batch["reference"], domain_ids=batch["domain"], mask=batch["mask"]
        )
        # the per-rank losses use the global normaliser / world size: their mean is the single-process loss
        mean = sum(results[r][f"doremi/loss{step}"] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, loss, rtol=1e-12, atol=1e-12)
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["doremi/weights"], single.domain_weights, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(results[r]["doremi/average"], single.average_weights, rtol=1e-12, atol=1e-12)
