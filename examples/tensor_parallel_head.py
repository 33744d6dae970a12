"""A tensor-parallel lm_head on CPU: two gloo processes split the vocabulary, crossent computes the loss.

    torchrun --nproc-per-node 2 examples/tensor_parallel_head.py

A tiny causal language model (embedding, one MLP block, an ``lm_head``) learns a synthetic sequence
task. Its ``lm_head`` is parallelised with ``ColwiseParallel``: each process keeps the rows of half of
the vocabulary, as a DTensor sharded ``Shard(0)``. ``xe.linear_cross_entropy(h, model.lm_head.weight,
...)`` sees that DTensor and runs the vocabulary-parallel fused engine over the processes: no process
ever holds the logits of all classes, nor those of its own classes for all tokens at once. The rest of
the model is replicated (every process computes it on the same batch, as in a tensor-parallel group).

Every process also trains an unsharded copy in the ordinary way; the example prints both losses
every few steps and, at the end, the largest difference between the two models' parameters, which
is at the level of float32 rounding. Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist

import crossent as xe

VOCAB, WIDTH, SEQ = 1001, 32, 24  # 1001: the ranks hold 501 and 500 classes


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.block = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(), torch.nn.Linear(4 * WIDTH, WIDTH))
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens):
        """The loss of predicting each next token; the head's weight goes to crossent, never to a matmul."""
        h = self.embed(tokens)
        h = h + self.block(h)
        return xe.linear_cross_entropy(h, self.lm_head.weight, tokens, shift=True, z_loss=1e-4)


def batch(step: int, rows: int = 8) -> torch.Tensor:
    """Sequences that count up from a random start (mod VOCAB): the next token is predictable."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def train(steps: int = 30, log_every: int = 10) -> float:
    """Train the tensor-parallel model and an unsharded copy; return their largest parameter difference."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same initial model on every process
    model = TinyLM()
    single = copy.deepcopy(model)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt_single = torch.optim.AdamW(single.parameters(), lr=3e-3)
    for step in range(steps):
        tokens = batch(step)
        for m, o in ((model, opt), (single, opt_single)):
            o.zero_grad()
            loss = m(tokens)
            loss.backward()
            o.step()
            if m is model:
                sharded_loss = loss.item()
        if rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {sharded_loss:.4f} (tensor-parallel head)  {loss.item():.4f} (one process)")
    diff = 0.0
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        diff = max(diff, (full - q).abs().max().item())
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    try:
        diff = train(args.steps)
        if dist.get_rank() == 0:
            print(f"largest parameter difference from one process: {diff:.2e}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
