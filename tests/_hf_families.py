"""Every causal-LM family of the installed transformers, built tiny and patched against stock.

For each ``model_type`` of transformers' causal-LM auto mapping, :func:`outcome` builds the model from
its default config shrunk to a few units (:func:`tiny_config`: one or a few layers, hidden size 32, a
vocabulary of 96, no dropout; no download), runs a training forward and backward with padded labels,
stock, then patched by ``crossent.integrations.transformers.apply``, and says what happened:

* ``exact``: the patched loss and every parameter's gradient equal stock's within 1e-5 relative to the
  largest entry (the head's weight is scaled up so that logits reach several units: soft caps and
  scales matter);
* ``refused``: ``apply`` or the first patched forward raised ``UnsupportedModel`` (the reason given);
* ``not built``: the family cannot run tiny and offline here (an extra package, a config the generic
  shrinking does not fit, a stock forward that needs more than token ids); the reason given;
* ``wrong``: anything else (a different loss or gradient, another error): a bug of the patch.

    python tests/_hf_families.py      # the tables of docs/transformers.md
"""

from __future__ import annotations

import torch

VOCABULARY = 96
#: Config attributes set to these values wherever a config (or one of its sub-configs) has them.
SIZES = {
    "vocab_size": VOCABULARY,
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "dim"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner"), 48),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 16),
    **dict.fromkeys(("num_attention_heads", "n_head", "decoder_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads"), 2),
    "head_dim": 8,
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), 4),
    "v_head_dim": 8,
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    "num_experts_per_tok": 2,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 64),
    **dict.fromkeys(("decoder_layers", "encoder_layers", "n_layer", "num_layers"), 1),
}
#: Layer counts; per-layer lists (``layer_types``) keep the first layer of each kind.
LAYER_COUNTS = ("num_hidden_layers",)
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}


def _set(config, name, value) -> None:
    try:
        setattr(config, name, value)
    except Exception:  # a derived or per-layer attribute: the config keeps its own
        pass


def _shrink(config, seen: set) -> None:
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    names = list(vars(config))  # in order: the same table on every run
    for name, value in SIZES.items():
        if name in names and getattr(config, name) is not None:
            _set(config, name, value)
    if getattr(config, "qk_rope_head_dim", None) is not None and "head_dim" in names:
        _set(config, "head_dim", SIZES["qk_rope_head_dim"])  # multi-head latent attention: the rotary part
    for name, value in TOKEN_IDS.items():
        if isinstance(getattr(config, name, None), int):
            _set(config, name, value)
    layers = getattr(config, "num_hidden_layers", None) if "num_hidden_layers" in names else None
    kinds = getattr(config, "layer_types", None)
    if isinstance(layers, int):
        keep = list(range(min(layers, 1)))
        if isinstance(kinds, (list, tuple)) and len(kinds) == layers:
            first = {}
            for i, kind in enumerate(kinds):
                first.setdefault(kind, i)
            keep = sorted(first.values())
        for name in names:
            value = getattr(config, name)
            if isinstance(value, (list, tuple)) and len(value) == layers and layers > 1:
                _set(config, name, type(value)(value[i] for i in keep))
        _set(config, "num_hidden_layers", len(keep))
    for name in names:
        value = getattr(config, name)
        if isinstance(value, float) and any(w in name for w in ("dropout", "pdrop", "jitter")):
            _set(config, name, 0.0)
        elif isinstance(value, PretrainedConfig):
            _shrink(value, seen)


def tiny_config(model_type: str):
    """The default config of ``model_type``, shrunk (:data:`SIZES`), without dropout."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    _shrink(config, set())
    return config


def families() -> dict[str, str]:
    """``model_type`` -> the name of its causal-LM class, from transformers' auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCABULARY, (2, 8), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]


def _mismatch(got, want, floor: float = 1e-12, rel: float = 1e-5) -> float | None:
    """The error relative to the largest entry of ``want`` (at least ``floor``), or None within ``rel``."""
    scale = max(want.abs().max().item(), floor)
    err = (got.double() - want.double()).abs().max().item()
    return None if err <= rel * scale else err / scale


def outcome(model_type: str, **text_config) -> tuple[str, str]:
    """``(verdict, reason)`` of ``model_type``: ``exact``, ``refused``, ``not built`` or ``wrong``.
    ``text_config``: attributes set on the (text) config after shrinking (a soft cap to activate)."""
    import transformers

    import crossent.integrations.transformers as xt

    class_name = families()[model_type]
    try:
        config = tiny_config(model_type)
        for name, value in text_config.items():
            setattr(config.get_text_config(), name, value)
        torch.manual_seed(0)
        model = getattr(transformers, class_name)(config).float().train()
        head = model.get_output_embeddings()
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            with torch.no_grad():
                head.weight.mul_(30.0)  # logits of several units: soft caps and scales matter
        ids, labels = _batch()
        stock_loss, stock_grads = _step(model, ids, labels)
        again, _ = _step(model, ids, labels)
    except Exception as err:
        return "not built", _error(err)
    if not torch.equal(again, stock_loss):
        return "not built", "the stock training forward is not deterministic"
    try:
        xt.apply(model)
        loss, grads = _step(model, ids, labels)
    except xt.UnsupportedModel as err:
        return "refused", _error(err)
    except Exception as err:
        return "wrong", _error(err)
    finally:
        if xt.is_patched(model):
            xt.undo(model)
    if (error := _mismatch(loss, stock_loss)) is not None:
        return "wrong", f"loss {loss.item():.6g}, stock {stock_loss.item():.6g} (relative error {error:.2g})"
    if grads.keys() != stock_grads.keys():
        return "wrong", f"gradients of {sorted(set(grads) ^ set(stock_grads))[:3]} differ in presence"
    # A gradient that is zero in exact arithmetic (an attention key's bias: softmax ignores a shift) is
    # rounding noise; it is compared relative to a thousandth of the largest gradient.
    floor = 1e-3 * max(g.abs().max().item() for g in stock_grads.values())
    for name, want in stock_grads.items():
        if (error := _mismatch(grads[name], want, floor)) is not None:
            return "wrong", f"gradient of {name}: relative error {error:.2g}"
    return "exact", ""


def main() -> None:
    """Print the outcome of every family as the Markdown of docs/transformers.md."""
    import transformers

    torch.set_num_threads(1)
    classes = families()
    by_verdict: dict[str, dict[str, str]] = {}
    for model_type in sorted(classes):
        verdict, reason = outcome(model_type)
        by_verdict.setdefault(verdict, {})[model_type] = reason.replace("|", "/")
    counts = ", ".join(f"{len(rows)} {verdict}" for verdict, rows in sorted(by_verdict.items()))
    print(f"transformers {transformers.__version__}, {len(classes)} causal-LM families: {counts}.\n")
    print("Exact: " + ", ".join(f"`{t}`" for t in by_verdict.get("exact", {})) + ".\n")
    for verdict in ("wrong", "refused", "not built"):
        if by_verdict.get(verdict):
            print(f"| {verdict} | class | reason |\n|---|---|---|")
            for model_type, reason in by_verdict[verdict].items():
                reason = reason.removeprefix(f"UnsupportedModel: {classes[model_type]}: ")
                print(f"| `{model_type}` | `{classes[model_type]}` | {reason} |")
            print()


if __name__ == "__main__":
    main()
