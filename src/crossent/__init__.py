"""crossent: cross-entropy and every loss built on it, for PyTorch.

A loss is a small formula over per-row statistics of the logits; engines compute those statistics
from a logit tensor (:func:`cross_entropy`) or without ever materialising it.
"""

from . import losses, nn, stats, targets, transforms, weighting
from .functional import cross_entropy
from .linear import LinearStats, linear_cross_entropy

__version__ = "0.1.0"

__all__ = ["cross_entropy", "losses", "nn", "stats", "targets", "transforms", "weighting", "__version__"]
__all__ += ["linear_cross_entropy", "LinearStats"]
