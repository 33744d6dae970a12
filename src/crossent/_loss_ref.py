"""Loss objects as opaque inputs of a custom operator, so that ``torch.compile`` can hand them to an engine.

A custom operator takes tensors and plain values; a loss object (a Python formula, perhaps holding
tensors) reaches one wrapped in a :class:`LossRef`, which PyTorch registers as an opaque *reference*
type: the compiler passes it through as an input of the graph without looking inside. Such an object
must exist before the compiled code runs, so every loss gets its reference when it is constructed
outside a compiled region (:func:`attach`, which ``crossent.losses.Loss.__init__`` and every subclass's
``__init__`` call); ``NO_LOSS`` stands for "the loss is given by name". PyTorch releases without
opaque types leave ``LossRef`` as ``None``.
"""

from __future__ import annotations

import torch

try:
    from torch._library.opaque_object import MemberType, register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # PyTorch without opaque objects for custom operators
    LossRef = None
    NO_LOSS = None
else:

    class LossRef(OpaqueBase):
        """Holds one loss object (or ``None``) for a custom operator."""

        def __init__(self, loss):
            self.loss = loss

        def __reduce__(self):
            return (LossRef, (self.loss,))

    # The compiler reads ``loss`` off the real object (ref_of checks that it is the loss at hand).
    register_opaque_type(LossRef, typ="reference", members={"loss": MemberType.USE_REAL})
    NO_LOSS = LossRef(None)


def attach(loss) -> None:
    """Give ``loss`` its reference (outside ``torch.compile`` only: the compiler cannot create one)."""
    if LossRef is not None and not torch.compiler.is_compiling():
        object.__setattr__(loss, "_ref", LossRef(loss))


def ref_of(loss):
    """The reference of ``loss``, or ``None`` when it was built inside a compiled region."""
    ref = loss.__dict__.get("_ref")
    return ref if ref is not None and ref.loss is loss else None
