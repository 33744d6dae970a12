"""Elementwise logit transforms applied before the statistics.

A transform maps each logit ``z_j`` to ``f(z_j)`` (possibly depending on whether ``j`` is the target)
and states its elementwise derivative, so that every engine can chain it into the gradient without
autograd over the whole logit matrix.

A transform may also declare its structure (:meth:`Transform.structure`): :class:`Affine` (``z_j s + t_j``
with a scalar scale and a per-class shift), :class:`Tanh` (``cap tanh(z / cap)``) or :class:`Circle`
(the target-aware circle margin). Fused engines read the declaration (an affine chain folds into row
sums and row factors; a kernel applies any of them on chip); a transform that declares nothing takes
the generic path of every engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass

from . import _validation as V
from ._rows import Rows, onehot_mask


@dataclass(frozen=True)
class Affine:
    """``z_j -> scale * z_j + shift_j``: a scalar scale and an optional ``[C]`` shift."""

    scale: float = 1.0
    shift: Tensor | None = None

    def then(self, other: Affine) -> Affine:
        """This map followed by ``other`` (a composed shift is held in float64, like the statistics)."""
        shift = None if self.shift is None else self.shift.double() * other.scale
        if other.shift is not None:
            shift = other.shift if shift is None else shift + other.shift.double()
        return Affine(self.scale * other.scale, shift)

    def apply_(self, z: Tensor, cols: slice) -> Tensor:
        """In place on a block of columns ``cols``."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.shift is not None:
            z.add_(self.shift[cols].to(device=z.device, dtype=z.dtype))
        return z

    def at(self, z: Tensor, cols: Tensor) -> Tensor:
        """Values ``z`` of the columns ``cols`` (an index tensor of the same shape), mapped."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.shift is not None:
            z = z + self.shift.to(device=z.device, dtype=z.dtype)[cols]
        return z

    def of_sums(self, sums: Tensor, w: Tensor | None, num_classes: int) -> Tensor:
        """``sum_j w_j f(z)_j`` from ``sum_j w_j z_j`` (``w = None``: ones), in ``sums``' dtype."""
        out = sums * self.scale if self.scale != 1.0 else sums
        if self.shift is not None:
            shift = self.shift.to(device=sums.device, dtype=sums.dtype)
            out = out + (shift.sum() if w is None else w.to(sums.dtype) @ shift)
        return out


@dataclass(frozen=True)
class Tanh:
    """``z_j -> cap * tanh(z_j / cap)``."""

    cap: float


@dataclass(frozen=True)
class Circle:
    """The class-level circle margin, target-aware with detached weights (:class:`CircleMargin`).

    ``z_y -> gamma a_p (z_y - (1 - m))`` with ``a_p = [1 + m - z_y]_+``, ``z_j -> gamma a_n (z_j - m)``
    with ``a_n = [z_j + m]_+`` (``j != y``); the derivative is ``gamma a_p`` or ``gamma a_n``.
    """

    m: float
    gamma: float


