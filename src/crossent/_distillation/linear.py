"""``crossent.linear_distillation``: distillation between two linear heads without either logit matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._engine.chunked import chunked_loss
from .._engine.chunked.kernels import make_kernel
from .._engine.chunked.pair import PairKernel
from .._engine.chunked.paired import PairedLogits
from .._engine.options import MIN_CHUNK, LinearCrossEntropyOptions, default_chunk_size
from .._engine.plan import Plan
from .._linear_call import check_normalizer
from .._rows import compute_dtype
from .arguments import check_target, checked_loss, distillation_rows, per_row, row_weights
from .heads import head_transforms
from .statistics import TEACHER

#: ``rows.extra`` key of the teacher's hidden rows, which the engine turns into ``TEACHER`` logits.
TEACHER_HIDDEN = "teacher_hidden"

#: A chunk of the pair holds the student's logits, the teacher's and the kernel's softmaxes (about
#: four chunk-sized buffers with the fused pair kernel): half the rows of the single-head default.
PAIR_CHUNK_FRACTION = 2


def pair_chunk_size(num_classes: int, hidden: int, dtype: torch.dtype) -> int:
    """Rows per chunk of :func:`linear_distillation`: half of ``linear_cross_entropy``'s default."""
    rows = default_chunk_size(num_classes, hidden, dtype) // PAIR_CHUNK_FRACTION
    return max(MIN_CHUNK, rows - rows % MIN_CHUNK)


def engine_options(chunk_size: int | None, backend: str) -> LinearCrossEntropyOptions:
    """The row-chunked engine's options of :func:`linear_distillation`, checked (its module form too)."""
    options = LinearCrossEntropyOptions(backend=backend, chunk_size=chunk_size)
    if options.backend not in ("auto", "torch"):
        raise ValueError(f"linear_distillation runs on the row-chunked engine: backend must be 'auto' or 'torch', got {backend!r}")
    return options


def _check_heads(e_s, c_s, e_t, c_t, b_s, b_t) -> None:
    named = (("e_student", e_s), ("c_student", c_s), ("e_teacher", e_t), ("c_teacher", c_t))
    named += tuple((name, b) for name, b in (("bias_student", b_s), ("bias_teacher", b_t)) if b is not None)
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != e_s.device:
            raise ValueError(f"{name} is on {t.device} but e_student is on {e_s.device}")
    for side, e, c, b in (("student", e_s, c_s, b_s), ("teacher", e_t, c_t, b_t)):
        if e.dim() < 1:
            raise ValueError(f"e_{side} must have shape [..., D]")
        if c.dim() != 2 or c.shape[0] == 0:
            raise ValueError(f"c_{side} must be a [V, D] matrix with V >= 1, got shape {tuple(c.shape)}")
        if c.shape[1] != e.shape[-1]:
            raise ValueError(f"e_{side} has {e.shape[-1]} features but c_{side} has {c.shape[1]}")
        if c.dtype != e.dtype:
            raise TypeError(f"e_{side} and c_{side} must share one dtype, got {e.dtype} and {c.dtype}")
        if b is not None and tuple(b.shape) != (c.shape[0],):
            raise ValueError(f"bias_{side} must have shape [{c.shape[0]}] (one per class), got {tuple(b.shape)}")
        if b is not None and b.dtype != c.dtype:
            raise TypeError(f"bias_{side} must have c_{side}'s dtype {c.dtype}, got {b.dtype}")
    if c_t.shape[0] != c_s.shape[0]:
        raise ValueError(f"the teacher has {c_t.shape[0]} classes but the student has {c_s.shape[0]}")
    if tuple(e_t.shape[:-1]) != tuple(e_s.shape[:-1]):
        raise ValueError(
            f"e_teacher must have the student's rows {tuple(e_s.shape[:-1])}, got {tuple(e_t.shape[:-1])}"
        )


