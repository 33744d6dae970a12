"""Every crossent loss, as objects with keyword hyperparameters and by registry name.

>>> import crossent as xe
>>> xe.losses.get("ce", label_smoothing=0.1)
CrossEntropy(label_smoothing=0.1)
"""

from .base import Loss, ScaledLoss, SumLoss, Transformed, available, get, register, registered, resolve
from .basic import CrossEntropy, ZLoss

__all__ = [
    "Loss",
    "SumLoss",
    "ScaledLoss",
    "Transformed",
    "register",
    "get",
    "available",
    "registered",
    "resolve",
    "CrossEntropy",
    "ZLoss",
]

from .adversarial import smooth_adversarial_comp_sum  # noqa: E402
from .correction import BackwardCorrection, ForwardCorrection  # noqa: E402
from .sigmoid_focal import SigmoidFocal, sigmoid_focal_loss  # noqa: E402
from .whole_row import AdaptiveLDRKL, LogitClip, NormalizedFocal  # noqa: E402

__all__ += ["ForwardCorrection", "BackwardCorrection"]
__all__ += ["NormalizedFocal", "LogitClip", "AdaptiveLDRKL", "SigmoidFocal", "sigmoid_focal_loss"]
__all__ += ["smooth_adversarial_comp_sum"]

from .focal import Focal, Poly, Poly1, Poly1Focal  # noqa: E402
from .robust import APL, GCE, MAE, NCE, NGCE, NMAE, RCE, SCE, TGCE, CompSum  # noqa: E402
from .margin import LDRKL, Circle, CircleMargin, Encouraging  # noqa: E402
from .regularized import MixCE, Squentropy  # noqa: E402
from .soft import SoftTargetCrossEntropy  # noqa: E402

__all__ += [
    "Focal", "Poly1", "Poly", "Poly1Focal",
    "CompSum", "GCE", "TGCE", "MAE", "NCE", "NGCE", "NMAE", "RCE", "SCE", "APL",
    "LDRKL", "Circle", "CircleMargin", "Encouraging",
    "Squentropy", "MixCE",
    "SoftTargetCrossEntropy",
]
