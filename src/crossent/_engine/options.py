"""The knobs of the fused linear engines, gathered in frozen objects.

:class:`LinearCrossEntropyOptions` is what ``crossent.linear_cross_entropy`` hands to an engine (its
``chunk_size``, ``accum_dtype`` and ``backend`` arguments fill it in, or pass one as ``options=``).
Every engine reads the fields it understands; the defaults resolve per call (:meth:`chunk_rows`,
:meth:`accumulator`).

:class:`Tuning` holds the engines' internal block sizes and routes, which change speed and memory but
not what is computed (beyond rounding); :func:`tuned` sets them for a block of code, :func:`tuning`
reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch

from .. import _validation as V
from .._rows import compute_dtype

#: The default chunk: at least ``SPEED_ROWS`` rows (the matrix products of a chunk read all of ``c``
#: and ``grad_c``; below a few hundred rows that traffic, not arithmetic, sets their speed), more rows
#: while the chunk takes under ``SMALL_BYTES`` (fewer, larger products for small vocabularies), and
#: never more than ``MAX_BYTES``. Half-precision inputs whose ``grad_c`` is summed in float32 pay one
#: more pass over that ``V x D`` accumulator per chunk: they aim for ``HALF_ACCUM_ROWS`` rows and may
#: take up to half the accumulator's bytes.
SPEED_ROWS = 512
HALF_ACCUM_ROWS = 1024
SMALL_BYTES = 32 * 2**20
MAX_BYTES = 192 * 2**20
MIN_CHUNK, MAX_CHUNK = 16, 8192

MODES = ("auto", "eager", "recompute")
BACKENDS = ("auto", "torch", "triton")


def _is_floating_dtype(value) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point


def default_chunk_size(
    num_classes: int, hidden: int = 0, dtype: torch.dtype = torch.float32, accum_dtype: torch.dtype | None = None
) -> int:
    """Rows per chunk for ``V = num_classes`` classes and ``D = hidden`` features.

    A row of a chunk costs ``V`` logits (float32, or the input dtype for bfloat16/float16, whose
    float32 copy is staged a few rows at a time) and a few ``D``-vectors. The chunk gets
    ``max(SPEED_ROWS, SMALL_BYTES / row)`` rows, capped at ``MAX_BYTES / row``, within ``[16, 8192]``
    and rounded down to a multiple of 16. For float32 and D = 1024: V = 32768 gives 512 rows (64 MiB
    of logits), V = 131072 gives 368 rows (184 MiB), V = 256000 gives 192 rows, V = 1000 gives 2048
    rows.

    ``accum_dtype``: the dtype in which ``c``'s gradient is summed over the chunks (``None``: no
    gradient for ``c``). Half-precision inputs with a float32 accumulator add each chunk's product to
    it in a separate pass (no CPU product of half inputs writes float32), so their chunk aims for
    ``HALF_ACCUM_ROWS`` rows, capped at ``MAX_BYTES`` or at ``D`` rows (logits of half the
    accumulator's ``4 V D`` bytes), whichever allows more: bfloat16 at V = 131072 and D = 1024 gives
    1024 rows (256 MiB beside a 512 MiB accumulator), against 512 without that accumulator.

    Raises ``ValueError`` for fewer than one class or a negative ``hidden``, ``TypeError`` for
    non-integers or a ``dtype`` / ``accum_dtype`` that is not a floating ``torch.dtype``.
    """
    V.count("num_classes", num_classes, 1, who="default_chunk_size")
    V.count("hidden", hidden, 0, who="default_chunk_size")
    if not _is_floating_dtype(dtype):
        raise TypeError(f"default_chunk_size: dtype must be a floating torch.dtype, got {dtype!r}")
    if accum_dtype is not None and not _is_floating_dtype(accum_dtype):
        raise TypeError(f"default_chunk_size: accum_dtype must be None or a floating torch.dtype, got {accum_dtype!r}")
    row = max(1, num_classes * dtype.itemsize + 3 * hidden * 4)
    speed_rows, max_rows = SPEED_ROWS, MAX_BYTES // row
    if dtype.itemsize == 2 and accum_dtype is not None and accum_dtype.itemsize == 4:
        # D rows of half-precision logits take half the 4 V D bytes of the accumulator.
        speed_rows, max_rows = HALF_ACCUM_ROWS, max(max_rows, hidden)
    rows = min(max(speed_rows, SMALL_BYTES // row), max_rows)
    rows = max(MIN_CHUNK, min(MAX_CHUNK, rows))
    return rows - rows % MIN_CHUNK


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """How :func:`crossent.linear_cross_entropy` runs; every field has a default that resolves per call.

    Attributes:
        backend: ``"auto"`` (the fastest engine that applies: ``"triton"`` for CUDA tensors when Triton
            is installed and the loss streams through its kernels, else ``"torch"``), ``"torch"`` (the
            row-chunked engine, any device) or ``"triton"`` (tiled GPU kernels, docs/triton.md).
        chunk_size: rows of logits per chunk; ``None``: :func:`default_chunk_size`.
        accum_dtype: dtype in which ``c``'s gradient is summed over the chunks; ``None``: float32
            (float64 for float64 inputs), or the input dtype (half precision: faster, one rounding per
            chunk).
        mode: ``"auto"`` (gradients formed during the forward pass for a differentiated ``mean`` /
            ``sum``, recomputed in backward otherwise), or force ``"eager"`` / ``"recompute"``. The
            ``triton`` backend always recomputes.
        filter_eps: ``triton`` backend only: skip the gradient of a ``[rows, classes]`` tile where every
            entry of ``dL/dz`` is below ``filter_eps`` times its row's upstream gradient (Cut
            Cross-Entropy's gradient filter). ``None`` (default): exact, nothing skipped.
    """

    backend: str = "auto"
    chunk_size: int | None = None
    accum_dtype: torch.dtype | None = None
    mode: str = "auto"
    filter_eps: float | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid backends: {', '.join(repr(b) for b in BACKENDS)}")
        cs = self.chunk_size
        if cs is not None and (isinstance(cs, bool) or not isinstance(cs, int) or cs < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {cs!r}")
        if self.accum_dtype is not None and self.accum_dtype not in (
            torch.float16, torch.bfloat16, torch.float32, torch.float64
        ):  # fmt: skip
            raise ValueError(f"accum_dtype must be None or a floating dtype, got {self.accum_dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        eps = self.filter_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf")):
            raise ValueError(f"filter_eps must be None or a finite number >= 0, got {eps!r}")

    def replace(self, **changes) -> LinearCrossEntropyOptions:
        return dataclasses.replace(self, **changes)

    def accumulator(self, dtype: torch.dtype) -> torch.dtype:
        """The ``grad_c`` accumulator's dtype for inputs of ``dtype`` (checked against it)."""
        compute = compute_dtype(dtype)
        if self.accum_dtype is None:
            return compute
        if self.accum_dtype not in (compute, dtype):
            raise ValueError(f"accum_dtype must be None, {compute} or the input dtype {dtype}, got {self.accum_dtype}")
        return self.accum_dtype

    def chunk_rows(self, num_classes: int, hidden: int, dtype: torch.dtype, summed: torch.dtype | None) -> int:
        """Rows per chunk (``summed``: the ``grad_c`` accumulator's dtype, ``None`` without that gradient)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return default_chunk_size(num_classes, hidden, dtype, summed)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The engines' internal block sizes and routes: speed and memory, never what is computed (beyond rounding).

    An engine reads the current tuning (:func:`tuning`) once, when a call starts, except the softmax
    route, which is read where the softmax runs; :func:`tuned` changes it for a block of code (the
    tests force small blocks and other devices' routes with it).

    Attributes:
        stage_bytes: half-precision chunks of the row-chunked engine reach its kernel through a
            float32 staging buffer of about this many bytes of rows (:func:`.chunked.chunks.stage_rows`).
        transpose_block_bytes: the half-precision ``grad_c`` accumulator is added to and transposed in
            blocks of columns of about this many bytes (:func:`.chunked.gradients.column_block`).
        fused_softmax: use the device's in-place fused softmax where it has one
            (:data:`.softmax.FUSED_SOFTMAX_DEVICES`); ``False``: the route of every other device.
        triton_launch: the Triton kernels' tiles and launch shape (a :class:`.triton.config.Launch`);
            ``None``: chosen by device and dtype.
    """

    stage_bytes: int = 32 * 2**20
    transpose_block_bytes: int = 4 * 2**20
    fused_softmax: bool = True
    triton_launch: object | None = None  # a triton.config.Launch (not imported here: the engines import this module)

    def __post_init__(self):
        for name in ("stage_bytes", "transpose_block_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


_TUNING: contextvars.ContextVar[Tuning] = contextvars.ContextVar("crossent_tuning", default=Tuning())


def tuning() -> Tuning:
    """The engines' current :class:`Tuning`."""
    return _TUNING.get()


@contextlib.contextmanager
def tuned(**changes):
    """Run a block of code with some fields of :class:`Tuning` changed (``with tuned(stage_bytes=4096): ...``)."""
    token = _TUNING.set(dataclasses.replace(tuning(), **changes))
    try:
        yield _TUNING.get()
    finally:
        _TUNING.reset(token)
