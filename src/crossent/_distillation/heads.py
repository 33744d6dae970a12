r"""The logits of a language model's head, as stock models post-process them.

A head's logits are :math:`z = \mathrm{cap} \cdot \tanh(s\,(h W^\top + b) / \mathrm{cap})`: the scale
:math:`s` is Cohere's ``logit_scale`` (``logits * logit_scale``), the cap Gemma 2/3's
``final_logit_softcapping`` (``tanh(logits / cap) * cap``); a model has one, the other or neither.
Both are :class:`~crossent.transforms.Transform`\ s, applied in that order, so the student's logits
are the engine's transformed logits (their gradient goes back through the chain) and the teacher's
are formed the same way without a gradient.
"""

from __future__ import annotations

from .. import _validation as V
from ..transforms import Affine, Softcap, Transform


class LogitScale(Transform):
    """``z * scale`` (Cohere's ``logit_scale``): a product, so the logits equal the stock model's bit for bit."""

    def __init__(self, scale: float):
        self.scale = V.positive("logit_scale", scale)

    @property
    def key(self):
        return ("LogitScale", self.scale)

    def forward(self, z, rows, cols):
        return z * self.scale

    def backward_(self, grad, z, rows, cols):
        return grad.mul_(self.scale)

    def structure(self):
        return Affine(self.scale)


def head_transforms(side: str, logit_scale: float, softcap: float | None) -> tuple[Transform, ...]:
    """The checked transforms of one side's head (``side``: ``"student"`` or ``"teacher"``, for messages).

    ``logit_scale`` 1 and ``softcap`` ``None`` (or ``math.inf``) add nothing.
    """
    scale = V.positive(f"logit_scale_{side}", logit_scale)
    try:
        cap = V.check_softcap(softcap)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("softcap", f"softcap_{side}", 1)) from None
    return ((LogitScale(scale),) if scale != 1.0 else ()) + ((Softcap(cap),) if cap is not None else ())


def check_heads(*, logit_scale_student, logit_scale_teacher, softcap_student, softcap_teacher) -> None:
    """Both heads' options, checked (the module form checks them at construction)."""
    head_transforms("student", logit_scale_student, softcap_student)
    head_transforms("teacher", logit_scale_teacher, softcap_teacher)


__all__ = ["LogitScale", "check_heads", "head_transforms"]
