"""The model both Transformers benchmarks train: a small Llama with a large vocabulary, from a spec."""

from __future__ import annotations


def tiny_llama(spec: dict):
    """A ``LlamaForCausalLM`` in training mode sized by ``spec`` (vocab, hidden, layers, seq, device,
    dtype, threads), seeded so that every method of a run trains the same weights."""
    import torch
    import transformers

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
        num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=spec["seq"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
