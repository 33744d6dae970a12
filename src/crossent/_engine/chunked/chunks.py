"""How one chunk's logits are formed and handed to the kernel: full and half precision.

Both producers share one method, ``run(sel, rows, e_c, scale, kernel, source, record, grads)``: form
the chunk's logits ``e_c @ c.T + bias``, let the kernel compute losses, statistics and (with ``scale``)
the logit gradient, let ``record(sel, rows, result)`` store the chunk's results, fold the gradient's
target term (:meth:`Gradients.fold`), and return the operands of the gradient products: the matrix and
the :class:`~crossent._engine.plan.Factors` left to them (``None`` for values only).

* :class:`FloatChunks` (float32/float64 inputs): one ``[chunk, V]`` buffer in the input dtype; the
  kernel works on it in place and its gradient is the product operand.
* :class:`HalfChunks` (bfloat16/float16): the chunk's logits and gradient stay in the input dtype (the
  products run on half-precision units); the kernel sees them a few rows at a time through a small
  float32 staging buffer, so chunks can be long (fewer passes over a float32 ``grad_c``) without a
  ``[chunk, V]`` float32 buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._rows import Rows
from ..options import MIN_CHUNK
from ..plan import Factors
from .gradients import ChunkSource, Gradients
from .selection import sub_selector


def logits_into(out: Tensor, e: Tensor, c: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(e, c.T, out=out)
    else:
        torch.addmm(bias, e, c.T, out=out)


class FloatChunks:
    """Float32/float64 chunks: the kernel works on the logit buffer itself."""

    def __init__(self, rows: int, v: int, compute: torch.dtype, device):
        self.buffer = torch.empty(rows, v, dtype=compute, device=device)

    def run(self, sel, rows: Rows, e_c: Tensor, scale, kernel, source: ChunkSource, record, grads: Gradients):
        z = self.buffer[: rows.num_rows]
        logits_into(z, e_c, source.c, source.bias)
        res = kernel(z, rows, scale, source)
        record(sel, rows, res)
        if res.grad is None:
            return None
        return res.grad, grads.fold(res.grad, res.factors, rows.target)

    def release(self) -> None:
        self.buffer = None


def stage_rows(rows: int, v: int, stage_bytes: int) -> int:
    """Rows of a half-precision chunk of ``rows`` rows and ``v`` columns that the kernel sees at once
    (:attr:`Tuning.stage_bytes <crossent._engine.options.Tuning>` of float32 staging)."""
    return min(rows, max(MIN_CHUNK, stage_bytes // (4 * max(1, v))))


class HalfChunks:
    """bfloat16/float16 chunks: logits and gradient in the input dtype, the kernel on float32 blocks of rows."""

    def __init__(self, rows: int, v: int, dtype: torch.dtype, compute: torch.dtype, device, stage_bytes: int):
        self.logits = torch.empty(rows, v, dtype=dtype, device=device)
        self.stage_rows = stage_rows(rows, v, stage_bytes)
        self.stage = torch.empty(self.stage_rows, v, dtype=compute, device=device)

    def run(self, sel, rows: Rows, e_c: Tensor, scale, kernel, source: ChunkSource, record, grads: Gradients):
        r = rows.num_rows
        h = self.logits[:r]
        logits_into(h, e_c, source.c, source.bias)
        left = []
        for lo in range(0, r, self.stage_rows):
            part = slice(lo, min(r, lo + self.stage_rows))
            z = self.stage[: part.stop - lo]
            z.copy_(h[part])
            sub_rows = rows.select(part)
            res = kernel(z, sub_rows, None if scale is None else scale[part], source.part(part))
            record(sub_selector(sel, part), sub_rows, res)
            if res.grad is None:  # values only
                continue
            left.append(grads.fold(res.grad, res.factors, sub_rows.target))
            h[part].copy_(res.grad)  # a plain cast: the row factors stay on the [r, D] operands
        if not left:
            return None
        # Every block ran the same kernel: all of them are whole gradients, or all have factors.
        return h, None if left[0] is None else Factors.cat(left)

    def release(self) -> None:
        self.logits = self.stage = None
