"""Distil a byte-level language model into a smaller one on real text, with ``crossent.linear_distillation``.

Text: the Python standard library's own source (every machine has it), read as bytes (V = 256). Both
models predict the next byte from the previous ``CONTEXT`` bytes through an MLP and a linear head
without bias. The teacher (wider) trains on the whole training text with cross-entropy; each student
(narrower) trains on a small transfer set only, once with cross-entropy alone and once per
divergence, mixing in the teacher's distribution at every position (``ce_weight`` keeps the labels).
Held-out cross-entropy (nats per byte) is measured on files neither model trained on.

    PYTHONPATH=src python examples/distill_text.py             # about 20 s on one core
    PYTHONPATH=src python examples/distill_text.py --divergences kl reverse_kl jsd ttm --steps 1500
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

import crossent as xe

CONTEXT = 8
VOCAB = 256


def load_text(limit: int = 2_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-library source as bytes: training text from one set of files, held-out text from another."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % 10 == 0]
    training = [f for i, f in enumerate(files) if i % 10 != 0]

    def read(paths):
        data = b"".join(p.read_bytes() for p in paths)[:limit]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return read(training), read(held_out)


def windows(text: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts ``[B, CONTEXT]`` ending before each position of ``index``, and the byte there."""
    offsets = torch.arange(-CONTEXT, 0)
    return text[index[:, None] + offsets], text[index]


class ByteModel(torch.nn.Module):
    """Embeddings of the last ``CONTEXT`` bytes -> MLP -> hidden state; ``head`` maps it to the bytes."""

    def __init__(self, embed: int, width: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, embed)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(CONTEXT * embed, width), torch.nn.GELU(), torch.nn.Linear(width, hidden), torch.nn.GELU()
        )
        self.head = torch.nn.Linear(hidden, VOCAB, bias=False)

    def hidden(self, context: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(context).flatten(1))


def held_out_ce(model: ByteModel, text: torch.Tensor, positions: int = 20000) -> float:
    index = torch.arange(CONTEXT, min(len(text), CONTEXT + positions))
    with torch.no_grad():
        context, target = windows(text, index)
        return xe.linear_cross_entropy(model.hidden(context), model.head.weight, target).item()


def train(model, text, steps, *, teacher=None, divergence=None, ce_weight=1.0, batch=128, lr=3e-3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        index = torch.randint(CONTEXT, len(text), (batch,), generator=gen)
        context, target = windows(text, index)
        h = model.hidden(context)
        if teacher is None:
            loss = xe.linear_cross_entropy(h, model.head.weight, target)
        else:
            with torch.no_grad():
                h_t = teacher.hidden(context)
            loss = xe.linear_distillation(
                h, model.head.weight, h_t, teacher.head.weight, target, divergence=divergence, ce_weight=ce_weight
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divergences", nargs="+", default=["kl", "jsd"])
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=500, help="student steps")
    parser.add_argument("--transfer", type=int, default=20000, help="bytes of training text the students see")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    torch.manual_seed(0)
    train_text, test_text = load_text()
    transfer = train_text[: args.transfer]
    print(f"text: {len(train_text)} training bytes, {len(test_text)} held-out bytes; students see {len(transfer)}")

    start = time.perf_counter()
    teacher = train(ByteModel(embed=16, width=256, hidden=128), train_text, args.teacher_steps).eval()
    teacher.requires_grad_(False)
    results = {"teacher (CE, all training text)": held_out_ce(teacher, test_text)}
    print(f"teacher trained in {time.perf_counter() - start:.1f} s")

    def student():
        torch.manual_seed(1)
        return ByteModel(embed=8, width=64, hidden=32)

    results["student, CE only"] = held_out_ce(train(student(), transfer, args.steps), test_text)
    for divergence in args.divergences:
        model = train(student(), transfer, args.steps, teacher=teacher, divergence=divergence, ce_weight=args.ce_weight)
        results[f"student, {divergence} + {args.ce_weight} CE"] = held_out_ce(model, test_text)
    print(f"{'model':<34} {'held-out CE (nats/byte)':>24}")
    for name, value in results.items():
        print(f"{name:<34} {value:>24.4f}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
