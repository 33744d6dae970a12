"""Elementwise logit transforms applied before the statistics.

A transform maps each logit ``z_j`` to ``f(z_j)`` (possibly depending on whether ``j`` is the target)
and states its elementwise derivative, so that every engine can chain it into the gradient without
autograd over the whole logit matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rows import Rows


class Transform:
    """Base class. ``forward`` uses differentiable torch ops (it doubles as the autograd reference)."""

    @property
    def key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Transform) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key[1:]}"

    def forward(self, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        raise NotImplementedError

    def backward_(self, grad: Tensor, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        """Turn ``dL/df(z)`` into ``dL/dz`` in place (``z`` is this transform's input)."""
        raise NotImplementedError


class Softcap(Transform):
    """``cap * tanh(z / cap)`` (Gemma 2 style logit soft-capping)."""

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"softcap must be > 0, got {cap}")
        self.cap = float(cap)

    @property
    def key(self):
        return ("Softcap", self.cap)

    def forward(self, z, rows, cols):
        return torch.tanh(z / self.cap) * self.cap

    def backward_(self, grad, z, rows, cols):
        t = torch.tanh(z / self.cap)
        return grad.mul_(1 - t * t)


class Temperature(Transform):
    """``z / T``."""

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @property
    def key(self):
        return ("Temperature", self.temperature)

    def forward(self, z, rows, cols):
        return z / self.temperature

    def backward_(self, grad, z, rows, cols):
        return grad.div_(self.temperature)


class ClassBias(Transform):
    """``z_j + b_j`` with a fixed per-class vector ``b`` (e.g. logit adjustment ``tau * log prior``)."""

    def __init__(self, bias: Tensor):
        bias = torch.as_tensor(bias)
        if bias.dim() != 1:
            raise ValueError(f"class bias must be a 1-D tensor of length C, got shape {tuple(bias.shape)}")
        self.bias = bias.detach()

    @property
    def key(self):
        return ("ClassBias", id(self.bias))

    def forward(self, z, rows, cols):
        if self.bias.shape[0] != rows.num_classes:
            raise ValueError(f"class bias has {self.bias.shape[0]} entries but the logits have {rows.num_classes} classes")
        return z + self.bias[cols].to(device=z.device, dtype=z.dtype)

    def backward_(self, grad, z, rows, cols):
        return grad


def apply_all(transforms, z: Tensor, rows: Rows, cols: slice) -> Tensor:
    for t in transforms:
        z = t.forward(z, rows, cols)
    return z


def backward_all(transforms, grad: Tensor, z: Tensor, rows: Rows, cols: slice) -> Tensor:
    """Chain ``grad`` (w.r.t. the last output) back to the raw logits ``z``."""
    if not transforms:
        return grad
    inputs = [z]
    for t in transforms[:-1]:
        inputs.append(t.forward(inputs[-1], rows, cols))
    for t, x in zip(reversed(transforms), reversed(inputs)):
        grad = t.backward_(grad, x, rows, cols)
    return grad
