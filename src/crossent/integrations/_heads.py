"""The weight and bias behind a language model's head, read inside the head's forward.

The fused loss needs the ``[V, D]`` matrix ``W`` and the bias ``b`` of ``logits = x @ W.T + b``. A
plain ``nn.Linear`` gives them directly; PEFT wrappers are unwrapped: ``modules_to_save`` gives its
active copy, a LoRA layer gives ``W + sum_a scale_a B_a A_a`` over its active adapters (one ``V x D``
tensor; autograd carries the gradient to ``A`` and ``B``). Anything else is refused by name, as is a
weight that is still partitioned (DeepSpeed ZeRO-3 outside the module's gathered forward). A
vocabulary-sharded ``DTensor`` weight (tensor parallelism) is passed on as it is:
``linear_cross_entropy`` runs the vocabulary-parallel engine on it.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._families import UnsupportedModel


def head_weights(head: nn.Module, who: str) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of the head's logits; call it inside the head's forward."""
    weight, bias = _linear_of(head, who)
    _check_usable(weight, who)
    return weight, bias


def check_linear_head(head: nn.Module, who: str) -> None:
    """Refuse, by name, a head that is not a linear layer; call it any time: it reads no weight (which
    DeepSpeed ZeRO-3 gathers only inside the head's forward). A PEFT wrapper is checked at the first forward."""
    if not type(head).__module__.startswith("peft."):
        _linear_of(head, who)


def _linear_of(head: nn.Module, who: str) -> tuple[Tensor, Tensor | None]:
    if type(head).__module__.startswith("peft."):
        return _peft_linear(head, who)
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head.weight, head.bias
    raise UnsupportedModel(
        f"{who}: crossent reads the head's weight from an nn.Linear (or a PEFT LoRA / modules_to_save "
        f"wrapper of one); the head is a {type(head).__module__}.{type(head).__name__}"
    )


def _peft_linear(head: nn.Module, who: str) -> tuple[Tensor, Tensor | None]:
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        module = head.modules_to_save[active[0]] if active and not head.disable_adapters else head.original_module
        return _linear_of(module, who)
    if isinstance(head, LoraLayer):
        base = head.get_base_layer()
        weight, bias = _linear_of(base, who)
        if head.disable_adapters or head.merged:
            return weight, bias
        for adapter in head.active_adapters:
            if adapter not in head.lora_A:
                continue
            refusal = _lora_refusal(head, adapter)
            if refusal:
                raise UnsupportedModel(
                    f"{who}: the LoRA adapter {adapter!r} on the head {refusal}; crossent folds plain LoRA only"
                )
            weight = weight + head.get_delta_weight(adapter).to(weight.dtype)
        return weight, bias
    raise UnsupportedModel(f"{who}: crossent cannot read the weight of the PEFT head {type(head).__name__}")


def _lora_refusal(layer, adapter: str) -> str | None:
    """Why the adapter is not ``x @ (W + scale B A).T``, or ``None``."""
    if adapter in getattr(layer, "lora_variant", {}):
        return f"is a variant ({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA)"
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        return "has a bias (lora_bias=True)"
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, nn.Identity) and dropout.training and getattr(dropout, "p", 1.0) > 0:
        return f"applies dropout (p={dropout.p}) to the hidden states, which no single weight reproduces: set lora_dropout=0"
    if type(layer).__name__ != "Linear":
        return f"is a {type(layer).__name__} layer, not a linear one"
    return None


def _check_usable(weight: Tensor, who: str) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise UnsupportedModel(
            f"{who}: the head's weight has shape {tuple(weight.shape)} inside its forward: it is partitioned "
            "(e.g. DeepSpeed ZeRO-3) and not gathered for the module that owns it; a PEFT-wrapped head under "
            "ZeRO-3 needs its base layer gathered with it"
        )


__all__ = ["check_linear_head", "head_weights"]
