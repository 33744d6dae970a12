"""Device helpers shared by both kernels: a logit tile formed on chip, and the transform chain on it.

``logit_tile`` multiplies a ``[BLOCK_N, D]`` block of ``e`` by a ``[BLOCK_V, D]`` block of ``c`` in steps
of ``BLOCK_D`` features with float32 accumulation and adds the bias; nothing of it reaches global
memory. ``transformed`` applies the chain ``A0 -> [Tanh] -> A1 -> [Circle] -> A2``
(:class:`~crossent._engine.triton.program.Chain`) and, for the backward pass, its elementwise slope.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    E, C, BIAS, erow, row_ok, cols, col_ok, D, stride_e, stride_c,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``e[erow] @ c[cols].T + bias[cols]`` as a float32 ``[BLOCK_N, BLOCK_V]`` tile (masked entries 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    e_ptrs = E + erow[:, None] * stride_e + offs_d[None, :]
    c_ptrs = C + cols[None, :] * stride_c + offs_d[:, None]
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        e = tl.load(e_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(c_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter multiplies bfloat16 blocks wrongly; float32 holds their products exactly
            e = e.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(e, c, acc, input_precision=PRECISION)
        e_ptrs += BLOCK_D
        c_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def tanh(x):
    """``tanh`` to float32 accuracy: an odd polynomial near 0 (no cancellation), ``(1 - e) / (1 + e)`` with
    ``e = exp(-2|x|)`` beyond (no overflow)."""
    a = tl.abs(x)
    decay = tl.exp(-2.0 * a)
    far = (1.0 - decay) / (1.0 + decay)
    x2 = x * x
    series = 62.0 / 2835 + x2 * (-1382.0 / 155925)  # tanh's Taylor series to x^11
    near = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * series))))
    return tl.where(a < 0.25, near, tl.where(x < 0, -far, far))


@triton.jit
def transformed(
    z, cols, col_ok, is_target, SHIFT0, SHIFT1, SHIFT2,
    scale0, scale1, scale2, cap, circle_m, circle_gamma,
    HAS_SHIFT0: tl.constexpr, HAS_SHIFT1: tl.constexpr, HAS_SHIFT2: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_CIRCLE: tl.constexpr, WITH_SLOPE: tl.constexpr,
):  # fmt: skip
    """``(z', dz'/dz)`` of the chain on a tile (the slope is left at 1 without ``WITH_SLOPE``)."""
    slope = tl.zeros_like(z) + 1.0
    # (Shifts inline: each nested call costs the interpreter about a millisecond.)
    x = z * scale0
    if HAS_SHIFT0:
        x += tl.load(SHIFT0 + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_CAP:
        t = tanh(x / cap)
        x = cap * t
        if WITH_SLOPE:
            slope = 1.0 - t * t
    x = x * scale1
    if HAS_SHIFT1:
        x += tl.load(SHIFT1 + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_CIRCLE:
        # Detached weights: the derivative of w (x - o) is w.
        w = tl.where(is_target, tl.maximum(1.0 + circle_m - x, 0.0), tl.maximum(x + circle_m, 0.0)) * circle_gamma
        x = w * (x - tl.where(is_target, 1.0 - circle_m, circle_m))
        if WITH_SLOPE:
            slope = slope * w
    x = x * scale2
    if HAS_SHIFT2:
        x += tl.load(SHIFT2 + cols, mask=col_ok, other=0.0)[None, :]
    if WITH_SLOPE:
        slope = slope * (scale0 * scale1 * scale2)
    return x, slope
