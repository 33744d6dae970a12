"""Gradients of per-row values weighted by the upstream gradient of each row, by autograd.

``torch.autograd.grad(out, inputs, grad_outputs=w)`` with a tensor ``w`` checks its shape against
``out`` through ``torch.fx.experimental.symbolic_shapes``, and importing that module imports SymPy and
mpmath: about 500 modules and 34 MiB of resident memory, taken on the first backward of a process
that has not imported them (``import crossent`` deliberately does not: tests/test_surface.py). The
scalar ``(out * w).sum()`` has the same gradient, bit for bit (the product's backward hands ``w``
itself to ``out``'s graph), and autograd seeds a scalar with a plain ``ones_like`` and no import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def weighted_grad(out: Tensor, inputs: Sequence[Tensor], weights: Tensor, **kwargs) -> tuple:
    """``d(sum_i weights[i] * out[i]) / d inputs``, as ``torch.autograd.grad(out, inputs, weights)``.

    ``weights`` (shaped like ``out``) is cast to ``out``'s dtype first; ``kwargs`` go to
    :func:`torch.autograd.grad` (``allow_unused``, ``create_graph``: then the result is also
    differentiable in ``weights``, as with ``grad_outputs``).
    """
    return torch.autograd.grad((out * weights.to(out.dtype)).sum(), inputs, **kwargs)


__all__ = ["weighted_grad"]
