"""PyTorch's reductions of per-row losses, shared by every engine and entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from .._rows import Rows

#: The values of every ``reduction`` argument, in PyTorch's order.
REDUCTIONS = ("none", "mean", "sum")


def mean_denominator(rows: Rows, dtype: torch.dtype) -> Tensor:
    """The ``mean`` divisor: the sum of ``weight[y]`` over counted rows (their number without class
    weights), or the number of rows for class-probability targets; 1 where that is 0."""
    if rows.has_indices:
        w = rows.target_weight()
        denom = rows.valid.sum().to(dtype) if w is None else torch.where(rows.valid, w, 0).sum().to(dtype)
    else:
        denom = torch.tensor(float(rows.num_rows), dtype=dtype, device=rows.valid.device)
    return torch.where(denom != 0, denom, torch.ones_like(denom))


def reduce(per_row: Tensor, rows: Rows, reduction: str, out_shape, out_dtype, denominator: Tensor | None = None) -> Tensor:
    """PyTorch's reductions; a mean over zero counted rows is 0.0 (PyTorch gives NaN).

    ``denominator``: the ``mean`` divisor given by the caller (e.g. the number of counted tokens of a
    whole batch of micro-batches) instead of :func:`mean_denominator`.
    """
    if reduction == "none":
        return per_row.reshape(out_shape).to(out_dtype)
    total = per_row.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    if denominator is None:
        denominator = mean_denominator(rows, total.dtype)
    return (total / denominator.to(total.dtype)).to(out_dtype)
