"""DPO on a tiny random causal LM with ``crossent.linear_dpo_loss``: preference pairs, no logits.

A randomly initialised Llama (no download) is trained on random preference pairs: each prompt has a
chosen and a rejected completion, batched as TRL does (the chosen rows first, then the rejected rows
in the same order). The reference model's sequence log-probabilities are precomputed once, from a
frozen copy, with ``crossent.linear_log_probs``; each step then runs the policy's body and hands its
last hidden states and head weight to ``linear_dpo_loss``, which sums the completion's token
log-probabilities without forming the ``[2B, length, vocab]`` logits. The script prints the loss, the
reward accuracy (how often the chosen completion's implicit reward is the higher) and the memory those
logits would have taken.

    python examples/dpo_step.py
    python examples/dpo_step.py --loss-type ipo --beta 0.5
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
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", choices=xe.preference.DPO_LOSS_TYPES)
    args = parser.parse_args(argv)

    policy = tiny_llama(args.vocab)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    # [chosen; rejected]: one prompt for both completions of a pair; labels -100 on the prompt and on
    # a random tail of padding (completions of different lengths).
    g = torch.Generator().manual_seed(1)
    b, p, t = args.pairs, args.prompt_tokens, args.completion_tokens
    prompts = torch.randint(0, args.vocab, (b, p), generator=g).repeat(2, 1)
    completions = torch.randint(0, args.vocab, (2 * b, t), generator=g)
    input_ids = torch.cat([prompts, completions], 1)
    lengths = torch.randint(t // 2, t + 1, (2 * b,), generator=g)
    attention_mask = (torch.arange(p + t) < (p + lengths)[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :p] = -100

    with torch.no_grad():  # precomputed once, as TRL's precompute_ref_log_probs does
        hidden = reference.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ref_logp = xe.linear_log_probs(hidden, reference.lm_head.weight, labels, shift=True).logp
        ref_chosen, ref_rejected = ref_logp.sum(-1).chunk(2)  # ignored positions give 0

    for step in range(args.steps):
        hidden = policy.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = xe.linear_dpo_loss(hidden, policy.lm_head.weight, labels, ref_chosen, ref_rejected, beta=args.beta,
                                  loss_type=args.loss_type, shift=True)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: {args.loss_type} loss {loss.item():.5f}")

    with torch.no_grad():
        hidden = policy.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        chosen, rejected = xe.linear_log_probs(hidden, policy.lm_head.weight, labels, shift=True).logp.sum(-1).chunk(2)
    accuracy = ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean()
    rows, length = labels[:, 1:].shape
    logits_mib = rows * length * args.vocab * 4 / 2**20
    print(f"reward accuracy {accuracy.item():.2f} over {b} pairs")
    print(f"float32 logits [{rows}, {length}, {args.vocab}] not formed: {logits_mib:.1f} MiB, "
          f"{2 * logits_mib:.1f} MiB with their gradient")  # fmt: skip


if __name__ == "__main__":
    main()
