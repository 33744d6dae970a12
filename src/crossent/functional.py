"""The dense entry point: ``crossent.cross_entropy``, a drop-in for ``F.cross_entropy`` with any loss."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as V
from ._engine.dense import dense_row_losses
from ._engine.plan import Plan
from ._engine.reduction import reduce
from ._rows import as_float, index_rows, prob_rows
from .losses._build import build_loss
from .transforms import Softcap

__all__ = ["cross_entropy"]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    loss="ce",
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    extra: dict[str, Tensor] | None = None,
) -> Tensor:
    r"""Cross-entropy, or any crossent loss, from logits you already have.

    With the defaults this equals :func:`torch.nn.functional.cross_entropy` (values and gradients), with
    one deliberate difference: ``reduction="mean"`` over zero counted rows (every target ignored, or an
    empty batch) returns ``0.0`` with a zero gradient where PyTorch returns NaN.

    Args:
        input: logits ``[N, C]``, ``[C]`` (one sample) or ``[N, C, d1, ..., dK]``; float16, bfloat16,
            float32 or float64 (half precision accumulates in float32).
        target: class indices ``[N]`` / ``[]`` / ``[N, d1, ..., dK]`` (integer), or class probabilities
            with the shape of ``input`` (floating point).
        loss: a registered name (``crossent.losses.available()``) or a :class:`crossent.losses.Loss`.
        weight: ``[C]`` non-negative class weights (PyTorch's ``weight``).
        ignore_index: class-index target value that contributes nothing (loss 0, not counted).
        reduction: ``"none"`` (shape of the target), ``"mean"`` (weighted mean over counted rows) or
            ``"sum"``.
        label_smoothing: smoothing :math:`\varepsilon` of ``loss="ce"``.
        z_loss: adds ``z_loss * lse**2`` per row (PaLM's z-loss).
        softcap: if given, logits pass through ``softcap * tanh(z / softcap)`` first.
        extra: per-row tensors that particular losses read (for example ``{"sample_ids": ids}`` for
            ALDR-KL); each has the target's shape (of the class-index target, or of ``input`` without
            its class dimension) followed by any trailing dimensions of its own.

    Returns:
        The loss, in the dtype of ``input``.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> target = torch.tensor([0, 2])
        >>> xe.cross_entropy(logits, target)
        tensor(0.6216)
        >>> xe.cross_entropy(logits, target, loss="ce", label_smoothing=0.1, z_loss=1e-2)
        tensor(0.7352)
    """
    V.check_reduction(reduction)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape [C], [N, C] or [N, C, d1, ...]")
    loss_obj = build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss)

    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    logits = input.movedim(class_dim, -1).reshape(-1, num_classes) if input.dim() != 2 else input
    compute_dtype = as_float(torch.empty(0, dtype=input.dtype)).dtype
    class_weight = V.check_class_weight(weight, num_classes, input.device, compute_dtype)

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"class-probability target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        probs = target.movedim(class_dim, -1).reshape(-1, num_classes)
        out_shape = target.shape[:class_dim] + target.shape[class_dim + 1 :]
        rows = prob_rows(
            probs if target.requires_grad else probs.to(compute_dtype),
            class_weight,
            V.flatten_extra(extra, out_shape),
        )
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer class indices or float probabilities, got {target.dtype}")
        expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        if target.shape != expected:
            raise ValueError(
                f"class-index target must have shape {tuple(expected)} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.device != input.device:
            raise ValueError(f"target is on {target.device} but input is on {input.device}")
        V.check_index_target(target, num_classes, ignore_index, target.shape if target.dim() else (1,))
        out_shape = expected
        rows = index_rows(
            target.reshape(-1), num_classes, ignore_index, class_weight, V.flatten_extra(extra, out_shape)
        )
    V.check_loss_accepts(loss_obj, rows)

    plan = Plan(loss_obj, rows, (Softcap(softcap),) if softcap is not None else ())
    per_row = dense_row_losses(logits, plan, rows, autograd=target.requires_grad)
    return reduce(per_row, rows, reduction, out_shape, input.dtype)
