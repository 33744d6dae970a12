"""Tile sizes and launch shapes of the Triton kernels, per dtype and for Triton's CPU interpreter.

The GPU tiles follow what tensor-core kernels of this shape use (Cut Cross-Entropy's defaults:
128 x 128 logit tiles over 32 features for bfloat16/float16; narrower row tiles for float32, whose
exact products run without tensor cores). The interpreter runs each program as NumPy operations,
so its tiles are small (tests use shapes that are not multiples of any of them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile: rows, classes and features per step, and the launch's warps and stages."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class Launch:
    """How both kernels run for one dtype.

    ``grad_block_d``: features per step of the backward's gradient products. ``programs``: forward
    programs to aim for (the vocabulary is split to fill the device). ``slab_bytes``: largest float32
    ``grad_c`` accumulator of one backward launch for half-precision inputs (the vocabulary runs in
    slabs, each cast into the gradient when done).
    """

    forward: Tiles
    backward: Tiles
    grad_block_d: int
    programs: int
    slab_bytes: int
    group_n: int = 8

    def replace(self, **changes) -> Launch:
        return replace(self, **changes)


HALF = Launch(Tiles(128, 128, 32, 4, 3), Tiles(128, 128, 32, 8, 3), grad_block_d=64, programs=0, slab_bytes=256 * 2**20)
FLOAT = Launch(Tiles(32, 128, 32, 4, 3), Tiles(32, 128, 32, 4, 2), grad_block_d=32, programs=0, slab_bytes=256 * 2**20)
#: The interpreter: small tiles, two vocabulary splits per row block and several slabs on small inputs.
INTERPRETER = Launch(Tiles(32, 128, 16), Tiles(32, 128, 16), grad_block_d=16, programs=4, slab_bytes=128 * 24 * 4)
#: Forward programs per multiprocessor on a GPU.
PROGRAMS_PER_SM = 4


def launch_for(dtype: torch.dtype, device: torch.device, interpreted: bool) -> Launch:
    if interpreted:
        return INTERPRETER
    launch = FLOAT if dtype == torch.float32 else HALF
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return launch.replace(programs=PROGRAMS_PER_SM * sms)


def splits(num_rows: int, num_classes: int, launch: Launch) -> tuple[int, int]:
    """``(splits, tiles per split)`` of the vocabulary for the forward kernel."""
    tiles = -(-num_classes // launch.forward.block_v)
    row_blocks = max(1, -(-num_rows // launch.forward.block_n))
    wanted = max(1, min(tiles, -(-launch.programs // row_blocks)))
    per_split = -(-tiles // wanted)
    return -(-tiles // per_split), per_split


__all__ = ["Tiles", "Launch", "HALF", "FLOAT", "INTERPRETER", "launch_for", "splits"]
