"""How one chunk's logits are formed and handed to the kernel: full and half precision.

Both producers share one method, ``run(sel, rows, e_c, scale, kernel, record, grads)``: form the
chunk's logits ``e_c @ c.T + bias``, let the kernel compute losses, statistics and (with ``scale``) the
factored logit gradient, let ``record`` store the chunk's results, and return the operands of the
gradient products (``None`` for values only).

* :class:`FloatChunks` (float32/float64 inputs): one ``[chunk, V]`` buffer in the input dtype; the
  kernel works on it in place and its gradient is the product operand.
* :class:`HalfChunks` (bfloat16/float16): the chunk's logits and gradient stay in the input dtype (the
  products run on half-precision units); the kernel sees them a few rows at a time through a small
  float32 staging buffer, so chunks can be long (fewer passes over a float32 ``grad_c``) without a
  ``[chunk, V]`` float32 buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._rows import Rows
from .gradients import ChunkSource, Gradients
from ..options import MIN_CHUNK
from .selection import sub_selector

#: Float32 staging of half-precision chunks for the kernel: this many bytes of rows at a time.
_STAGE_BYTES = 32 * 2**20


def logits_into(out: Tensor, e: Tensor, c: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(e, c.T, out=out)
    else:
        torch.addmm(bias, e, c.T, out=out)


@dataclass
class ProductOperands:
    """``grad_e = a * (op @ c) + sums``, ``grad_c += op.T @ (a * e_c)``: what :meth:`Gradients.add` takes."""

    op: Tensor
    row_factors: Tensor | None
    sums: list


class FloatChunks:
    """Float32/float64 chunks: the kernel works on the logit buffer itself."""

    def __init__(self, rows: int, v: int, compute: torch.dtype, device):
        self.buffer = torch.empty(rows, v, dtype=compute, device=device)

    def run(self, sel, rows: Rows, e_c: Tensor, scale, kernel, source: ChunkSource, record, grads: Gradients):
        z = self.buffer[: rows.num_rows]
        logits_into(z, e_c, source.c, source.bias)
        res = kernel(z, rows, scale, source)
        record(sel, res)
        if res.grad is None:
            return None
        a = grads.fold(res.grad, rows.target)
        return ProductOperands(res.grad.matrix, a, res.grad.sums)

    def release(self) -> None:
        self.buffer = None


def stage_rows(rows: int, v: int) -> int:
    """Rows of a half-precision chunk of ``rows`` rows and ``v`` columns that the kernel sees at once."""
    return min(rows, max(MIN_CHUNK, _STAGE_BYTES // (4 * max(1, v))))


class HalfChunks:
    """bfloat16/float16 chunks: logits and gradient in the input dtype, the kernel on float32 blocks of rows."""

    def __init__(self, rows: int, v: int, dtype: torch.dtype, compute: torch.dtype, device):
        self.logits = torch.empty(rows, v, dtype=dtype, device=device)
        self.stage_rows = stage_rows(rows, v)
        self.stage = torch.empty(self.stage_rows, v, dtype=compute, device=device)

    def run(self, sel, rows: Rows, e_c: Tensor, scale, kernel, source: ChunkSource, record, grads: Gradients):
        r = rows.num_rows
        h = self.logits[:r]
        logits_into(h, e_c, source.c, source.bias)
        row_factors, sums, factored = [], [], False
        for lo in range(0, r, self.stage_rows):
            part = slice(lo, min(r, lo + self.stage_rows))
            z = self.stage[: part.stop - lo]
            z.copy_(h[part])
            sub_rows = rows.select(part)
            sub_source = ChunkSource(e_c[part], source.c, source.bias, source.column_sums)
            res = kernel(z, sub_rows, None if scale is None else scale[part], sub_source)
            record(sub_selector(sel, part), res)
            if res.grad is None:  # values only
                continue
            a = grads.fold(res.grad, sub_rows.target)
            h[part].copy_(res.grad.matrix)  # a plain cast: the row factors stay on the [r, D] operands
            factored = factored or a is not None
            row_factors.append(z.new_ones(z.shape[0]) if a is None else a)
            sums.append(res.grad.sums)
        if not row_factors:
            return None
        a = torch.cat(row_factors) if factored else None
        merged = [(torch.cat([s[k][0] for s in sums]), w) for k, (_, w) in enumerate(sums[0])]
        return ProductOperands(h, a, merged)

    def release(self) -> None:
        self.logits = self.stage = None
