"""What a loss knows about each row besides its logits: the target, the mask, the weights.

Engines build one :class:`Rows` per call (or per chunk of rows) and hand it to the statistics,
the transforms and the loss formulas, so that none of them needs to know which engine runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rows:
    """Per-row side information for ``N`` rows over ``num_classes`` classes.

    Attributes:
        num_classes: ``C``, the length of every logit row.
        target: ``[N]`` int64 class indices with ignored rows replaced by 0, or ``None`` when the
            target is a class-probability tensor.
        valid: ``[N]`` bool, ``False`` for rows whose target equals ``ignore_index``.
        probs: ``[N, C]`` float class-probability target, or ``None`` for class indices.
        class_weight: ``[C]`` float32 per-class weight (PyTorch's ``weight``), or ``None``.
        extra: per-row tensors that particular losses need (``[N, ...]``); sliced with the rows.
        peak: ``[N]`` maxima of the (transformed) logit block the statistics are about to see, when
            the engine took them (:meth:`Plan.statistics`, :meth:`Plan.partial_states`); statistics
            measure from them instead of taking the maximum again. ``None`` otherwise.
    """

    num_classes: int
    target: Tensor | None
    valid: Tensor
    probs: Tensor | None = None
    class_weight: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    peak: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    @property
    def has_indices(self) -> bool:
        return self.target is not None

    def target_weight(self) -> Tensor | None:
        """``weight[target]`` per row (``None`` when there are no class weights or no indices)."""
        if self.class_weight is None or self.target is None:
            return None
        return self.class_weight[self.target]

    def select(self, index: slice) -> Rows:
        """The same information for a contiguous block of rows."""

        def cut(t):
            return t[index] if isinstance(t, Tensor) and t.dim() > 0 else t

        return replace(
            self,
            target=cut(self.target),
            valid=self.valid[index],
            probs=cut(self.probs),
            extra={k: cut(v) for k, v in self.extra.items()},
            peak=cut(self.peak),
        )

    def require_indices(self, who: str) -> Tensor:
        if self.target is None:
            raise ValueError(f"{who} needs class-index targets, got class probabilities")
        return self.target


def onehot_mask(rows: Rows, cols: slice, width: int) -> tuple[Tensor, Tensor]:
    """Local column of each row's target inside ``cols`` and whether it falls there."""
    target = rows.require_indices("this statistic")
    local = target - cols.start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, max(width - 1, 0)), inside


def column_slice(start: int, width: int) -> slice:
    return slice(start, start + width)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype elementwise work on logits of ``dtype`` runs in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_float(t: Tensor) -> Tensor:
    """``t`` in its :func:`compute_dtype`: half precision upcast to float32, float32/64 left alone."""
    return t.to(compute_dtype(t.dtype))


def index_rows(target: Tensor, num_classes: int, ignore_index: int, class_weight, extra=None) -> Rows:
    """:class:`Rows` for flat ``[N]`` class-index targets (already range-checked)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return Rows(num_classes=num_classes, target=safe, valid=valid, class_weight=class_weight, extra=extra or {})


def prob_rows(probs: Tensor, class_weight, extra=None) -> Rows:
    """:class:`Rows` for flat ``[N, C]`` class-probability targets."""
    valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    return Rows(num_classes=probs.shape[-1], target=None, valid=valid, probs=probs, class_weight=class_weight, extra=extra or {})