@torch._disable_dynamo
def linear_distillation(
    e_student: Tensor,
    c_student: Tensor,
    e_teacher: Tensor,
    c_teacher: Tensor,
    target: Tensor | None = None,
    *,
    bias_student: Tensor | None = None,
    bias_teacher: Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    mu: float = 0.5,
    ce_weight: float = 0.0,
    logit_scale_student: float = 1.0,
    logit_scale_teacher: float = 1.0,
    softcap_student: float | None = None,
    softcap_teacher: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    sample_weight: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Knowledge distillation between two linear heads, without either ``[N, V]`` logit matrix.

    Each side's logits are its head's, post-processed as stock models do (Cohere's ``logit_scale``
    :math:`s`, Gemma 2/3's ``final_logit_softcapping`` :math:`\mathrm{cap}`; either may be absent):

    .. math::

        z = \mathrm{cap}_s \tanh\big(s_s\,(e_s c_s^\top + b_s) / \mathrm{cap}_s\big), \qquad
        t = \mathrm{cap}_t \tanh\big(s_t\,(e_t c_t^\top + b_t) / \mathrm{cap}_t\big)

    and the loss per row is that of :func:`crossent.distillation` on ``z`` and ``t``,
    ``w_i (D(p_t, p) + ce_weight * CE(z, target))`` with :math:`p = \mathrm{softmax}(z / T)`,
    :math:`p_t = \mathrm{softmax}(t / T)` and ``w = sample_weight`` (1 without it), reduced by
    ``reduction`` (``mean``: divided by the counted rows, or by ``normalizer``).

    Equals :func:`crossent.distillation` on the materialised ``z`` and ``t`` (values and student
    gradients) while holding one chunk of rows of each: the row-chunked engine of
    :func:`crossent.linear_cross_entropy` forms the student's chunk, the teacher's for the same rows
    beside it, and folds the student's logit gradient into ``grad_e`` / ``grad_c`` / ``grad_bias`` at
    once for a differentiated ``mean`` / ``sum``. The teacher gets no gradient (a frozen model; it may
    be bfloat16 while the student is float32) and may have its own hidden size. Every divergence runs,
    the whole-row ones (``jsd`` with :math:`0 < \beta < 1`, ``akl``) chunk by chunk with their
    closed-form gradients.

    Args:
        e_student: student hidden states ``[..., D]``; float32, float64, bfloat16 or float16.
        c_student: student classifier ``[V, D]``, same dtype.
        e_teacher: teacher hidden states ``[..., D_t]`` (the student's rows).
        c_teacher: teacher classifier ``[V, D_t]``, same dtype as ``e_teacher``.
        target, divergence, temperature, beta, gamma, mu, ce_weight, ignore_index, reduction, shift:
            as in :func:`crossent.distillation` (rows whose target is ``ignore_index`` are skipped).
        bias_student: optional ``[V]`` bias of the student's head (``c_student``'s dtype; differentiated).
        bias_teacher: optional ``[V]`` bias of the teacher's head (``c_teacher``'s dtype; no gradient).
        logit_scale_student, logit_scale_teacher: :math:`s > 0`, multiplying each head's logits first
            (Cohere's ``config.logit_scale``). Default ``1.0``.
        softcap_student, softcap_teacher: :math:`\mathrm{cap} > 0` of ``cap * tanh(logits / cap)``
            (Gemma 2/3's ``config.final_logit_softcapping``); ``None`` (default) or ``math.inf``: none.
        sample_weight: a float per row (``e_student``'s rows ``[...]``) multiplying its loss; under
            ``shift`` it moves with the targets (position ``t`` takes ``sample_weight[..., t + 1]``).
            ``mean`` still divides by the counted rows (or ``normalizer``), not by the weights.
        normalizer: the divisor of ``reduction="mean"`` instead of the counted rows: a number or a
            one-element tensor, e.g. transformers' ``num_items_in_batch`` (the counted tokens of every
            micro-batch of an optimizer step), so that micro-batches summed over gradient accumulation
            equal one large batch. The loss is ``sum / normalizer``.
        chunk_size: rows per chunk; default half of :func:`crossent.default_chunk_size` (two logit
            blocks and the kernel's softmaxes share the budget: 176 rows at V = 131072, D = 1024).
        backend: ``"auto"`` or ``"torch"`` (the row-chunked engine).

    Returns:
        The loss: a scalar, or ``[...]`` per row for ``reduction="none"`` (without the last position
        under ``shift``); float32 for float32, bfloat16 and float16 students, float64 for float64 (the
        rule of every fused entry point, ``docs/linear.md``, "The loss's dtype").

    Example:
        >>> import torch, crossent as xe
        >>> g = torch.Generator().manual_seed(0)
        >>> e_s, c_s = torch.randn(4, 3, generator=g), torch.randn(10, 3, generator=g)
        >>> e_t, c_t = torch.randn(4, 5, generator=g), torch.randn(10, 5, generator=g)
        >>> xe.linear_distillation(e_s, c_s, e_t, c_t, divergence="reverse_kl")
        tensor(1.0018)
        >>> xe.distillation(e_s @ c_s.T, e_t @ c_t.T, divergence="reverse_kl")
        tensor(1.0018)
        >>> b = torch.linspace(-1.0, 1.0, 10)
        >>> xe.linear_distillation(e_s, c_s, e_t, c_t, bias_student=b, softcap_student=2.0, softcap_teacher=2.0,
        ...                        reduction="none")
        tensor([1.2178, 0.7944, 0.4860, 0.5239])
        >>> capped = lambda x: 2.0 * torch.tanh(x / 2.0)
        >>> xe.distillation(capped(e_s @ c_s.T + b), capped(e_t @ c_t.T), reduction="none")
        tensor([1.2178, 0.7944, 0.4860, 0.5239])
    """
    options = engine_options(chunk_size, backend)
    loss = checked_loss(
        divergence, temperature=temperature, beta=beta, gamma=gamma, mu=mu, ce_weight=ce_weight,
        ignore_index=ignore_index, reduction=reduction, has_target=target is not None,
    )  # fmt: skip
    student_transforms = head_transforms("student", logit_scale_student, softcap_student)
    teacher_transforms = head_transforms("teacher", logit_scale_teacher, softcap_teacher)
    _check_heads(e_student, c_student, e_teacher, c_teacher, bias_student, bias_teacher)
    rows_shape, (num_classes, dim) = tuple(e_student.shape[:-1]), c_student.shape
    check_target(target, rows_shape, e_student.device)
    row_weight = row_weights(sample_weight, rows_shape, shift, e_student.device)
    denominator = check_normalizer(normalizer, reduction, e_student.device)
    num_rows = math.prod(rows_shape)  # (a reshape to [-1, D] is ambiguous at D = 0)
    hidden_t = e_teacher.detach().reshape(num_rows, e_teacher.shape[-1])
    rows = distillation_rows(
        target, rows_shape, num_classes, ignore_index, shift, e_student.device, {TEACHER_HIDDEN: hidden_t}
    )
    if options.chunk_size is None:
        options = options.replace(chunk_size=pair_chunk_size(num_classes, dim, e_student.dtype))
    plan = Plan(loss, rows, student_transforms)

    def kernel(plan, report):
        inner = PairKernel(plan, TEACHER) if PairKernel.supports(plan) else make_kernel(plan, report)
        return PairedLogits(
            inner, c_teacher, bias_teacher, hidden_key=TEACHER_HIDDEN, logits_key=TEACHER, transforms=teacher_transforms
        )

    with torch.autocast(e_student.device.type, enabled=False):
        value, _ = chunked_loss(
            e_student.reshape(num_rows, dim), c_student, bias_student, plan, rows, reduction=reduction,
            options=options, kernel=kernel, row_weight=row_weight, denominator=denominator,
        )  # fmt: skip
    if reduction == "none":
        value = per_row(value, rows_shape, shift)
    return value.to(compute_dtype(e_student.dtype))


__all__ = ["engine_options", "linear_distillation", "pair_chunk_size"]
