"""crossent: cross-entropy and every loss built on it, for PyTorch.

A loss is a small formula over per-row statistics of the logits; engines compute those statistics
from a logit tensor (:func:`cross_entropy`) or without ever materialising it
(:func:`linear_cross_entropy`).
"""

from . import contrastive, losses, nn, sets, stats, targets, transforms, weighting
from ._distillation import distillation, linear_distillation
from ._engine.options import LinearCrossEntropyOptions, default_chunk_size
from ._functional import cross_entropy
from ._linear import linear_cross_entropy
from ._linear_call import LinearStats
from ._log_probs import TokenLogProbs, linear_log_probs
from .policy import grpo_loss, linear_grpo_loss
from .preference import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    linear_cpo_loss,
    linear_dpo_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_simpo_loss,
    orpo_loss,
    simpo_loss,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "linear_log_probs",
    "TokenLogProbs",
    "grpo_loss",
    "linear_grpo_loss",
    "dpo_loss",
    "linear_dpo_loss",
    "simpo_loss",
    "linear_simpo_loss",
    "cpo_loss",
    "linear_cpo_loss",
    "orpo_loss",
    "linear_orpo_loss",
    "kto_loss",
    "linear_kto_loss",
    "policy",
    "preference",
    "distillation",
    "linear_distillation",
    "LinearStats",
    "LinearCrossEntropyOptions",
    "default_chunk_size",
    "contrastive",
    "losses",
    "nn",
    "sets",
    "stats",
    "targets",
    "transforms",
    "weighting",
    "__version__",
]


def __getattr__(name):
    # Submodules with optional or heavier imports load on first use.
    if name in ("distributed", "calibration", "adversarial"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
