"""Argument checks, target preparation and reductions shared by every public entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from .losses.base import Loss, resolve
from .losses.basic import CrossEntropy, ZLoss
from .rows import Rows

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def build_loss(loss, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> Loss:
    """The loss object for the ``loss`` / ``label_smoothing`` / ``z_loss`` arguments."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if label_smoothing:
        if loss == "ce":
            loss = CrossEntropy(label_smoothing=label_smoothing)
        elif isinstance(loss, CrossEntropy) and not loss.label_smoothing:
            loss = CrossEntropy(label_smoothing=label_smoothing)
        else:
            raise ValueError(
                "label_smoothing= applies to loss='ce'; for other losses set the loss's own "
                "hyperparameters (e.g. xe.losses.get('poly1', ...))"
            )
    loss = resolve(loss)
    if z_loss:
        if float(z_loss) < 0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss}")
        loss = loss + ZLoss(float(z_loss))
    return loss


def check_class_weight(weight: Tensor | None, num_classes: int, device, dtype) -> Tensor | None:
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
    out = {}
    n = 1
    for d in row_shape:
        n *= d
    for key, value in extra.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"extra[{key!r}] must be a tensor, got {type(value).__name__}")
        lead = tuple(value.shape[: len(row_shape)])
        if lead != tuple(row_shape):
            raise ValueError(f"extra[{key!r}] must start with the target's shape {tuple(row_shape)}, got {tuple(value.shape)}")
        out[key] = value.reshape(n, *value.shape[len(row_shape) :])
    return out


def index_rows(target: Tensor, num_classes: int, ignore_index: int, class_weight, extra=None) -> Rows:
    """:class:`Rows` for flat ``[N]`` class-index targets (already range-checked)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return Rows(num_classes=num_classes, target=safe, valid=valid, class_weight=class_weight, extra=extra or {})


def prob_rows(probs: Tensor, class_weight, extra=None) -> Rows:
    """:class:`Rows` for flat ``[N, C]`` class-probability targets."""
    valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    return Rows(num_classes=probs.shape[-1], target=None, valid=valid, probs=probs, class_weight=class_weight, extra=extra or {})


def reduce(per_row: Tensor, rows: Rows, reduction: str, out_shape, out_dtype) -> Tensor:
    """PyTorch's reductions; a mean over zero counted rows is 0.0 (PyTorch gives NaN)."""
    if reduction == "none":
        return per_row.reshape(out_shape).to(out_dtype)
    total = per_row.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    if rows.has_indices:
        w = rows.target_weight()
        denom = rows.valid.sum().to(total.dtype) if w is None else torch.where(rows.valid, w, 0).sum().to(total.dtype)
    else:
        denom = total.new_tensor(float(rows.num_rows))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return (total / safe).to(out_dtype)


def check_loss_accepts(loss: Loss, rows: Rows) -> None:
    if not rows.has_indices and not loss.accepts_probs:
        raise ValueError(f"loss {loss!r} needs class-index targets; it does not accept class probabilities")
