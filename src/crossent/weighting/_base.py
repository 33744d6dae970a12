"""The contract every reweighting strategy follows, and the argument checks they share.

A strategy turns per-row losses (from any crossent engine with ``reduction="none"``, or from anywhere)
plus whatever else it needs (targets, domain ids, model probabilities, feature maps) into weights:

* ``weights(losses, **inputs)`` returns the detached per-row weights that ``__call__`` would apply to
  this batch, *without* changing any state (random strategies draw from a copy of their generator's
  state, so ``weights`` followed by ``__call__`` sees the same draw);
* ``__call__(losses, **inputs)`` returns the reweighted scalar loss, differentiable with respect to
  ``losses``, and advances the state (step counter, domain weights, running minimum, generator);
* ``state_dict()`` / ``load_state_dict(state)`` save and restore that state (empty for stateless ones).

Multi-label losses have one value per example and class: a multi-label strategy
(:class:`~crossent.weighting.DynamicClassWeights`) takes those elementwise ``[..., C]`` losses and its
``weights`` returns one weight per element, with the same contract otherwise.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


class Strategy:
    """Base class of the reweighting strategies (see the module docstring for the contract)."""

    def weights(self, losses: Tensor, **inputs) -> Tensor:
        raise NotImplementedError

    def __call__(self, losses: Tensor, **inputs) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The state to checkpoint (a dict of tensors and numbers); empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; got state keys {sorted(state)}")

    def _repr_args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"


def check_losses(losses, who: str, *, dim: int | None = None) -> Tensor:
    """``losses`` must be a floating tensor (of ``dim`` dimensions when given)."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"{who}: losses must be a tensor of per-row losses, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"{who}: losses must be floating point, got {losses.dtype}")
    if dim is not None and losses.dim() != dim:
        shape = "[N]" if dim == 1 else f"{dim}-D"
        raise ValueError(f"{who}: losses must be {shape}, got shape {tuple(losses.shape)}")
    return losses


def check_same_shape(name: str, value, like: Tensor, who: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"{who}: {name} must have the shape of losses {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


def check_mask(mask, like: Tensor, who: str) -> Tensor:
    """A boolean mask with the shape of ``like`` (all true when ``None``)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    mask = check_same_shape("mask", mask, like, who)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{who}: mask must hold 0/1 or booleans")
        mask = mask != 0
    return mask


def check_vector(value, name: str, who: str, *, length: int | None = None, positive: bool = False) -> Tensor:
    """A finite, non-negative (or positive) 1-D float64 tensor, from a tensor or a sequence."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{who}: {name} must be a 1-D tensor or sequence of numbers") from err
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{who}: {name} must hold real numbers, got {value.dtype}")
    value = value.detach().to(torch.float64)
    if value.dim() != 1 or value.numel() == 0:
        raise ValueError(f"{who}: {name} must be a non-empty 1-D vector, got shape {tuple(value.shape)}")
    if length is not None and value.numel() != length:
        raise ValueError(f"{who}: {name} must have {length} entries, got {value.numel()}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{who}: {name} must be finite")
    bad = (value <= 0) if positive else (value < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{who}: {name} must be {kind}; {name}[{i}] = {value[i].item()}")
    return value


def check_index_tensor(value, name: str, who: str, *, like: Tensor | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{who}: {name} must be an integer tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{who}: {name} must hold integer indices, got {value.dtype}")
    if like is not None and value.shape != like.shape:
        raise ValueError(f"{who}: {name} must have the shape of losses {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


def check_probabilities(probs, logits, who: str, *, rows: int, num_classes: int) -> Tensor:
    """Detached ``[N, C]`` probabilities from exactly one of ``probs`` / ``logits`` (softmax taken)."""
    if (probs is None) == (logits is None):
        raise ValueError(f"{who}: pass exactly one of probs= (model probabilities) or logits=")
    value = probs if probs is not None else logits
    name = "probs" if probs is not None else "logits"
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating-point [N, C] tensor")
    if value.dim() != 2 or value.shape != (rows, num_classes):
        raise ValueError(
            f"{who}: {name} must have shape [{rows}, {num_classes}] (rows x classes of T), got {tuple(value.shape)}"
        )
    value = value.detach()
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    if logits is not None:
        return torch.softmax(value, dim=-1)
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{who}: probs must be finite and non-negative")
    return value


def check_step_count(state: dict, key: str, who: str, *, minimum: int) -> int:
    """``state[key]`` as a step count (an int, or an integer-valued number or tensor) of at least ``minimum``."""
    value = state[key]
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value != int(value) or value < minimum:
        raise ValueError(f"{who}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)
