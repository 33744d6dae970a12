"""What the two distillation entry points share: argument checks, the loss, and the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as V
from .._linear_call import check_sample_weight
from .._linear_call import check_target as check_class_indices
from .._linear_call import shifted
from .._rows import Rows, index_rows
from ..losses import CrossEntropy, Loss
from .divergences import make_divergence


def build_loss(divergence: str, *, temperature, beta, gamma, mu, ce_weight, has_target: bool) -> Loss:
    """``divergence + ce_weight * CE`` (CE on the untempered student logits and ``target``)."""
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a name (str), got {type(divergence).__name__}")
    loss = make_divergence(divergence, temperature=temperature, beta=beta, gamma=gamma, mu=mu)
    ce_weight = V.non_negative("ce_weight", ce_weight)
    if ce_weight:
        if not has_target:
            raise ValueError("ce_weight > 0 mixes in cross-entropy on target; pass target")
        loss = loss + ce_weight * CrossEntropy()
    return loss


def checked_loss(
    divergence: str, *, temperature, beta, gamma, mu, ce_weight, ignore_index, reduction, has_target: bool = True
) -> Loss:
    """Every option both entry points share, checked, and the loss they make.

    The module forms (``crossent.nn``) call it at construction with ``has_target=True`` (the target
    comes with each call), so a bad option fails there, with the message the function would give.
    """
    V.check_reduction(reduction)
    V.check_ignore_index(ignore_index)
    return build_loss(
        divergence, temperature=temperature, beta=beta, gamma=gamma, mu=mu, ce_weight=ce_weight, has_target=has_target
    )


def check_target(target: Tensor | None, rows_shape: tuple, device) -> None:
    if target is None:
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor or None, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if tuple(target.shape) != rows_shape:
        raise ValueError(f"target must have shape {rows_shape} (the logits' rows), got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the student is on {device}")


def distillation_rows(
    target: Tensor | None, rows_shape: tuple, num_classes: int, ignore_index: int, shift: bool, device, extra: dict
) -> Rows:
    """:class:`Rows` of every position: ``target`` (ignored rows are skipped), or all rows without one.

    ``shift``: position ``t`` is compared with ``target[..., t + 1]`` and the last position of each
    sequence drops out (student and teacher rows stay where they are). ``extra`` (teacher rows) is
    not shifted.
    """
    if target is None:
        valid = torch.ones(rows_shape, dtype=torch.bool, device=device)
        if shift:
            if valid.dim() == 0 or valid.shape[-1] == 0:
                raise ValueError("shift=True needs a sequence dimension (rows [..., T] with T >= 1)")
            valid[..., -1] = False
        n = valid.numel()
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        return Rows(num_classes=num_classes, target=zeros, valid=valid.reshape(n), extra=extra)
    check_class_indices(target, num_classes, ignore_index, shift)
    if shift:
        target, _ = shifted(target, ignore_index, None)
    return index_rows(target.reshape(-1), num_classes, ignore_index, None, extra)


def row_weights(sample_weight: Tensor | None, rows_shape: tuple, shift: bool, device) -> Tensor | None:
    """``sample_weight`` (one weight per row, ``[...]``) checked and flat (``[N]``), or ``None``.

    Under ``shift`` the weights move with the targets, as ``linear_cross_entropy``'s: position ``t``
    takes ``sample_weight[..., t + 1]`` (the weight of the token it predicts); the last position drops out.
    """
    sample_weight = check_sample_weight(sample_weight, rows_shape, device, rows="the rows'", first="the student")
    if sample_weight is None:
        return None
    if shift and sample_weight.dim() and sample_weight.shape[-1]:
        moved = torch.zeros_like(sample_weight)
        moved[..., :-1] = sample_weight[..., 1:]
        sample_weight = moved
    return sample_weight.reshape(-1)


def per_row(t: Tensor, rows_shape: tuple, shift: bool) -> Tensor:
    """``[N]`` per-row values in the rows' shape (without the last position under ``shift``)."""
    t = t.reshape(rows_shape)
    return t[..., :-1] if shift else t


__all__ = ["build_loss", "check_target", "checked_loss", "distillation_rows", "per_row", "row_weights"]
