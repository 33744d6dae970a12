"""The forward kernel: mergeable states of a plan's statistics, per row and vocabulary split.

Program ``(row block, split)`` walks the split's vocabulary tiles in order. For each it forms the
logit tile on chip (:func:`~crossent._engine.triton.tiles.logit_tile`), applies the transform chain,
and folds the tile into running per-row states, switched on at compile time by the plan's forms:

* ``lse``: running maximum ``m`` and ``s = sum_j exp(z_j - m)`` (rescaled when ``m`` grows);
  ``sum_j p_j z_j`` and ``sum_j p_j^k`` ride on the same maximum (``sum exp(z - m) z``,
  ``sum exp(k (z - m))``);
* the target logit, up to two class-weighted column sums and the sum of squares: plain sums;
* the argmax: the first maximum of the tile, kept when strictly larger (first index on ties);
* the tempered ``lse``: a second running maximum and sum over ``(z_j + m 1[j != y]) / t``.

Each program writes its states to the float32 slots of ``OUT[slot, split, row]`` (argmax indices to
``ARGMAX_INDEX[split, row]``); :mod:`.states` merges the splits with the statistics' own merge rules.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import logit_tile, transformed


# Row counts and tile ranges change from call to call (and slab to slab): one compilation serves them all.
@triton.jit(do_not_specialize=["M", "num_splits", "tiles_per_split"])
def statistics_kernel(
    E, C, BIAS, ROWS, TARGET, SHIFT0, SHIFT1, SHIFT2, W0, W1, OUT, ARGMAX_INDEX,
    M, V, D, stride_e, stride_c, num_splits, tiles_per_split,
    scale0, scale1, scale2, cap, circle_m, circle_gamma, inv_temperature, temper_margin, power,
    HAS_BIAS: tl.constexpr, HAS_SHIFT0: tl.constexpr, HAS_SHIFT1: tl.constexpr, HAS_SHIFT2: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_CIRCLE: tl.constexpr,
    HAS_LSE: tl.constexpr, HAS_TARGET: tl.constexpr, NUM_COLUMNS: tl.constexpr, W0_ONES: tl.constexpr,
    W1_ONES: tl.constexpr, HAS_SQUARES: tl.constexpr, HAS_ARGMAX: tl.constexpr, HAS_TEMPERED: tl.constexpr,
    HAS_PROB_DOT: tl.constexpr, HAS_PROB_POWER: tl.constexpr,
    SLOT_LSE_MAX: tl.constexpr, SLOT_LSE_SUM: tl.constexpr, SLOT_TARGET: tl.constexpr, SLOT_COLUMN0: tl.constexpr,
    SLOT_COLUMN1: tl.constexpr, SLOT_SQUARES: tl.constexpr, SLOT_ARGMAX_VALUE: tl.constexpr,
    SLOT_TEMPERED_MAX: tl.constexpr, SLOT_TEMPERED_SUM: tl.constexpr, SLOT_PROB_DOT: tl.constexpr,
    SLOT_PROB_POWER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    num_row_blocks = tl.cdiv(M, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_row_blocks  # neighbouring programs share the split's tiles of c (L2 reuse)
    split = pid // num_row_blocks

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    erow = tl.load(ROWS + rows, mask=row_ok, other=0).to(tl.int64)
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)

    neg_inf = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m, s, prob_dot, prob_power = neg_inf, zero, zero, zero
    target_logit, column0, column1, squares = zero, zero, zero, zero
    best, best_index = neg_inf, tl.zeros((BLOCK_N,), dtype=tl.int32)
    tm, ts = neg_inf, zero

    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        z = logit_tile(E, C, BIAS, erow, row_ok, cols64, col_ok, D, stride_e, stride_c,
                       BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST, PRECISION)  # fmt: skip
        is_target = cols[None, :] == target[:, None]
        zt, _ = transformed(z, cols, col_ok, is_target, SHIFT0, SHIFT1, SHIFT2, scale0, scale1, scale2, cap,
                            circle_m, circle_gamma, HAS_SHIFT0, HAS_SHIFT1, HAS_SHIFT2, HAS_CAP, HAS_CIRCLE,
                            False)  # fmt: skip
        valid = col_ok[None, :]
        zs = tl.where(valid, zt, 0.0)
        if HAS_LSE:
            # Running maximum m and s = sum exp(z - m); base is m with -inf read as 0. (Inline: a nested
            # call costs the interpreter about a millisecond.)
            zm = tl.where(valid, zt, float("-inf"))
            m_old = m
            m = tl.maximum(m, tl.max(zm, 1))
            base = tl.where(m == float("-inf"), 0.0, m)
            alpha = tl.exp(m_old - base)
            s = s * alpha + tl.sum(tl.exp(zm - base[:, None]), 1)
            if HAS_PROB_DOT:
                p = tl.exp(zm - base[:, None])
                prob_dot = prob_dot * alpha + tl.sum(p * zs, 1)
            if HAS_PROB_POWER:
                decay = tl.exp(power * (m_old - base))
                grown = tl.exp(power * (zm - base[:, None]))
                prob_power = prob_power * decay + tl.sum(grown, 1)
        if HAS_TARGET:
            target_logit += tl.sum(tl.where(is_target & valid, zt, 0.0), 1)
        if NUM_COLUMNS >= 1:
            if W0_ONES:
                column0 += tl.sum(zs, 1)
            else:
                column0 += tl.sum(zs * tl.load(W0 + cols, mask=col_ok, other=0.0)[None, :], 1)
        if NUM_COLUMNS >= 2:
            if W1_ONES:
                column1 += tl.sum(zs, 1)
            else:
                column1 += tl.sum(zs * tl.load(W1 + cols, mask=col_ok, other=0.0)[None, :], 1)
        if HAS_SQUARES:
            squares += tl.sum(zs * zs, 1)
        if HAS_ARGMAX:
            zm = tl.where(valid, zt, float("-inf"))
            tile_best = tl.max(zm, 1)
            tile_index = tl.argmax(zm, 1, tie_break_left=True).to(tl.int32) + tile * BLOCK_V
            better = tile_best > best
            best_index = tl.where(better, tile_index, best_index)
            best = tl.where(better, tile_best, best)
        if HAS_TEMPERED:
            u = tl.where(valid, (zt + tl.where(is_target, 0.0, temper_margin)) * inv_temperature, float("-inf"))
            tm_old = tm
            tm = tl.maximum(tm, tl.max(u, 1))
            t_base = tl.where(tm == float("-inf"), 0.0, tm)
            ts = ts * tl.exp(tm_old - t_base) + tl.sum(tl.exp(u - t_base[:, None]), 1)

    out = OUT + split.to(tl.int64) * M + rows
    stride_slot = num_splits.to(tl.int64) * M
    if HAS_LSE:
        tl.store(out + SLOT_LSE_MAX * stride_slot, m, mask=row_ok)
        tl.store(out + SLOT_LSE_SUM * stride_slot, s, mask=row_ok)
        if HAS_PROB_DOT:
            tl.store(out + SLOT_PROB_DOT * stride_slot, prob_dot, mask=row_ok)
        if HAS_PROB_POWER:
            tl.store(out + SLOT_PROB_POWER * stride_slot, prob_power, mask=row_ok)
    if HAS_TARGET:
        tl.store(out + SLOT_TARGET * stride_slot, target_logit, mask=row_ok)
    if NUM_COLUMNS >= 1:
        tl.store(out + SLOT_COLUMN0 * stride_slot, column0, mask=row_ok)
    if NUM_COLUMNS >= 2:
        tl.store(out + SLOT_COLUMN1 * stride_slot, column1, mask=row_ok)
    if HAS_SQUARES:
        tl.store(out + SLOT_SQUARES * stride_slot, squares, mask=row_ok)
    if HAS_ARGMAX:
        tl.store(out + SLOT_ARGMAX_VALUE * stride_slot, best, mask=row_ok)
        tl.store(ARGMAX_INDEX + split.to(tl.int64) * M + rows, best_index, mask=row_ok)
    if HAS_TEMPERED:
        tl.store(out + SLOT_TEMPERED_MAX * stride_slot, tm, mask=row_ok)
        tl.store(out + SLOT_TEMPERED_SUM * stride_slot, ts, mask=row_ok)
