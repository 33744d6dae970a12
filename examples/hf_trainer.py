"""transformers.Trainer with a crossent loss: a small Llama trained with the focal loss plus a z-loss.

One line patches the model (``crossent.integrations.transformers.apply``); the Trainer is untouched:
it passes ``num_items_in_batch`` to the forward, which normalises every micro-batch of a gradient
accumulation by the token count of the whole batch, as the stock loss does. Given labels, the patched
model never forms its ``[batch, seq, vocab]`` logits (``outputs.logits`` is ``None``), in training and
in the Trainer's evaluation alike, which reports the same fused loss.

The text is real and offline: the source of Python's standard library, read as bytes (a 256-token
vocabulary). A few hundred steps on one CPU thread take a minute or two; the loss falls from about 5
(focal of a uniform guess over 256 bytes) well below 2.

    python examples/hf_trainer.py                        # focal loss, 300 steps
    python examples/hf_trainer.py --loss mixce --steps 100
"""

from __future__ import annotations

import argparse
import glob
import os
import sysconfig
import tempfile

import torch
import transformers

import crossent.integrations.transformers as xt


class ByteWindows(torch.utils.data.Dataset):
    """Windows of ``seq`` bytes of a text, one every ``seq`` bytes; labels are the inputs (the model shifts)."""

    def __init__(self, data: torch.Tensor, seq: int):
        self.data, self.seq = data, seq

    def __len__(self):
        return (self.data.numel() - 1) // self.seq

    def __getitem__(self, i):
        window = self.data[i * self.seq : (i + 1) * self.seq]
        return {"input_ids": window, "labels": window}


def stdlib_bytes(limit: int) -> torch.Tensor:
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out = bytearray()
    for path in paths:
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="focal", help="a crossent loss name (focal, mixce, z_loss, ce, ...)")
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = stdlib_bytes(2_000_000)
    split = int(0.95 * data.numel())
    train, test = ByteWindows(data[:split], args.seq), ByteWindows(data[split:], args.seq)

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.seq, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    xt.apply(model, loss=args.loss, z_loss=args.z_loss)  # the one line

    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=out,
                max_steps=args.steps,
                per_device_train_batch_size=8,
                gradient_accumulation_steps=2,
                learning_rate=3e-3,
                lr_scheduler_type="cosine",
                warmup_steps=20,
                logging_steps=max(1, args.steps // 6),
                eval_strategy="no",
                per_device_eval_batch_size=16,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
                dataloader_num_workers=0,
                disable_tqdm=True,
            ),
            train_dataset=train,
            eval_dataset=torch.utils.data.Subset(test, range(64)),
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    print(f"held-out {args.loss} loss (+ z-loss {args.z_loss:g}): {before:.3f} before training, {after:.3f} after")


if __name__ == "__main__":
    main()
