"""A few steps of TRL's SFTTrainer on a small Llama-shaped model with a 128K vocabulary: peak memory and time.

Methods, each in a fresh process (imports, model, tokenizer, dataset and trainer first, then the
measured ``trainer.train()``):

* ``stock``: TRL's SFTTrainer as it is (TRL's own fused LM head: chunked log-probabilities, entropy and
  top-1 flags, no ``[B, T, V]`` logits);
* ``crossent``: the same trainer after ``crossent.integrations.transformers.apply(trainer)`` (cross-entropy);
* ``crossent_focal``: the same with ``loss="focal"``.

Memory: the peak resident set (``VmHWM``) of ``trainer.train()`` after ``echo 5 > /proc/self/clear_refs``
resets the mark, reported as the peak and as its growth over the resident set before (AdamW's state,
allocated at the first step, is part of both). Time: the median of the steps after the first.

    PYTHONPATH=src python benchmarks/bench_trl_sft.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

METHODS = ("stock", "crossent", "crossent_focal")


def worker(spec: dict) -> dict:
    warnings.filterwarnings("ignore")
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    import crossent.integrations.transformers as xt
    from crossent_harness.bench.rss import reset_peak, status_kib

    from _tiny_llama import tiny_llama

    model = tiny_llama(spec)
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, spec["vocab"])}}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="t1")
    g = torch.Generator().manual_seed(0)
    rows = spec["batch"] * spec["steps"]
    data = datasets.Dataset.from_dict(
        {"input_ids": torch.randint(2, spec["vocab"], (rows, spec["seq"]), generator=g).tolist()}
    )
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        max_length=spec["seq"], logging_steps=1, report_to=[], save_strategy="no", use_cpu=spec["device"] == "cpu",
        bf16=spec["dtype"] == "bfloat16", disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Timer()])  # fmt: skip
    if spec["method"] == "crossent":
        xt.apply(trainer)
    elif spec["method"] == "crossent_focal":
        xt.apply(trainer, loss="focal")
    before = status_kib("VmRSS") * 1024
    reset_peak()
    trainer.train()
    peak = status_kib("VmHWM") * 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "method": spec["method"], "loss": losses[0], "peak_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20,
        "median_s": statistics.median(times[1:] or times), "times": times,
    }  # fmt: skip


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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    names = ("device", "dtype", "vocab", "hidden", "layers", "seq", "batch", "steps", "threads")
    spec = {k: getattr(args, k) for k in names}
    print(f"# {json.dumps(spec)}; load average {os.getloadavg()[0]:.1f}")
    print("| method | first loss | peak MiB | growth MiB | median step s |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        run = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "method": method})],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {method} | fails: {reason[:160]} | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {method} | {r['loss']:.4f} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | {r['median_s']:.2f} |")


if __name__ == "__main__":
    main()
