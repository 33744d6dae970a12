"""Which engine runs ``linear_cross_entropy``: from the ``backend`` option, the device and the plan.

``"torch"`` is the row-chunked engine (any device, any loss). ``"triton"`` is the tiled GPU engine
(:mod:`crossent._engine.triton`); asking for it where it cannot run is an error that says why.
``"auto"`` takes Triton for CUDA tensors of float32/bfloat16/float16 when Triton imports and the
kernels compute every part of the plan (read off its declared structure), and the row-chunked engine
otherwise. Triton is imported only on those paths, never by ``import crossent``.
"""

from __future__ import annotations

import functools

import torch

from .options import LinearCrossEntropyOptions
from .plan import Plan

#: Input dtypes of the Triton kernels.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - an installed Triton can still fail to load (no driver, version clash)
        return False
    return True


def choose_backend(options: LinearCrossEntropyOptions, device_type: str, dtype: torch.dtype, plan: Plan) -> str:
    """``"torch"`` or ``"triton"`` for a call on ``device_type`` tensors of ``dtype``; raises where an
    explicit ``backend="triton"`` cannot run."""
    if options.backend == "torch":
        return "torch"
    if options.backend == "triton":
        if not triton_importable():
            raise ImportError(
                "backend='triton' needs Triton, which is not installed or does not load: pip install 'crossent[triton]'"
            )
        from .triton import unsupported

        reason = unsupported(plan)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this loss: {reason}")
        return "triton"
    if device_type != "cuda" or dtype not in TRITON_DTYPES or options.mode == "eager" or not triton_importable():
        return "torch"
    from .triton import unsupported

    return "triton" if unsupported(plan) is None else "torch"


def linear_engine(options: LinearCrossEntropyOptions, e: torch.Tensor, plan: Plan):
    """The engine function for this call: ``chunked_loss`` or ``triton_loss`` (one signature)."""
    if choose_backend(options, e.device.type, e.dtype, plan) == "triton":
        from .triton import triton_loss

        return triton_loss
    from .chunked import chunked_loss

    return chunked_loss


__all__ = ["choose_backend", "linear_engine", "triton_importable", "TRITON_DTYPES"]
