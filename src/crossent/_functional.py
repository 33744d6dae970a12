"""The dense entry point: ``crossent.cross_entropy``, a drop-in for ``F.cross_entropy`` with any loss."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import _validation as V
from ._engine.dense import dense_row_losses
from ._engine.plan import Plan
from ._engine.reduction import reduce as reduce_rows
from ._rows import compute_dtype, index_rows, prob_rows
from .losses._build import build_loss
from .transforms import head_transforms

__all__ = ["cross_entropy"]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    loss="ce",
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    extra: dict[str, Tensor] | None = None,
) -> Tensor:
    r"""Cross-entropy, or any crossent loss, from logits you already have.

    The positional arguments are those of :func:`torch.nn.functional.cross_entropy`, in its order, and
    with the defaults this equals it (values and gradients); the README lists the few deliberate
    differences (chiefly: ``reduction="mean"`` over zero counted rows returns ``0.0`` with a zero
    gradient where PyTorch returns NaN). crossent's own options are keyword-only.

    Args:
        input: logits ``[N, C]``, ``[C]`` (one sample) or ``[N, C, d1, ..., dK]``; float16, bfloat16,
            float32 or float64 (half precision accumulates in float32).
        target: class indices ``[N]`` / ``[]`` / ``[N, d1, ..., dK]`` (any integer dtype but bool),
            or class probabilities with the shape of ``input`` (floating point).
        weight: ``[C]`` class weights (PyTorch's ``weight``; any sign, as in PyTorch).
        size_average, reduce: PyTorch's deprecated forms of ``reduction`` (they override it, with
            PyTorch's warning).
        ignore_index: class-index target value that contributes nothing (loss 0, not counted). With
            class probabilities it must stay negative (PyTorch's rule).
        reduction: ``"none"`` (shape of the target), ``"mean"`` (weighted mean over counted rows) or
            ``"sum"``.
        label_smoothing: smoothing :math:`\varepsilon` of ``loss="ce"``.
        loss: a registered name (``crossent.losses.available()``) or a :class:`crossent.losses.Loss`.
        z_loss: adds ``z_loss * lse**2`` per row (PaLM's z-loss).
        softcap: if given, logits pass through ``softcap * tanh(z / softcap)`` first (``None`` or
            ``math.inf``: no capping).
        temperature: the (capped) logits are divided by it (after ``softcap``, as a sampler applies it).
        extra: per-row tensors that particular losses read (for example ``{"sample_ids": ids}`` for
            ALDR-KL); each has the target's shape (of the class-index target, or of ``input`` without
            its class dimension) followed by any trailing dimensions of its own.

    Returns:
        The loss, in the dtype of ``input``.

    Checks that read the target's values (its class range) run at once on the CPU; on an accelerator
    and under ``torch.compile`` they are asynchronous device asserts, so no call waits for the device.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> target = torch.tensor([0, 2])
        >>> xe.cross_entropy(logits, target)
        tensor(0.6216)
        >>> xe.cross_entropy(logits, target, loss="ce", label_smoothing=0.1, z_loss=1e-2)
        tensor(0.7352)
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    V.check_reduction(reduction)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"input and target must be tensors, got {type(input).__name__} and {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape [C], [N, C] or [N, C, d1, ...]")
    ignore_index = V.check_ignore_index(ignore_index)
    loss_obj = build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss)
    softcap = V.check_softcap(softcap)
    temperature = V.check_temperature(temperature)

    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    class_weight = V.check_class_weight(weight, num_classes, input.device, compute_dtype(input.dtype))
    probabilities = target.is_floating_point()
    if not probabilities and target.shape == input.shape:
        raise TypeError(
            f"a target with the shape of input holds class probabilities: expected floating point type for "
            f"target with class probabilities, got {target.dtype}"
        )

    if probabilities:
        if target.shape != input.shape:
            raise ValueError(
                f"class-probability target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index is not supported for floating point target (class probabilities), got "
                f"ignore_index={ignore_index}; leave it at its default"
            )
        if num_classes == 0:
            return _no_classes(input, target, weight, reduction)
        probs = target.movedim(class_dim, -1).reshape(-1, num_classes)
        out_shape = target.shape[:class_dim] + target.shape[class_dim + 1 :]
        rows = prob_rows(
            probs if target.requires_grad else probs.to(compute_dtype(input.dtype)),
            class_weight,
            V.flatten_extra(extra, out_shape),
        )
    else:
        target = V.index_target(target)
        expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        if target.shape != expected:
            raise ValueError(
                f"class-index target must have shape {tuple(expected)} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.device != input.device:
            raise ValueError(f"target is on {target.device} but input is on {input.device}")
        V.check_index_target(target, num_classes, ignore_index, target.shape if target.dim() else (1,))
        if num_classes == 0:
            return _no_classes(input, target, weight, reduction)
        out_shape = expected
        rows = index_rows(
            target.reshape(-1), num_classes, ignore_index, class_weight, V.flatten_extra(extra, out_shape)
        )
    V.check_loss_accepts(loss_obj, rows)

    logits = input.movedim(class_dim, -1).reshape(-1, num_classes) if input.dim() != 2 else input
    plan = Plan(loss_obj, rows, head_transforms(softcap, temperature))
    # Under torch.compile the formula is traced through ordinary autograd ops (the compiler fuses them);
    # the engine's hand-written backward is for eager mode.
    autograd = target.requires_grad or torch.compiler.is_compiling()
    per_row = dense_row_losses(logits, plan, rows, autograd=autograd)
    return reduce_rows(per_row, rows, reduction, out_shape, input.dtype)


def _no_classes(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Zero classes (``C = 0``): PyTorch's answer, computed as it does. Probabilities: ``-0.0`` per row,
    a NaN mean (its divisor counts positions as elements / C); class indices (all ignored, or the range
    check has raised): zeros, and the mean over no counted row is 0.0."""
    class_dim = 0 if input.dim() == 1 else 1
    if target.is_floating_point():
        per_position = input * target if weight is None else input * target * _along(weight, input, class_dim)
        if reduction == "none":
            return -per_position.sum(class_dim)
        total = -per_position.sum()
        return total if reduction == "sum" else total / 0.0
    zeros = input.sum(class_dim) * 0
    return zeros if reduction == "none" else zeros.sum()


def _along(weight: Tensor, input: Tensor, class_dim: int) -> Tensor:
    shape = [1] * input.dim()
    shape[class_dim] = -1
    return weight.to(input.dtype).reshape(shape)
