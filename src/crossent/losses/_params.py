"""Hyperparameter checks shared by the loss families: one clear message per mistake."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def real(loss: str, name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a finite float, or a ``TypeError``/``ValueError`` naming the loss and the bound.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{loss}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{loss}: {name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"{loss}: {name} must be in {interval}, got {value:g}")
    return value


def class_vector(loss: str, name: str, value) -> Tensor:
    """A 1-D, finite, non-negative per-class tensor (a sequence of numbers is accepted too)."""
    if isinstance(value, (numbers.Real, bool)) and not isinstance(value, Tensor):
        raise TypeError(
            f"{loss}: {name} must be a 1-D tensor with one entry per class, got the scalar {value!r} "
            "(to scale the whole loss, multiply the loss object by a number)"
        )
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{loss}: {name} must be a 1-D tensor with one entry per class, got {type(value).__name__}"
        ) from None
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(
            f"{loss}: {name} must be a non-empty 1-D tensor with one entry per class, got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{loss}: {name} must be finite")
    if (t < 0).any():
        bad = int((t < 0).nonzero()[0, 0])
        raise ValueError(f"{loss}: {name} must be non-negative; {name}[{bad}] = {t[bad].item():g}")
    return t.detach()


def check_length(loss: str, name: str, vector: Tensor, num_classes: int) -> None:
    if vector.shape[0] != num_classes:
        raise ValueError(f"{loss}: {name} has {vector.shape[0]} entries but the logits have {num_classes} classes")


def at_least_classes(loss: str, num_classes: int, minimum: int = 2) -> None:
    if num_classes < minimum:
        raise ValueError(f"{loss} needs at least {minimum} classes, got {num_classes}")
