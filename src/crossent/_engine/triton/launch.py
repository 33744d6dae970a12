"""Launching the kernels: argument packing, grids, buffers and the float32 gradient accumulators.

``forward_values`` runs the statistics kernel over the visited rows and merges its splits
(:mod:`.states`); ``gradients`` runs the gradient kernel on the plan's
:class:`~crossent._engine.plan.Factors` and returns ``(grad_e, grad_c, grad_bias)`` in the inputs'
dtypes. Gradients are summed in float32 by atomic adds. For bfloat16/float16 inputs
the vocabulary runs in slabs: one launch per slab accumulates that slab's rows of ``grad_c`` in a
float32 buffer of at most ``Launch.slab_bytes``, which is then cast into the gradient; every logit
tile is still formed once, and the float32 accumulator never holds all of ``grad_c``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ...stats import ACC, split_lse
from ..options import tuning
from ..plan import Factors
from .backward import gradient_kernel
from .config import Launch, launch_for, splits
from .forward import statistics_kernel
from .program import SLOTS, Program
from .states import merged_values

#: The kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they were defined): NumPy on CPU tensors.
INTERPRETED = type(statistics_kernel).__name__ == "InterpretedFunction"


def _arguments(kernel) -> set:
    return set(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


_FORWARD_ARGS = _arguments(statistics_kernel)
_BACKWARD_ARGS = _arguments(gradient_kernel)


def check_device(t: Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    if INTERPRETED and t.device.type != "cpu":
        raise ValueError(f"the triton kernels were defined under TRITON_INTERPRET=1: CPU tensors only, got {t.device}")
    if not INTERPRETED and t.device.type != "cuda":
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {t.device}; on CPU use backend='torch' (or run the kernels "
            "in Triton's interpreter: TRITON_INTERPRET=1 in the environment before Triton is first imported)"
        )


def launch_config(e: Tensor) -> Launch:
    """The tuning's launch shape if it sets one, else the one for ``e``'s dtype and device."""
    return tuning().triton_launch or launch_for(e.dtype, e.device, INTERPRETED)


def _precision(dtype: torch.dtype) -> str:
    """Float32 products as PyTorch does them: exact unless ``torch.set_float32_matmul_precision`` allows TF32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _common(program: Program, e: Tensor, c: Tensor, bias: Tensor | None) -> dict:
    """Arguments both kernels take: operands, shapes, the chain's scalars and the program's switches."""
    device = e.device
    s0, s1, s2 = program.chain.shifts(device)
    w0, w1 = program.column_weights(device)
    return dict(
        E=e, C=c, BIAS=bias, SHIFT0=s0, SHIFT1=s1, SHIFT2=s2, W0=w0, W1=w1,
        V=c.shape[0], D=c.shape[1], stride_e=e.stride(0), stride_c=c.stride(0),
        HAS_BIAS=bias is not None, UPCAST=INTERPRETED and e.dtype != torch.float32, PRECISION=_precision(e.dtype),
        **program.scalars(), **program.constants(),
    )  # fmt: skip


def _only(args: dict, names: set) -> dict:
    return {k: v for k, v in args.items() if k in names}


