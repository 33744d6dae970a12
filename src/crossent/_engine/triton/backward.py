"""The backward kernel: ``grad_e``, ``grad_c`` and ``grad_bias`` from recomputed logit tiles.

Program ``(row block, vocabulary tile)`` recomputes its logit tile, applies the transform chain and
forms the transformed-logit gradient from the per-row factors of the plan's
:class:`~crossent._engine.plan.Factors` (:func:`.launch.row_operands`) and the statistics' elementwise
derivatives, switched on at compile time:

    dL/dz'_ij = p_ij (a_i + g_i z'_ij) + h_i p_ij^k + b_i 1[j = y_i] + sum_k s_ki w_kj + d_i z'_ij + t_i q_ij

with ``p = exp(z' - lse)``, ``q`` the tempered softmax; the chain's slope turns it into ``dL/dz``.
With ``FILTER`` a tile whose every entry is below its row's threshold is skipped (Cut Cross-Entropy's
gradient filter). The tile then goes, in the inputs' dtype, through two products accumulated in
float32 by atomic adds: ``grad_e[rows] += dz @ c[cols]`` and ``grad_c[cols] += dz.T @ e[rows]``, in
steps of ``BLOCK_DG`` features; ``grad_bias[cols] += sum_i dz_ij`` (relaxed atomics: only the sums matter).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import logit_tile, transformed


# Row counts and tile ranges change from call to call (and slab to slab): one compilation serves them all.
@triton.jit(do_not_specialize=["M", "first_tile", "num_tiles", "grad_c_row0"])
def gradient_kernel(
    E, C, BIAS, ROWS, TARGET, SHIFT0, SHIFT1, SHIFT2, W0, W1,
    LSE_HI, TEMPERED_HI, F_SOFTMAX, F_PROB_DOT, F_PROB_POWER, F_TARGET, F_COLUMN0, F_COLUMN1, F_SQUARES,
    F_TEMPERED, THRESHOLD, GRAD_E, GRAD_C, GRAD_BIAS,
    M, V, D, stride_e, stride_c, first_tile, num_tiles, grad_c_row0,
    scale0, scale1, scale2, cap, circle_m, circle_gamma, inv_temperature, temper_margin, power,
    HAS_BIAS: tl.constexpr, HAS_SHIFT0: tl.constexpr, HAS_SHIFT1: tl.constexpr, HAS_SHIFT2: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_CIRCLE: tl.constexpr,
    HAS_LSE: tl.constexpr, HAS_TARGET: tl.constexpr, NUM_COLUMNS: tl.constexpr, W0_ONES: tl.constexpr,
    W1_ONES: tl.constexpr, HAS_SQUARES: tl.constexpr, HAS_TEMPERED: tl.constexpr,
    HAS_PROB_DOT: tl.constexpr, HAS_PROB_POWER: tl.constexpr,
    FILTER: tl.constexpr, COMPUTE_E: tl.constexpr, COMPUTE_C: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    GROUP_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Groups of GROUP_N row blocks sweep the tiles together, so their tiles of c stay in L2.
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_N * num_tiles
    group_first = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_row_blocks - group_first, GROUP_N)
    pid_n = group_first + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    erow = tl.load(ROWS + rows, mask=row_ok, other=0).to(tl.int64)
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    cols = (first_tile + pid_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)

    z = logit_tile(E, C, BIAS, erow, row_ok, cols64, col_ok, D, stride_e, stride_c,
                   BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST, PRECISION)  # fmt: skip
    is_target = cols[None, :] == target[:, None]
    zt, slope = transformed(z, cols, col_ok, is_target, SHIFT0, SHIFT1, SHIFT2, scale0, scale1, scale2, cap,
                            circle_m, circle_gamma, HAS_SHIFT0, HAS_SHIFT1, HAS_SHIFT2, HAS_CAP, HAS_CIRCLE,
                            True)  # fmt: skip

    grad = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_LSE:
        # Factors carry exp(hi - lse) for the float64 tail of lse (docs/design.md, Precision).
        lse_hi = tl.load(LSE_HI + rows, mask=row_ok, other=float("inf"))[:, None]  # p = 0 on padding rows
        p = tl.exp(zt - lse_hi)
        a = tl.load(F_SOFTMAX + rows, mask=row_ok, other=0.0)[:, None]
        if HAS_PROB_DOT:
            a = a + tl.load(F_PROB_DOT + rows, mask=row_ok, other=0.0)[:, None] * zt
        grad += p * a
        if HAS_PROB_POWER:
            h = tl.load(F_PROB_POWER + rows, mask=row_ok, other=0.0)[:, None]
            grad += h * tl.exp(power * (zt - lse_hi))
    if HAS_TARGET:
        b = tl.load(F_TARGET + rows, mask=row_ok, other=0.0)[:, None]
        grad += tl.where(is_target, b, 0.0)
    if NUM_COLUMNS >= 1:
        s0 = tl.load(F_COLUMN0 + rows, mask=row_ok, other=0.0)[:, None]
        if W0_ONES:
            grad += s0
        else:
            grad += s0 * tl.load(W0 + cols, mask=col_ok, other=0.0)[None, :]
    if NUM_COLUMNS >= 2:
        s1 = tl.load(F_COLUMN1 + rows, mask=row_ok, other=0.0)[:, None]
        if W1_ONES:
            grad += s1
        else:
            grad += s1 * tl.load(W1 + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_SQUARES:
        grad += tl.load(F_SQUARES + rows, mask=row_ok, other=0.0)[:, None] * zt
    if HAS_TEMPERED:
        u = (zt + tl.where(is_target, 0.0, temper_margin)) * inv_temperature
        tempered_hi = tl.load(TEMPERED_HI + rows, mask=row_ok, other=float("inf"))[:, None]
        grad += tl.load(F_TEMPERED + rows, mask=row_ok, other=0.0)[:, None] * tl.exp(u - tempered_hi)
    grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)

    if FILTER:
        threshold = tl.load(THRESHOLD + rows, mask=row_ok, other=float("inf"))
        if tl.max(tl.max(tl.abs(grad) - threshold[:, None], 1), 0) < 0:
            return

    dz = grad * slope
    if COMPUTE_BIAS:
        tl.atomic_add(GRAD_BIAS + cols, tl.sum(dz, 0), mask=col_ok, sem="relaxed")
    if not UPCAST:
        dz = dz.to(E.dtype.element_ty)
    elif E.dtype.element_ty == tl.bfloat16:
        # The interpreter truncates float32 -> bfloat16; round to nearest even, as GPUs do.
        bits = dz.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        dz = bits.to(tl.float32, bitcast=True)
    else:
        dz = dz.to(E.dtype.element_ty).to(tl.float32)

    offs_d = tl.arange(0, BLOCK_DG)
    if COMPUTE_E:
        c_ptrs = C + cols64[:, None] * stride_c + offs_d[None, :]
        ge_ptrs = GRAD_E + erow[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BLOCK_DG):
            d_ok = offs_d < D - d0
            c = tl.load(c_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                c = c.to(tl.float32)
            part = tl.dot(dz, c, input_precision=PRECISION)
            tl.atomic_add(ge_ptrs, part, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            c_ptrs += BLOCK_DG
            ge_ptrs += BLOCK_DG
    if COMPUTE_C:
        e_ptrs = E + erow[:, None] * stride_e + offs_d[None, :]
        gc_ptrs = GRAD_C + (cols64 - grad_c_row0)[:, None] * D + offs_d[None, :]
        dz_t = tl.trans(dz)
        for d0 in range(0, D, BLOCK_DG):
            d_ok = offs_d < D - d0
            e = tl.load(e_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                e = e.to(tl.float32)
            part = tl.dot(dz_t, e, input_precision=PRECISION)
            tl.atomic_add(gc_ptrs, part, mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
            e_ptrs += BLOCK_DG
            gc_ptrs += BLOCK_DG
