"""The transformers families crossent patches, and what each does to its head's logits.

Every supported causal-LM forward follows one pattern::

    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    logits = self.lm_head(hidden)
    logits = post_process(logits)                      # read from the config, see POST_PROCESSING
    loss = self.loss_function(logits, labels, vocab_size, **kwargs)

so one mechanism serves them all: the head computes the loss instead of the logits, with the family's
post-processing as crossent transforms. A family is one entry of :data:`FAMILIES`: its ``model_type``
and the config attributes of its post-processing, in the order its forward applies them. The patched
forward checks the claim on its first call: the head hands the forward a *probe*, a ``[1, ..., 1, V]``
row of known logits, and the tensor that reaches ``loss_function`` must be the probe through the
post-processing the config describes (:func:`check_post_processing`); anything else, a slice of the
vocabulary, a bias, a scale the config does not state, is refused by the model's name.

A ``model_type`` absent from :data:`FAMILIES` is accepted too: its post-processing is read from the
attributes of :data:`POST_PROCESSING` that its (text) config sets, and the same first-forward check
refuses it if its forward does something else with the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _validation as V
from .._rows import compute_dtype
from ..transforms import Softcap, Temperature

#: Config attributes through which families post-process their logits, and what each one does.
#: ``softcap``: ``cap * tanh(z / cap)``; ``multiply``: ``z * value``; ``divide``: ``z / value``.
POST_PROCESSING = {
    "final_logit_softcapping": "softcap",  # Gemma 2, Gemma 3
    "logit_scale": "multiply",  # Cohere
    "logits_scaling": "divide",  # Granite
}

#: ``model_type`` -> the post-processing attributes its causal-LM forward applies, in order: the families
#: whose post-processing is declared rather than read from the config. Every family here has a test
#: (a tiny random model, patched against stock: loss and every gradient).
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": (),
    "mistral": (),
    "mixtral": (),
    "qwen2": (),
    "qwen2_moe": (),
    "qwen3": (),
    "qwen3_moe": (),
    "gemma": (),
    "gemma2": ("final_logit_softcapping",),
    "gemma3_text": ("final_logit_softcapping",),
    "phi3": (),
    "olmo2": (),
    "granite": ("logits_scaling",),
    "cohere": ("logit_scale",),
    "gpt2": (),
    "gpt_neox": (),
    # Multimodal Gemma 3: its forward does not apply text_config.final_logit_softcapping, which an
    # undeclared family's would (as Gemma 3n's and Gemma 4's do).
    "gemma3": (),
    # Divides the hidden states (not the logits) by config.logits_scaling: the head's input is already scaled.
    "minicpm3": (),
}


class UnsupportedModel(ValueError):
    """A model whose head crossent cannot reproduce exactly."""


def register_family(model_type: str, *post_processing: str) -> None:
    """Declare that ``model_type``'s causal-LM forward follows the pattern of this module.

    ``post_processing``: the config attributes (keys of :data:`POST_PROCESSING`) its forward applies to
    the logits, in order. The first patched forward checks the declaration against the model.
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"model_type must be a non-empty string, got {model_type!r}")
    unknown = [p for p in post_processing if p not in POST_PROCESSING]
    if unknown:
        raise ValueError(
            f"unknown post-processing {unknown}; crossent reproduces {sorted(POST_PROCESSING)} "
            "(a new kind of post-processing is a new entry of POST_PROCESSING and a LogitMap step)"
        )
    FAMILIES[model_type] = tuple(post_processing)


@dataclass(frozen=True)
class LogitMap:
    """``z -> cap * tanh(scale * z / cap)`` (``softcap=None``: ``scale * z``): a family's post-processing."""

    scale: float = 1.0
    softcap: float | None = None

    def transforms(self) -> tuple:
        """The crossent transforms of the map, in the order they apply."""
        out = []
        if self.scale != 1.0:
            out.append(Temperature(1.0 / self.scale))
        if self.softcap is not None:
            out.append(Softcap(self.softcap))
        return tuple(out)

    def __call__(self, z: Tensor) -> Tensor:
        z = z * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def __str__(self) -> str:
        z = "z" if self.scale == 1.0 else f"{self.scale:g} * z"
        return z if self.softcap is None else f"{self.softcap:g} * tanh({z} / {self.softcap:g})"


