"""Thin ``torch.nn.Module`` wrappers around the functional entry points."""

from __future__ import annotations

from torch import Tensor, nn

from . import _frontend as fe
from .functional import cross_entropy


class CrossEntropy(nn.Module):
    """Module form of :func:`crossent.cross_entropy` (same arguments, fixed at construction).

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.CrossEntropy(label_smoothing=0.1)
        >>> crit(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]))
        tensor(0.3913)
    """

    def __init__(
        self,
        loss="ce",
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        fe.check_reduction(reduction)
        self.loss = fe.build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor, extra: dict[str, Tensor] | None = None) -> Tensor:
        """``extra`` carries per-row tensors for losses that read them (e.g. ``sample_ids``)."""
        return cross_entropy(
            input,
            target,
            extra=extra,
            loss=self.loss,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
