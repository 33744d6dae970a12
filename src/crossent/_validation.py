"""Every argument check of the library, in one place: one clear message per mistake.

Hyperparameters (``real``, ``positive``, ``non_negative``, ``count``, ``class_vector``) take an
optional ``who`` (the loss or function name) that prefixes the message. Tensor arguments of the
entry points (``check_class_weight``, ``check_index_target``, ``flatten_extra``) name the argument,
the offending value and its position.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Callable

import torch
from torch import Tensor

#: The values of every ``reduction`` argument, in PyTorch's order.
REDUCTIONS = ("none", "mean", "sum")


def _prefix(who: str | None) -> str:
    return f"{who}: " if who else ""


#: The largest finite float. ``-LARGEST <= x <= LARGEST`` is ``math.isfinite(x)``, written as comparisons
#: so that it also holds for a float that ``torch.compile`` traces symbolically (a hyperparameter that
#: changes between calls): ``math.isfinite`` cannot be traced, and a comparison with ``math.inf`` is
#: folded away (the compiler takes a symbolic float to be finite), where one with ``LARGEST`` is kept as
#: a guard that an infinite or NaN value fails.
LARGEST = sys.float_info.max


def is_finite(value) -> bool:
    """``math.isfinite(value)`` for a Python number, traceable by ``torch.compile`` (:data:`LARGEST`)."""
    return -LARGEST <= value <= LARGEST


def key_hash(key: tuple) -> int:
    """The hash of a statistic's or transform's ``key`` (its type name and hyperparameters), leaving its
    floats out: hashing a float that ``torch.compile`` traces symbolically would specialise the compiled
    graph to that value. Equal keys still hash equal; ``__eq__`` compares the floats."""
    return hash(tuple(part for part in key if not isinstance(part, float)))


def shown(value) -> str:
    """``", got <value>"`` for an error message; empty while ``torch.compile`` traces, which cannot format
    a symbolic float (the compiler's error carries the rest of the message and the failing line)."""
    return "" if torch.compiler.is_compiling() else f", got {value:g}"


def real(who: str | None, name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a finite float, or a ``TypeError``/``ValueError`` naming ``who``, ``name`` and the bound.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. A one-element floating tensor is
    accepted as a number. Under ``torch.compile`` a float that changes between calls stays symbolic:
    the checks become guards of the compiled graph (no recompilation per value), and a value that
    fails one raises as in eager mode.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(who)}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not is_finite(value):
        raise ValueError(f"{_prefix(who)}{name} must be finite{shown(value)}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        raise ValueError(f"{_prefix(who)}{name} must be in {opening}{left}, {right}{closing}{shown(value)}")
    return value


def positive(name: str, value, *, who: str | None = None) -> float:
    value = real(who, name, value)
    if not value > 0:
        raise ValueError(f"{_prefix(who)}{name} must be > 0{shown(value)}")
    return value


def non_negative(name: str, value, *, who: str | None = None) -> float:
    value = real(who, name, value)
    if value < 0:
        raise ValueError(f"{_prefix(who)}{name} must be >= 0{shown(value)}")
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


def data_check(bad: Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(detail())`` if the bool tensor ``bad`` has a true entry.

    Reading ``bad`` synchronises with the device, so the check runs here only for CPU tensors outside
    ``torch.compile``. On an accelerator, and while compiling, it becomes an asynchronous device
    assert that fails with ``message`` when the kernel runs; 'meta' tensors hold no data and are
    not checked.
    """
    if bad.device.type == "meta":
        return
    if torch.compiler.is_compiling() or bad.device.type != "cpu":
        torch._assert_async(torch.logical_not(bad.any()), message)
        return
    if bad.any():
        raise ValueError(detail() if detail is not None else message)


def check_class_weight(weight: Tensor | None, num_classes: int, device, dtype) -> Tensor | None:
    """PyTorch's ``weight``: ``[C]``, floating point, finite, of any sign; returned detached in ``dtype``."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        looks_like_a_loss = isinstance(weight, str) or hasattr(weight, "row_loss")
        hint = "; the loss is a keyword argument: pass the loss by keyword (loss=...)" if looks_like_a_loss else ""
        raise TypeError(f"weight must be a tensor of class weights, got {type(weight).__name__}{hint}")
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(f"weight must be a 1-D tensor of {num_classes} class weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    bad = ~torch.isfinite(weight.detach())

    def detail() -> str:
        i = _first(bad)
        return f"weight must be finite; weight[{i}] = {weight[i].item()}"

    data_check(bad, "weight must be finite", detail)
    return weight.detach().to(device=device, dtype=dtype)


def index_target(target: Tensor, expected: str = "integer class indices or float probabilities") -> Tensor:
    """A class-index target as int64: any integer dtype (unsigned ones converted without wrapping
    around, so ``ignore_index=-100`` never matches a ``uint8`` class); bool and complex are refused."""
    if target.dtype == torch.bool or target.is_complex() or target.is_floating_point():
        raise TypeError(f"target must hold {expected}, got {target.dtype}")
    return target if target.dtype == torch.int64 else target.long()


def check_index_target(target: Tensor, num_classes: int, ignore_index: int, shape_for_errors) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, C)`` that is not ``ignore_index``
    (an asynchronous device assert off the CPU: :func:`data_check`)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    rule = f"target values must be in [0, {num_classes}) or equal ignore_index ({ignore_index})"

    def detail() -> str:
        flat = _first(bad.reshape(-1))
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape_for_errors)))
        value = int(target.reshape(-1)[flat])
        where = pos[0] if len(pos) == 1 else pos
        return (
            f"target value {value} at position {where} is outside the valid class range [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )

    data_check(bad, rule, detail)


def _first(bad: Tensor) -> int:
    return int(bad.reshape(-1).nonzero()[0, 0])


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    return int(ignore_index)


def check_softcap(softcap) -> float | None:
    """``softcap`` as a finite positive float, or ``None`` for no capping (``None`` or ``math.inf``:
    ``cap tanh(z / cap)`` tends to ``z`` as the cap grows)."""
    if softcap is None:
        return None
    if isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) and float(softcap) == math.inf:
        return None
    return positive("softcap", softcap)


def check_temperature(temperature) -> float:
    """``temperature`` as a finite positive float (1.0: the logits as they are)."""
    value = positive("temperature", temperature)
    if not is_finite(value):
        raise ValueError(f"temperature must be finite{shown(value)}")
    return value


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
