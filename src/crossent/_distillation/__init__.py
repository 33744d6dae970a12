"""Knowledge distillation: divergences between a student's and a teacher's distributions over the classes.

:mod:`.statistics` (row statistics of the pair), :mod:`.divergences` (the divergences as losses),
:mod:`.arguments` (what the entry points share), :mod:`.dense` (``crossent.distillation``, logits you
hold) and :mod:`.linear` (``crossent.linear_distillation``, two linear heads on the row-chunked engine).
"""

from .dense import distillation
from .divergences import DIVERGENCES
from .linear import linear_distillation

__all__ = ["DIVERGENCES", "distillation", "linear_distillation"]
