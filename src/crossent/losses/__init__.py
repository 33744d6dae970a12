"""Every crossent loss, as objects with keyword hyperparameters and by registry name.

>>> import crossent as xe
>>> xe.losses.get("ce", label_smoothing=0.1)
CrossEntropy(label_smoothing=0.1)

Writing a loss: subclass :class:`Loss`, declare the statistics it reads and its per-row formula (see
``docs/design.md``); :class:`Rows` is what the formula gets besides the statistics.
"""

from .._rows import Rows
from ._base import (
    CompositeLoss,
    Loss,
    ScaledLoss,
    StatefulLoss,
    SumLoss,
    Transformed,
    available,
    get,
    log_prob_target,
    register,
    registered,
    resolve,
)
from ._basic import CrossEntropy, ZLoss
from ._correction import BackwardCorrection, ForwardCorrection
from ._focal import Focal, Poly, Poly1, Poly1Focal
from ._margin import LDRKL, Circle, Encouraging
from ._regularized import MixCE, Squentropy
from ._robust import APL, GCE, MAE, NCE, NGCE, NMAE, RCE, SCE, TGCE, CompSum
from ._sigmoid_focal import SigmoidFocal, sigmoid_focal_loss
from ._soft import SoftTargetCrossEntropy
from ._whole_row import AdaptiveLDRKL, LogitClip, NormalizedFocal

__all__ = [
    # building blocks
    "Loss", "StatefulLoss", "CompositeLoss", "SumLoss", "ScaledLoss", "Transformed", "Rows", "log_prob_target",
    # the registry
    "register", "get", "available", "registered", "resolve",
    # losses
    "CrossEntropy", "ZLoss",
    "Focal", "Poly1", "Poly", "Poly1Focal",
    "CompSum", "GCE", "TGCE", "MAE", "NCE", "NGCE", "NMAE", "RCE", "SCE", "APL",
    "LDRKL", "Circle", "Encouraging",
    "Squentropy", "MixCE",
    "SoftTargetCrossEntropy",
    "ForwardCorrection", "BackwardCorrection",
    "NormalizedFocal", "LogitClip", "AdaptiveLDRKL",
    "SigmoidFocal", "sigmoid_focal_loss",
]  # fmt: skip


def __getattr__(name):
    # Moved to crossent.adversarial (it trains through a model, it is not a loss object); kept reachable.
    if name == "smooth_adversarial_comp_sum":
        from ..adversarial import smooth_adversarial_comp_sum

        return smooth_adversarial_comp_sum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
