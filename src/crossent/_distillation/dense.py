"""``crossent.distillation``: a divergence between a student's and a teacher's logits that you already hold."""

from __future__ import annotations

from torch import Tensor

from .._engine.dense import dense_row_losses
from .._engine.plan import Plan
from .._engine.reduction import reduce
from .._linear_call import check_normalizer
from .arguments import check_target, checked_loss, distillation_rows, per_row, row_weights
from .statistics import TEACHER


def _check_logits(student: Tensor, teacher: Tensor) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape [..., C] with C >= 1, got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")


def distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    mu: float = 0.5,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    sample_weight: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    r"""Knowledge distillation from logits: a divergence of the student's distribution from the teacher's.

    Per row, with :math:`p = \mathrm{softmax}(z / T)` (student) and :math:`p_t = \mathrm{softmax}(t / T)`
    (teacher), the loss is ``w (D(p_t, p) + ce_weight * CE(z, target))`` (``w``: ``sample_weight``, 1
    without it), with ``D`` one of

    * ``"kl"``: :math:`\mathrm{KL}(p_t \| p)` (Hinton et al. 2015; no :math:`T^2` factor);
    * ``"reverse_kl"``: :math:`\mathrm{KL}(p \| p_t)`;
    * ``"jsd"``: :math:`\beta\,\mathrm{KL}(p_t \| m) + (1-\beta)\,\mathrm{KL}(p \| m)`,
      :math:`m = \beta p_t + (1-\beta) p`; :math:`\beta = 0` / :math:`1` give ``"kl"`` / ``"reverse_kl"``
      (Agarwal et al., GKD, ICLR 2024);
    * ``"ttm"``: :math:`\mathrm{KL}(q \| p)` with :math:`q \propto p_t^\gamma` (Zheng & Yang, ICLR 2024);
    * ``"wttm"``: :math:`\sum_j p_{t,j}^\gamma \cdot \mathrm{KL}(q \| p)` (ibid.);
    * ``"akl"``: adaptive KL, head/tail-weighted forward and reverse KL (Wu et al. 2024).

    ``kl``, ``reverse_kl``, ``ttm`` and ``wttm`` are formulas over mergeable row statistics (they
    stream); ``jsd`` (:math:`0 < \beta < 1`) and ``akl`` need whole rows. Only the student gets a
    gradient; the teacher may have another floating dtype. The fused form, without either logit
    matrix, is :func:`crossent.linear_distillation`. See ``docs/distillation.md``.

    Args:
        student_logits: ``[..., C]`` (classes last), any floating dtype.
        teacher_logits: the teacher's, same shape; no gradient flows into it.
        target: optional class indices ``[...]``: rows whose target is ``ignore_index`` are skipped
            (padding); needed for ``ce_weight``. Without it every row counts.
        divergence: one of the names above.
        temperature: :math:`T > 0`, applied to both sides. Default ``1.0``.
        beta: JSD's teacher share :math:`\beta \in [0, 1]`. Default ``0.5``.
        gamma: TTM/WTTM's power :math:`\gamma > 0`. Default ``1.0``.
        mu: AKL's head mass :math:`\mu \in [0, 1]`. Default ``0.5``.
        ce_weight: weight of the cross-entropy on ``target`` (untempered logits). Default ``0.0``.
        ignore_index: target value of skipped rows.
        reduction: ``"mean"`` over counted rows, ``"sum"``, or ``"none"`` (the rows' shape).
        shift: causal-LM shift: row ``t`` pairs with ``target[..., t + 1]`` and the last position of
            each sequence drops out (also without a target).
        sample_weight: a float per row (``[...]``) multiplying its loss; under ``shift`` it moves with
            the targets (position ``t`` takes ``sample_weight[..., t + 1]``). ``mean`` still divides by
            the counted rows (or ``normalizer``).
        normalizer: the divisor of ``reduction="mean"`` instead of the counted rows (a number or a
            one-element tensor: the counted tokens of all micro-batches of a step, for gradient
            accumulation). The loss is ``sum / normalizer``.

    Example:
        >>> import torch, crossent as xe
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> t = torch.tensor([[1.5, 1.0, -2.0], [0.0, 0.0, 1.0]])
        >>> xe.distillation(s, t, reduction="none")
        tensor([0.1100, 0.0902])
        >>> xe.distillation(s, t, divergence="jsd", temperature=2.0)
        tensor(0.0071)
    """
    loss = checked_loss(
        divergence, temperature=temperature, beta=beta, gamma=gamma, mu=mu, ce_weight=ce_weight,
        ignore_index=ignore_index, reduction=reduction, has_target=target is not None,
    )  # fmt: skip
    _check_logits(student_logits, teacher_logits)
    rows_shape, num_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    check_target(target, rows_shape, student_logits.device)
    row_weight = row_weights(sample_weight, rows_shape, shift, student_logits.device)
    denominator = check_normalizer(normalizer, reduction, student_logits.device)
    teacher = teacher_logits.detach().reshape(-1, num_classes)
    rows = distillation_rows(
        target, rows_shape, num_classes, ignore_index, shift, student_logits.device, {TEACHER: teacher}
    )
    values = dense_row_losses(student_logits.reshape(-1, num_classes), Plan(loss, rows), rows)
    if row_weight is not None:
        values = values * row_weight.to(values.dtype)
    if reduction == "none":
        return per_row(values, rows_shape, shift).to(student_logits.dtype)
    return reduce(values, rows, reduction, (), student_logits.dtype, denominator)


__all__ = ["distillation"]