class Transform:
    """Base class. ``forward`` uses differentiable torch ops (it doubles as the autograd reference)."""

    @property
    def key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Transform) and self.key == other.key

    def __hash__(self) -> int:
        return V.key_hash(self.key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key[1:]}"

    def forward(self, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        raise NotImplementedError

    def backward_(self, grad: Tensor, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        """Turn ``dL/df(z)`` into ``dL/dz`` in place (``z`` is this transform's input)."""
        raise NotImplementedError

    def structure(self) -> Affine | Tanh | Circle | None:
        """The declared structure (``None``: a general elementwise map)."""
        return None

    def check(self, num_classes: int) -> None:
        """Raise ``ValueError`` if the transform cannot apply to rows of ``num_classes`` logits."""

    def extra_inputs(self) -> tuple[str, ...]:
        """The keys of ``extra`` that every call must pass for this transform (see ``Loss.extra_inputs``)."""
        return ()


class Softcap(Transform):
    """``cap * tanh(z / cap)`` (Gemma 2 style logit soft-capping)."""

    def __init__(self, cap: float):
        # Finite: the entry points read softcap=math.inf as "no capping" and build no transform.
        self.cap = V.positive("softcap", cap)

    @property
    def key(self):
        return ("Softcap", self.cap)

    def forward(self, z, rows, cols):
        return torch.tanh(z / self.cap) * self.cap

    def backward_(self, grad, z, rows, cols):
        t = torch.tanh(z / self.cap)
        return grad.mul_(1 - t * t)

    def structure(self):
        return Tanh(self.cap)


class Temperature(Transform):
    """``z / T``."""

    def __init__(self, temperature: float):
        self.temperature = V.positive("temperature", temperature)

    @property
    def key(self):
        return ("Temperature", self.temperature)

    def forward(self, z, rows, cols):
        return z / self.temperature

    def backward_(self, grad, z, rows, cols):
        return grad.div_(self.temperature)

    def structure(self):
        return Affine(1.0 / self.temperature)


def head_transforms(softcap: float | None, temperature: float = 1.0) -> tuple[Transform, ...]:
    """The entry points' logit transforms, in the order samplers apply them: ``softcap`` (checked
    already: ``None`` is no capping), then division by ``temperature`` (1: none)."""
    capped = (Softcap(softcap),) if softcap is not None else ()
    return capped + ((Temperature(temperature),) if temperature != 1.0 else ())


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

    def check(self, num_classes):
        if self.bias.shape[0] != num_classes:
            raise ValueError(f"class bias has {self.bias.shape[0]} entries but the logits have {num_classes} classes")

    def forward(self, z, rows, cols):
        self.check(rows.num_classes)
        return z + self.bias[cols].to(device=z.device, dtype=z.dtype)

    def backward_(self, grad, z, rows, cols):
        return grad

    def structure(self):
        return Affine(1.0, self.bias)


class CircleMargin(Transform):
    r"""Class-level circle-loss reweighting of cosine logits (target-aware, elementwise).

    .. math::

        s_y \mapsto \gamma\, a_p (s_y - (1 - m)), \quad a_p = [1 + m - \mathrm{sg}(s_y)]_+ ;\qquad
        s_k \mapsto \gamma\, a_n (s_k - m), \quad a_n = [\mathrm{sg}(s_k) + m]_+ \ (k \ne y)

    The weights :math:`a_p, a_n` are detached, so the derivative is :math:`\gamma a_p` (target) or
    :math:`\gamma a_n` (others).
    """

    def __init__(self, m: float = 0.25, gamma: float = 256.0):
        self.m = float(m)
        self.gamma = float(gamma)

    @property
    def key(self):
        return ("CircleMargin", self.m, self.gamma)

    def _is_target(self, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        local, inside = onehot_mask(rows, cols, z.shape[-1])
        mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        if z.shape[-1]:
            mask.scatter_(-1, local[:, None], inside[:, None])
        return mask

    def _weights(self, z: Tensor, is_target: Tensor) -> Tensor:
        zd = z.detach()
        return torch.where(is_target, (1 + self.m - zd).clamp(min=0), (zd + self.m).clamp(min=0)) * self.gamma

    def forward(self, z, rows, cols):
        is_target = self._is_target(z, rows, cols)
        # Built in z's dtype: torch.where on Python scalars would round the shift to float32.
        shift = is_target.to(z.dtype) * (1.0 - 2.0 * self.m) + self.m
        return self._weights(z, is_target) * (z - shift)

    def backward_(self, grad, z, rows, cols):
        return grad.mul_(self._weights(z, self._is_target(z, rows, cols)))

    def structure(self):
        return Circle(self.m, self.gamma)


class ExcludeColumns(Transform):
    r"""Per-row excluded classes: :math:`z_{ij} \mapsto -\infty` for every ``j`` in ``rows.extra[name][i]``.

    ``rows.extra[name]`` is ``[N, K]`` int64, one row's excluded class indices padded with negative
    values. An excluded logit drops out of the softmax (probability 0) and gets no gradient: the
    false negatives of contrastive losses, excluded by index without a ``[N, C]`` mask. A row's
    target must not be excluded. Declares no structure (the generic path of every engine).
    """

    def __init__(self, name: str = "exclude"):
        self.name = name

    @property
    def key(self):
        return ("ExcludeColumns", self.name)

    def extra_inputs(self):
        return (self.name,)

    def _positions(self, z: Tensor, rows: Rows, cols: slice) -> tuple[Tensor, Tensor]:
        index = rows.extra.get(self.name)
        if index is None:
            raise ValueError(f"ExcludeColumns needs the excluded classes in extra[{self.name!r}]")
        local = index - cols.start
        keep = (index >= 0) & (local >= 0) & (local < z.shape[-1])
        i, k = keep.nonzero(as_tuple=True)
        return i, local[i, k]

    def forward(self, z, rows, cols):
        return z.index_put(self._positions(z, rows, cols), z.new_full((), float("-inf")))

    def backward_(self, grad, z, rows, cols):
        return grad.index_put_(self._positions(z, rows, cols), grad.new_zeros(()))


def affine_chain(transforms) -> Affine | None:
    """The composition of ``transforms`` when every one declares :class:`Affine`, else ``None``."""
    out = Affine()
    for t in transforms:
        s = t.structure()
        if not isinstance(s, Affine):
            return None
        out = out.then(s)
    return out


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


__all__ = [
    "Transform", "Affine", "Tanh", "Circle", "Softcap", "Temperature", "ClassBias", "CircleMargin",
    "ExcludeColumns",
    "affine_chain", "apply_all", "backward_all", "head_transforms",
]  # fmt: skip
