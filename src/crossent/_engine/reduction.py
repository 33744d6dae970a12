"""PyTorch's reductions of per-row losses, shared by every engine and entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from .._rows import Rows


def mean_denominator(rows: Rows, dtype: torch.dtype) -> Tensor:
    """The ``mean`` divisor: the sum of ``weight[y]`` over counted rows (their number without class
    weights), or the number of rows for class-probability targets.

    1 where no row counts (every target ignored, no rows, or every counted row's class weight 0),
    so that such a mean is 0.0; class weights of mixed sign that cancel to 0 divide by 0, as PyTorch.
    """
    if rows.has_indices:
        w = rows.target_weight()
        if w is None:
            denom = rows.valid.sum().to(dtype)
            return torch.where(denom != 0, denom, torch.ones_like(denom))
        counted = torch.where(rows.valid, w, 0)
        denom = counted.sum().to(dtype)
        return torch.where((counted != 0).any(), denom, torch.ones_like(denom))
    denom = torch.tensor(float(rows.num_rows), dtype=dtype, device=rows.valid.device)
    return torch.where(denom != 0, denom, torch.ones_like(denom))


def reduce(per_row: Tensor, rows: Rows, reduction: str, out_shape, out_dtype, denominator: Tensor | None = None) -> Tensor:
    """PyTorch's reductions; a mean over zero counted rows is 0.0 (PyTorch gives NaN): :func:`mean_denominator`.

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
