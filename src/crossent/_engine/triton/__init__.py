"""The Triton engine of ``linear_cross_entropy``: tiled GPU kernels for every streamable loss.

Layout, one concern per module:

* :mod:`.program` (no Triton import): the plan's statistics and transforms, read off their declared
  structure, as the kernels' compile-time switches; :func:`unsupported` says why a plan cannot run;
* :mod:`.config`: tile sizes and launch shapes (GPU, and Triton's CPU interpreter);
* :mod:`.tiles`: the logit tile formed on chip and the transform chain applied to it;
* :mod:`.forward`: the statistics kernel (mergeable states per row and vocabulary split);
* :mod:`.states`: the splits' states merged by the statistics' own rules;
* :mod:`.backward`: the gradient kernel (recomputed tiles, float32 atomic accumulation);
* :mod:`.launch`: launching both kernels, their per-row operands (the plan's
  :class:`~crossent._engine.plan.Factors` as the kernel reads them), gradient buffers and slabs;
* :mod:`.function`: the autograd glue, :func:`triton_loss`.

Only :mod:`.program`, :mod:`.states`, :mod:`.config` and :mod:`.function` import
without Triton; the kernels load on the first call.
"""

from __future__ import annotations

import importlib.util

from .function import triton_loss
from .program import Unsupported, unsupported


def installed() -> bool:
    """Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["triton_loss", "unsupported", "Unsupported", "installed"]