def post_processing(model_type: str, config) -> tuple[str, ...]:
    """The post-processing attributes of ``model_type``: declared in :data:`FAMILIES`, or else those of
    :data:`POST_PROCESSING` that ``config`` sets (scales before a soft cap, the order of every family
    transformers has). The first patched forward checks either against the model."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    config = _text_config(config)
    present = [a for a in POST_PROCESSING if getattr(config, a, None) is not None]
    return tuple(sorted(present, key=lambda a: POST_PROCESSING[a] == "softcap"))


def _text_config(config):
    """The config that holds the language model's settings (a multimodal config keeps them in a sub-config)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def logit_map(model_type: str, config, who: str) -> LogitMap:
    """The post-processing of ``model_type``, with the values of ``config``."""
    attributes = post_processing(model_type, config)
    config = _text_config(config)
    scale, cap = 1.0, None
    for attribute in attributes:
        value = getattr(config, attribute, None)
        if value is None:
            continue
        kind = POST_PROCESSING[attribute]
        value = V.positive(f"config.{attribute}", value, who=who)
        if kind == "softcap":
            if cap is not None:
                raise UnsupportedModel(f"{who}: two soft-capping steps cannot be reproduced")
            cap = value
        elif cap is not None:
            raise UnsupportedModel(f"{who}: a scale after the soft-capping ({attribute}) cannot be reproduced")
        else:
            scale = scale * value if kind == "multiply" else scale / value
    return LogitMap(scale, cap)


#: The probe's logits span [-PROBE_RANGE, PROBE_RANGE]: soft caps and scales show in that range.
PROBE_RANGE = 64.0


def probe(num_classes: int, lead_dims: int, dtype: torch.dtype, device) -> Tensor:
    """A ``[1, ..., 1, V]`` row of known logits, standing for the head's output in a patched forward."""
    values = torch.linspace(-PROBE_RANGE, PROBE_RANGE, num_classes, dtype=compute_dtype(dtype), device=device)
    return values.reshape((1,) * lead_dims + (num_classes,))


def check_post_processing(who: str, expected: LogitMap, sent: Tensor, received) -> None:
    """Refuse, by name, a forward whose post-processing of the probe ``sent`` is not ``expected``."""
    problem = None
    if not isinstance(received, Tensor):
        problem = f"a {type(received).__name__}"
    elif received.shape[-1:] != sent.shape[-1:] or received.numel() != sent.numel():
        problem = f"a tensor of shape {tuple(received.shape)} (the vocabulary was cut or reshaped)"
    else:
        want = expected(sent.double()).reshape(-1)
        got = received.detach().double().reshape(-1).to(want.device)
        if torch.compiler.is_compiling():
            # Reading the comparison back would be a data-dependent branch, which a graph cannot hold: under
            # torch.compile the check is an assert of the graph (torch.allclose's test, as tensors).
            tol = 1e-5 * want.abs().max().clamp_min(1.0)
            torch._assert_async(
                ((got - want).abs() <= tol + 1e-5 * want.abs()).all(),
                who + ": the forward post-processes the head's logits differently from what its config states; "
                "crossent cannot reproduce this head (call the model once outside torch.compile for the details)",
            )
            return
        tol = 1e-5 * max(1.0, want.abs().max().item())
        if not torch.allclose(got, want, rtol=1e-5, atol=tol):
            worst = int((got - want).abs().argmax())
            problem = (
                f"other logits: logit {sent.reshape(-1)[worst].item():g} became {got[worst].item():g}, "
                f"expected {want[worst].item():g}"
            )
    if problem is not None:
        raise UnsupportedModel(
            f"{who}: the forward post-processes the head's logits differently from what its config states "
            f"({expected}): loss_function received {problem}. crossent cannot reproduce this head; "
            "call crossent.integrations.transformers.undo(model) and train it unpatched"
        )


__all__ = ["FAMILIES", "POST_PROCESSING", "LogitMap", "UnsupportedModel", "check_post_processing", "logit_map",
           "post_processing", "probe", "register_family"]  # fmt: skip