def forward_values(
    program: Program, e: Tensor, c: Tensor, bias: Tensor | None, index: Tensor, target: Tensor, launch: Launch
) -> dict:
    """``{stat: [M] values}`` for the rows ``e[index]`` (``target``: their class indices)."""
    m = index.shape[0]
    num_splits, per_split = splits(m, c.shape[0], launch)
    out = torch.empty((max(1, len(program.slots)), num_splits, m), dtype=torch.float32, device=e.device)
    argmax_index = torch.empty((num_splits, m), dtype=torch.int32, device=e.device) if program.has("argmax") else None
    if m:
        tiles = launch.forward
        slots = {f"SLOT_{name.upper()}": program.slots.get(name, 0) for name in SLOTS}
        args = dict(
            _common(program, e, c, bias), ROWS=index, TARGET=target, OUT=out, ARGMAX_INDEX=argmax_index, M=m,
            num_splits=num_splits, tiles_per_split=per_split, **slots,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        )  # fmt: skip
        grid = (-(-m // tiles.block_n) * num_splits,)
        statistics_kernel[grid](**_only(args, _FORWARD_ARGS), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return merged_values(program, out, argmax_index)


def row_operands(program: Program, values: dict, factors: Factors, grad_rows: Tensor, filter_eps) -> dict:
    """The backward kernel's float32 ``[rows]`` operands: the factors of :class:`~crossent._engine.plan.Factors`
    it reads, and the heads from which it rebuilds the softmaxes.

    The kernel forms ``p = exp(z' - hi)`` with ``hi`` the float32 head of ``lse``; the float64 tail
    ``lse - hi`` goes into the factors (:meth:`Factors.relative <crossent._engine.plan.Factors.relative>`),
    as the other engines fold it (docs/design.md, Precision); the same for the tempered softmax. A
    factor the kernel reads but the formula leaves out is zero. ``None``: an operand it does not read.
    """
    roles = program.roles
    zeros = torch.zeros_like(grad_rows, dtype=ACC)
    out = dict.fromkeys(("LSE_HI", "TEMPERED_HI", "THRESHOLD"))
    tail = tempered_tail = None
    if program.needs_lse:
        out["LSE_HI"], tail = split_lse(values[roles["lse"]], torch.float32)
    if program.has("tempered"):
        stat = roles["tempered"]
        out["TEMPERED_HI"], tempered_tail = split_lse(values[stat] / stat.temperature, torch.float32)
    factors = factors.relative(tail, tempered_tail)

    def read(used: bool, factor: Tensor | None) -> Tensor | None:
        return (factor if factor is not None else zeros).float() if used else None

    own, coefs = factors.own, {t.stat: t.coef for t in factors.columns}
    out.update(
        F_SOFTMAX=read(program.needs_lse, own.const),
        F_PROB_DOT=read(program.has("prob_dot"), own.logit),
        F_PROB_POWER=read(program.has("prob_power"), factors.prob_power),
        F_TARGET=read(program.has("target"), factors.onehot),
        F_SQUARES=read(program.has("squares"), factors.linear),
        F_TEMPERED=read(program.has("tempered"), factors.tempered),
    )
    for k, (stat, _) in enumerate(program.columns):
        out[f"F_COLUMN{k}"] = coefs.get(stat, zeros).float()
    if filter_eps is not None:
        out["THRESHOLD"] = (grad_rows.abs().to(ACC) * filter_eps).float()
    return out


def gradients(
    program: Program, e: Tensor, c: Tensor, bias: Tensor | None, index: Tensor, target: Tensor,
    operands: dict, need: tuple, launch: Launch,
):  # fmt: skip
    """``(grad_e, grad_c, grad_bias)`` (``None`` where ``need`` says no) in the dtypes of ``e``, ``c``, ``bias``.

    ``operands``: the per-row operands of :func:`row_operands`.
    """
    need_e, need_c, need_bias = need
    n, m = e.shape[0], index.shape[0]
    (v, d), f32 = c.shape, torch.float32
    grad_e = torch.zeros((n, d), dtype=f32, device=e.device) if need_e else None
    grad_bias = torch.zeros(v, dtype=f32, device=e.device) if need_bias else None
    tiles = launch.backward
    num_tiles = -(-v // tiles.block_v)
    direct = c.dtype == f32
    if need_c:
        grad_c = torch.zeros((v, d), dtype=f32, device=e.device) if direct else torch.empty_like(c)
        slab = num_tiles if direct else max(1, launch.slab_bytes // (4 * d * tiles.block_v))
        rows = min(slab, num_tiles) * tiles.block_v
        buffer = grad_c if direct else torch.empty((rows, d), dtype=f32, device=e.device)
    else:
        grad_c, slab, buffer = None, num_tiles, None
    dummy = torch.empty(1, dtype=f32, device=e.device)

    def row(t):
        return t if t is not None else dummy

    names = ("LSE_HI", "TEMPERED_HI", "F_SOFTMAX", "F_PROB_DOT", "F_PROB_POWER", "F_TARGET", "F_COLUMN0",
             "F_COLUMN1", "F_SQUARES", "F_TEMPERED", "THRESHOLD")  # fmt: skip
    args = dict(
        _common(program, e, c, bias), ROWS=index, TARGET=target, M=m,
        **{name: row(operands.get(name)) for name in names}, GRAD_E=row(grad_e), GRAD_BIAS=row(grad_bias),
        FILTER=operands.get("THRESHOLD") is not None, COMPUTE_E=need_e, COMPUTE_C=need_c, COMPUTE_BIAS=need_bias,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, BLOCK_DG=launch.grad_block_d,
        GROUP_N=launch.group_n,
    )  # fmt: skip
    args = _only(args, _BACKWARD_ARGS)
    row_blocks = -(-m // tiles.block_n)
    for first in range(0, num_tiles if m else 0, slab):
        count = min(slab, num_tiles - first)
        if need_c and not direct:
            buffer.zero_()
        gradient_kernel[(row_blocks * count,)](
            **args, GRAD_C=buffer if need_c else dummy, first_tile=first, num_tiles=count,
            grad_c_row0=first * tiles.block_v, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        if need_c and not direct:
            lo, hi = first * tiles.block_v, min(v, (first + count) * tiles.block_v)
            grad_c[lo:hi].copy_(buffer[: hi - lo])
    if need_c and m == 0 and not direct:
        grad_c.zero_()
    return (
        None if grad_e is None else grad_e.to(e.dtype),
        grad_c,
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


__all__ = ["INTERPRETED", "check_device", "launch_config", "forward_values", "row_operands", "gradients"]
