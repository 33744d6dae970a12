"""GRPO on a tiny random causal LM with ``crossent.linear_grpo_loss``: sample, score, update, no logits.

A randomly initialised Llama (no download) samples ``--group`` completions for each of a few random
prompts; a toy reward (the share of even token ids in a completion) is normalised within each group
into advantages (GRPO); the rollout's log-probabilities are recorded as ``old_logp`` and a frozen copy
of the initial model gives ``ref_logp``. Then ``--iterations`` updates minimise the DAPO-normalised,
clip-higher surrogate with a k3 KL penalty and an entropy bonus, each from the model's last hidden
states and its head's weight: the ``[sequences, length, vocab]`` logits are never formed, in the
rollout scoring or in training. The script prints the loss, the mean reward and the memory that those
logits (and their gradient) would have taken.

    python examples/grpo_step.py
    python examples/grpo_step.py --vocab 128256 --group 8 --new-tokens 48
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers

import crossent as xe


def tiny_llama(vocab: int, hidden: int = 64) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def token_log_probs(model, input_ids, attention_mask, labels, entropy=False):
    """Per-token log-probs (and entropies) of ``labels`` under ``model``: hidden states, then the head, fused."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return xe.linear_log_probs(hidden, model.lm_head.weight, labels, shift=True, entropy=entropy)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=3, help="updates per rollout (old_logp != logp after 1)")
    args = parser.parse_args(argv)

    policy = tiny_llama(args.vocab)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    # Rollout: G samples per prompt. Labels: the completion's tokens, -100 on the prompt.
    prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_tokens)).repeat_interleave(args.group, 0)
    with torch.no_grad():
        policy.eval()
        sequences = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)  # fmt: skip
        policy.train()
    attention_mask = torch.ones_like(sequences)
    labels = sequences.clone()
    labels[:, : args.prompt_tokens] = -100
    completion = sequences[:, args.prompt_tokens :]

    reward = (completion % 2 == 0).float().mean(-1)
    grouped = reward.view(args.prompts, args.group)
    advantages = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)).view(-1)
    with torch.no_grad():
        old_logp = token_log_probs(policy, sequences, attention_mask, labels).logp
        ref_logp = token_log_probs(reference, sequences, attention_mask, labels).logp
    num_items = (labels[:, 1:] != -100).sum()

    for it in range(args.iterations):
        hidden = policy.model(input_ids=sequences, attention_mask=attention_mask).last_hidden_state
        loss = xe.linear_grpo_loss(
            hidden, policy.lm_head.weight, labels, old_logp, advantages, shift=True, loss_type="dapo",
            eps_low=0.2, eps_high=0.28, ref_logp=ref_logp, beta=0.04, kl_estimator="k3", entropy_coef=1e-3,
            num_items=num_items,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"iteration {it}: loss {loss.item():+.5f}")

    rows, length = labels[:, 1:].shape
    logits_mib = rows * length * args.vocab * 4 / 2**20
    print(f"mean reward {reward.mean().item():.3f} over {rows} completions of {args.new_tokens} tokens")
    print(f"float32 logits [{rows}, {length}, {args.vocab}] not formed: {logits_mib:.1f} MiB, "
          f"{2 * logits_mib:.1f} MiB with their gradient")  # fmt: skip


if __name__ == "__main__":
    main()
