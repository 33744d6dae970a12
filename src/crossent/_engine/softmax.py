"""The row softmax of whole logit rows, the one device-specific kernel choice of the engines.

On the CPU, PyTorch's fused softmax kernel reads and writes each element once per pass at the same
index, so it may write its output over its input or into a given buffer: one cache-friendly pass, no
temporary. Elsewhere the rows are exponentiated in place after subtracting their maxima and the
caller divides by the returned sums (folding the division into its own row factors).
``Tuning.fused_softmax = False`` (:func:`~crossent._engine.options.tuned`) takes the second route
everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import tuning

#: Devices whose softmax kernel may write into any buffer, its own input included (checked by the tests).
FUSED_SOFTMAX_DEVICES = {"cpu"}


def fused(z: Tensor) -> bool:
    """The softmax of ``z`` runs fused and in place (the device has such a kernel and the tuning allows it)."""
    return z.device.type in FUSED_SOFTMAX_DEVICES and tuning().fused_softmax


def softmax_rows(z: Tensor, out: Tensor | None = None) -> Tensor:
    """``softmax(z)`` over the last dim, into ``out`` when given (``out`` may be ``z`` on fused devices)."""
    if out is None:
        return torch.softmax(z, -1)
    if fused(z) and z.is_contiguous() and out.is_contiguous():
        return torch.ops.aten._softmax.out(z, -1, False, out=out)
    return out.copy_(torch.softmax(z, -1))


def softmax_(z: Tensor, peak: Tensor | None = None) -> Tensor | None:
    """Softmax of each row of ``z`` in place; returns ``None``, or the row sums to divide by.

    On fused devices the rows become the softmax itself. Elsewhere they become ``exp(z - peak)``
    (``peak``: the row maxima, computed here when not given) and their sums are returned.
    """
    if fused(z):
        torch.ops.aten._softmax.out(z, 1, False, out=z)
        return None
    z.sub_((z.amax(1) if peak is None else peak)[:, None]).exp_()
    return z.sum(1)
