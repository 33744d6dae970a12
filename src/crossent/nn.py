"""Thin ``torch.nn.Module`` wrappers around the functional entry points.

A wrapper registers the stateful parts of its loss (:meth:`crossent.losses.Loss.state_modules`) as
submodules, so its ``state_dict()``, ``load_state_dict()``, ``.to()``, ``train()`` and ``eval()`` reach
the loss's state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validation as V
from ._distillation import distillation, linear_distillation
from .contrastive import info_nce, pair_circle_loss
from .functional import cross_entropy
from .linear import linear_cross_entropy, resolve_options
from .losses._build import build_loss

__all__ = ["CrossEntropy", "LinearCrossEntropy", "Distillation", "LinearDistillation", "InfoNCE", "PairCircleLoss"]


def _register_loss(module: nn.Module, loss) -> None:
    """``module.loss = loss``; stateful parts become submodules (``loss`` itself when it is one)."""
    if isinstance(loss, nn.Module):
        module.loss = loss
        return
    object.__setattr__(module, "loss", loss)
    parts = loss.state_modules()
    if parts:
        module.loss_state = nn.ModuleList(parts)


class CrossEntropy(nn.Module):
    """Module form of :func:`crossent.cross_entropy` (same arguments, fixed at construction).

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.CrossEntropy(label_smoothing=0.1)
        >>> crit(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]))
        tensor(0.3913)
    """

    def __init__(
        self,
        loss="ce",
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        V.check_reduction(reduction)
        _register_loss(self, build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss))
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor, extra: dict[str, Tensor] | None = None) -> Tensor:
        """``extra`` carries per-row tensors for losses that read them (e.g. ``sample_ids``)."""
        return cross_entropy(
            input,
            target,
            extra=extra,
            loss=self.loss,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`crossent.linear_cross_entropy`: ``crit(e, c, target, bias=None)``.

    The classifier is passed at call time (``crit(h, model.lm_head.weight, labels)``), so tied or
    sharded weights need no special handling.

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.LinearCrossEntropy(z_loss=1e-2)
        >>> e = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
        >>> crit(e, c, torch.tensor([0, 2]))
        tensor(1.3701)
    """

    def __init__(
        self,
        loss="ce",
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: bool = False,
        backend: str = "auto",
        chunk_size: int | None = None,
        return_stats: bool = False,
        accum_dtype: torch.dtype | None = None,
        options=None,
    ):
        super().__init__()
        V.check_reduction(reduction)
        self.options = resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)
        _register_loss(self, build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss))
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap
        self.shift = shift
        self.return_stats = return_stats

    def forward(self, e: Tensor, c: Tensor, target: Tensor, bias: Tensor | None = None, extra: dict[str, Tensor] | None = None):
        """``extra`` carries per-row tensors for losses that read them (e.g. ``sample_ids``)."""
        return linear_cross_entropy(
            e,
            c,
            target,
            bias=bias,
            loss=self.loss,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            softcap=self.softcap,
            shift=self.shift,
            return_stats=self.return_stats,
            extra=extra,
            options=self.options,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}, shift={self.shift}, backend={self.options.backend!r}"


class _Options(nn.Module):
    """A module whose forward calls one function with the keyword arguments fixed at construction."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class Distillation(_Options):
    """Module form of :func:`crossent.distillation`: ``crit(student_logits, teacher_logits, target=None)``.

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.Distillation(divergence="reverse_kl", temperature=2.0)
        >>> crit(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[1.5, 1.0, -2.0]]))
        tensor(0.0348)
    """

    def __init__(self, divergence: str = "kl", **options):
        V.check_reduction(options.get("reduction", "mean"))
        super().__init__(divergence=divergence, **options)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return distillation(student_logits, teacher_logits, target, **self.options)


class LinearDistillation(_Options):
    """Module form of :func:`crossent.linear_distillation`: ``crit(e_student, c_student, e_teacher, c_teacher, target=None)``.

    The classifiers are passed at call time (``crit(h, student.lm_head.weight, h_t, teacher.lm_head.weight)``).
    """

    def __init__(self, divergence: str = "kl", **options):
        V.check_reduction(options.get("reduction", "mean"))
        super().__init__(divergence=divergence, **options)

    def forward(self, e_student, c_student, e_teacher, c_teacher, target: Tensor | None = None) -> Tensor:
        return linear_distillation(e_student, c_student, e_teacher, c_teacher, target, **self.options)


class InfoNCE(_Options):
    """Module form of :func:`crossent.contrastive.info_nce`: ``crit(query, key, positive=None, exclude=None)``."""

    def __init__(self, temperature: float = 0.07, **options):
        V.check_reduction(options.get("reduction", "mean"))
        super().__init__(temperature=temperature, **options)

    def forward(self, query: Tensor, key: Tensor, positive: Tensor | None = None, exclude: Tensor | None = None) -> Tensor:
        return info_nce(query, key, positive, exclude=exclude, **self.options)


class PairCircleLoss(_Options):
    """Module form of :func:`crossent.contrastive.pair_circle_loss`: ``crit(embeddings, labels)``."""

    def __init__(self, m: float = 0.4, gamma: float = 80.0, **options):
        V.check_reduction(options.get("reduction", "mean"))
        super().__init__(m=m, gamma=gamma, **options)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings=None, ref_labels=None) -> Tensor:
        return pair_circle_loss(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels, **self.options)
