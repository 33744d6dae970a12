"""The loss object behind the ``loss`` / ``label_smoothing`` / ``z_loss`` arguments of the entry points."""

from __future__ import annotations

from .. import _validation as V
from ._base import Loss, resolve
from ._basic import CrossEntropy, ZLoss


def build_loss(loss, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> Loss:
    """``loss`` (a registered name or a :class:`Loss`) with the entry points' shorthands applied:
    ``label_smoothing`` for ``"ce"`` and an added ``ZLoss(z_loss)`` term."""
    label_smoothing = V.real(None, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    if label_smoothing:
        if loss == "ce":
            loss = CrossEntropy(label_smoothing=label_smoothing)
        elif isinstance(loss, CrossEntropy) and not loss.label_smoothing:
            loss = CrossEntropy(label_smoothing=label_smoothing)
        else:
            raise ValueError(
                "label_smoothing= applies to loss='ce'; for other losses set the loss's own "
                "hyperparameters (e.g. xe.losses.get('poly1', ...))"
            )
    loss = resolve(loss)
    if z_loss:
        loss = loss + ZLoss(V.non_negative("z_loss", z_loss))
    return loss
