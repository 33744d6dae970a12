"""A second linear operand beside the engine's own: the chunk's logits of ``h @ w.T`` for the same rows.

Distillation compares the student's logits ``e @ c.T`` (the engine's chunk, differentiated) with a
teacher's ``h @ w.T`` over the same rows and classes. The teacher's hidden rows travel in
``rows.extra`` (so the row selection gathers and slices them with every chunk); :class:`PairedLogits`
wraps the plan's kernel and, for each block of rows the kernel is given, forms their teacher logits
(one ``[r, V]`` product, in the teacher's dtype, then in the kernel's) and hands them on in
``rows.extra`` in place of the hidden rows. The teacher gets no gradient and may have another hidden
size and dtype than the student. Beside the engine's chunk this holds one ``[r, V]`` block (two for
a half-precision teacher while it is converted). The teacher's own logit transforms (a softcap, a
scale: ``transforms``) apply to its block in the kernel's dtype.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..._rows import Rows


class PairedLogits:
    """Kernel wrapper: ``rows.extra[hidden_key]`` (``[r, D']``) becomes ``rows.extra[logits_key]``, the
    transformed ``h @ w.T (+ bias)``."""

    def __init__(self, kernel, w: Tensor, bias: Tensor | None, *, hidden_key: str, logits_key: str, transforms=()):
        self.kernel = kernel
        self.w, self.bias = w.detach(), None if bias is None else bias.detach()
        self.hidden_key, self.logits_key = hidden_key, logits_key
        self.transforms = tuple(transforms)

    def logits(self, h: Tensor, dtype: torch.dtype, rows: Rows) -> Tensor:
        with torch.no_grad():
            t = torch.mm(h, self.w.T) if self.bias is None else torch.addmm(self.bias, h, self.w.T)
            t = t if t.dtype == dtype else t.to(dtype)
            for transform in self.transforms:
                t = transform.forward(t, rows, slice(0, t.shape[1]))
        return t

    def __call__(self, z: Tensor, rows: Rows, row_scale: Tensor | None, source=None):
        extra = dict(rows.extra)
        extra[self.logits_key] = self.logits(extra.pop(self.hidden_key), z.dtype, rows)
        return self.kernel(z, replace(rows, extra=extra), row_scale, source)


__all__ = ["PairedLogits"]
