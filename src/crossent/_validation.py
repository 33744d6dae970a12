"""Every argument check of the library, in one place: one clear message per mistake.

Hyperparameters (``real``, ``positive``, ``non_negative``, ``count``, ``class_vector``) take an
optional ``who`` (the loss or function name) that prefixes the message. Tensor arguments of the
entry points (``check_class_weight``, ``check_index_target``, ``flatten_extra``) name the argument,
the offending value and its position.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._engine.reduction import REDUCTIONS


def _prefix(who: str | None) -> str:
    return f"{who}: " if who else ""


def real(who: str | None, name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a finite float, or a ``TypeError``/``ValueError`` naming ``who``, ``name`` and the bound.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. A one-element floating tensor is
    accepted as a number.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(who)}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_prefix(who)}{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        raise ValueError(f"{_prefix(who)}{name} must be in {opening}{left}, {right}{closing}, got {value:g}")
    return value


def positive(name: str, value, *, who: str | None = None) -> float:
    value = real(who, name, value)
    if not value > 0:
        raise ValueError(f"{_prefix(who)}{name} must be > 0, got {value}")
    return value


def non_negative(name: str, value, *, who: str | None = None) -> float:
    value = real(who, name, value)
    if value < 0:
        raise ValueError(f"{_prefix(who)}{name} must be >= 0, got {value}")
    return value


def count(name: str, value, minimum: int = 1, *, who: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_prefix(who)}{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{_prefix(who)}{name} must be >= {minimum}, got {value}")
    return int(value)


def class_vector(who: str, name: str, value) -> Tensor:
    """A 1-D, finite, non-negative per-class tensor (a sequence of numbers is accepted too)."""
    if isinstance(value, (numbers.Real, bool)) and not isinstance(value, Tensor):
        raise TypeError(
            f"{who}: {name} must be a 1-D tensor with one entry per class, got the scalar {value!r} "
            "(to scale the whole loss, multiply the loss object by a number)"
        )
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{who}: {name} must be a 1-D tensor with one entry per class, got {type(value).__name__}") from None
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"{who}: {name} must be a non-empty 1-D tensor with one entry per class, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{who}: {name} must be finite")
    if (t < 0).any():
        bad = int((t < 0).nonzero()[0, 0])
        raise ValueError(f"{who}: {name} must be non-negative; {name}[{bad}] = {t[bad].item():g}")
    return t.detach()


def check_length(who: str, name: str, vector: Tensor, num_classes: int) -> None:
    if vector.shape[0] != num_classes:
        raise ValueError(f"{who}: {name} has {vector.shape[0]} entries but the logits have {num_classes} classes")


def at_least_classes(who: str, num_classes: int, minimum: int = 2) -> None:
    if num_classes < minimum:
        raise ValueError(f"{who} needs at least {minimum} classes, got {num_classes}")


# -- arguments of the entry points ------------------------------------------------------------------


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_class_weight(weight: Tensor | None, num_classes: int, device, dtype) -> Tensor | None:
    """PyTorch's ``weight``: ``[C]`` floating point and finite; returned detached in ``dtype``."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(f"weight must be a 1-D tensor of {num_classes} class weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if (weight < 0).any():
        bad = int((weight < 0).nonzero()[0, 0])
        raise ValueError(f"weight must be non-negative; weight[{bad}] = {weight[bad].item()}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite")
    return weight.detach().to(device=device, dtype=dtype)


def check_index_target(target: Tensor, num_classes: int, ignore_index: int, shape_for_errors) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, C)`` that is not ``ignore_index``."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape_for_errors)))
        value = int(target.reshape(-1)[flat])
        where = pos[0] if len(pos) == 1 else pos
        raise ValueError(
            f"target value {value} at position {where} is outside the valid class range [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


def flatten_extra(extra: dict | None, row_shape) -> dict:
    """Per-row extra tensors reshaped from ``row_shape + trailing`` to ``[N] + trailing``."""
    if not extra:
        return {}
    n = math.prod(row_shape)
    out = {}
    for key, value in extra.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"extra[{key!r}] must be a tensor, got {type(value).__name__}")
        lead = tuple(value.shape[: len(row_shape)])
        if lead != tuple(row_shape):
            raise ValueError(f"extra[{key!r}] must start with the target's shape {tuple(row_shape)}, got {tuple(value.shape)}")
        out[key] = value.reshape(n, *value.shape[len(row_shape) :])
    return out


def check_loss_accepts(loss, rows) -> None:
    if not rows.has_indices and not loss.accepts_probs:
        raise ValueError(f"loss {loss!r} needs class-index targets; it does not accept class probabilities")
