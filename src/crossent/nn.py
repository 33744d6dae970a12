"""Thin ``torch.nn.Module`` wrappers around the functional entry points.

A wrapper registers the stateful parts of its loss (:meth:`crossent.losses.Loss.state_modules`) as
submodules, so its ``state_dict()``, ``load_state_dict()``, ``.to()``, ``train()`` and ``eval()`` reach
the loss's state.
"""

from __future__ import annotations

import difflib
import inspect

import torch
from torch import Tensor, nn
from torch.nn import _reduction as _Reduction

from . import _validation as V
from ._distillation import distillation, linear_distillation
from ._distillation.arguments import checked_loss
from ._distillation.heads import check_heads
from ._distillation.linear import engine_options
from ._functional import cross_entropy
from ._linear import linear_cross_entropy
from ._linear_call import resolve_options
from .contrastive import check_info_nce_options, check_pair_circle_options, info_nce, pair_circle_loss
from .losses._build import build_loss

__all__ = [
    "CrossEntropy",
    "CrossEntropyLoss",
    "DistillationLoss",
    "InfoNCELoss",
    "LinearCrossEntropy",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "PairCircleLoss",
]  # fmt: skip


def _register_loss(module: nn.Module, loss) -> None:
    """``module.loss = loss``; stateful parts become submodules (``loss`` itself when it is one)."""
    if isinstance(loss, nn.Module):
        module.loss = loss
        return
    object.__setattr__(module, "loss", loss)
    parts = loss.state_modules()
    if parts:
        module.loss_state = nn.ModuleList(parts)


def _refuse_loss_as_weight(weight) -> None:
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(
            f"weight must be a tensor of class weights or None, got {type(weight).__name__} {weight!r}; the first "
            "positional argument is PyTorch's weight: pass the loss by keyword (loss=...)"
        )


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`crossent.cross_entropy`, with the signature of ``torch.nn.CrossEntropyLoss``.

    The positional arguments are PyTorch's, in its order (``weight`` first); crossent's options
    (``loss``, ``z_loss``, ``softcap``) are keyword-only. ``CrossEntropy`` is the same class.

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> crit(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]))
        tensor(0.3913)
        >>> xe.nn.CrossEntropyLoss(torch.tensor([1.0, 2.0, 0.5]), loss="focal")
        CrossEntropyLoss(loss=Focal(gamma=2.0, alpha=None), reduction='mean', ignore_index=-100)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        loss="ce",
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        _refuse_loss_as_weight(weight)
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        V.check_reduction(reduction)
        _register_loss(self, build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss))
        self.register_buffer("weight", weight)
        self.ignore_index = V.check_ignore_index(ignore_index)
        self.reduction = reduction
        self.softcap = V.check_softcap(softcap)

    def forward(self, input: Tensor, target: Tensor, extra: dict[str, Tensor] | None = None) -> Tensor:
        """``extra`` carries per-row tensors for losses that read them (e.g. ``sample_ids``)."""
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            loss=self.loss,
            softcap=self.softcap,
            extra=extra,
        )

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`crossent.linear_cross_entropy`, with the signature of
    ``torch.nn.LinearCrossEntropyLoss``; ``LinearCrossEntropy`` is the same class.

    Two ways to hold the classifier:

    * ``LinearCrossEntropyLoss(in_features, num_classes, bias=False, device=None, dtype=None, ...)``
      owns it, as PyTorch's module does (``self.linear``, an ``nn.Linear``): ``crit(input, target)``.
    * ``LinearCrossEntropyLoss(...)`` without sizes takes it at call time:
      ``crit(h, model.lm_head.weight, labels, bias=None)``, so tied or sharded weights need no
      special handling.

    PyTorch's keyword arguments keep their meaning (``reduction``, ``weight``, ``ignore_index``:
    ``None`` is -100, ``label_smoothing``); ``options`` is a :class:`crossent.LinearCrossEntropyOptions`.
    crossent's own options are keyword arguments too. PyTorch's K-dimensional ``out_features`` is not
    supported (the classifier is ``[V, D]``).

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.LinearCrossEntropyLoss(z_loss=1e-2)
        >>> e = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
        >>> crit(e, c, torch.tensor([0, 2]))
        tensor(1.3701)
        >>> owned = xe.nn.LinearCrossEntropyLoss(2, 3, bias=True)
        >>> owned.linear
        Linear(in_features=2, out_features=3, bias=True)
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int | None = None,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        loss="ce",
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: bool = False,
        backend: str = "auto",
        chunk_size: int | None = None,
        return_stats: bool = False,
        accum_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(in_features, str) or hasattr(in_features, "row_loss"):
            raise TypeError(
                f"in_features must be an int or None, got {in_features!r}; the positional arguments are PyTorch's "
                "(in_features, num_classes): pass the loss by keyword (loss=...)"
            )
        if (in_features is None) != (num_classes is None):
            raise TypeError("give both in_features and num_classes (the module owns its classifier) or neither")
        if tuple(out_features) != ():
            raise ValueError(
                f"out_features={tuple(out_features)}: crossent's classifier is a [V, D] matrix (PyTorch's "
                "K-dimensional loss is not supported)"
            )
        _refuse_loss_as_weight(weight)
        V.check_reduction(reduction)
        self.options = resolve_options(options, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)
        _register_loss(self, build_loss(loss, label_smoothing=label_smoothing, z_loss=z_loss))
        if in_features is not None:
            in_features = V.count("in_features", in_features, 0)
            num_classes = V.count("num_classes", num_classes, 1)
            # The call's own check of the class weights (shape, dtype, finite values), now that V is known.
            V.check_class_weight(weight, num_classes, device=None, dtype=None)
            self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        else:
            if bias:
                raise ValueError("bias=True needs in_features and num_classes; otherwise pass the bias at call time")
            self.linear = None
        self.register_buffer("weight", weight)
        self.ignore_index = -100 if ignore_index is None else V.check_ignore_index(ignore_index)
        self.reduction = reduction
        self.softcap = V.check_softcap(softcap)
        self.shift = shift
        self.return_stats = return_stats

    def forward(self, input: Tensor, *args, bias: Tensor | None = None, extra: dict[str, Tensor] | None = None):
        """``crit(input, target)`` with an owned classifier, else ``crit(e, c, target, bias=None)``.

        ``extra`` carries per-row tensors for losses that read them (e.g. ``sample_ids``).
        """
        if self.linear is not None:
            if len(args) != 1 or bias is not None:
                raise TypeError("this module owns its classifier (self.linear): call it as crit(input, target)")
            (target,) = args
            c, bias = self.linear.weight, self.linear.bias
        else:
            if len(args) not in (2, 3) or (len(args) == 3 and bias is not None):
                raise TypeError(
                    "this module takes the classifier at call time: crit(e, c, target, bias=None) "
                    "(or build it with in_features and num_classes to own one)"
                )
            c, target = args[:2]
            bias = args[2] if len(args) == 3 else bias
        return linear_cross_entropy(
            input,
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
    """A module whose forward calls ``function`` with the keyword arguments fixed at construction.

    The options are ``function``'s keyword-only arguments except ``at_call`` (the forward's own), and
    are checked here, once: an unknown name raises ``TypeError`` as Python's call would, a bad value
    the error of one of ``checks``, the function's own checks, each given the options it reads.
    """

    def __init__(self, function, checks: tuple, at_call: tuple = (), **options):
        super().__init__()
        parameters = inspect.signature(function).parameters.items()
        allowed = {k: p.default for k, p in parameters if p.kind is p.KEYWORD_ONLY and k not in at_call}
        for name in options:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid options: {', '.join(allowed)}"
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}; {hint}")
        values = {**allowed, **options}
        for check in checks:
            check(**{k: values[k] for k in inspect.signature(check).parameters if k in values})
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


#: The distillation functions' keyword arguments that come with each call (tensors of the batch), not options.
_PER_CALL = ("sample_weight", "normalizer")
_HEAD_BIASES = ("bias_student", "bias_teacher")


class DistillationLoss(_Options):
    """Module form of :func:`crossent.distillation`: ``crit(student_logits, teacher_logits, target=None)``
    (``sample_weight=`` and ``normalizer=`` come with each call).

    The options are :func:`crossent.distillation`'s keyword arguments, checked here.

    Example:
        >>> import torch, crossent as xe
        >>> crit = xe.nn.DistillationLoss(divergence="reverse_kl", temperature=2.0)
        >>> crit(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[1.5, 1.0, -2.0]]))
        tensor(0.0348)
    """

    def __init__(self, divergence: str = "kl", **options):
        super().__init__(distillation, (checked_loss,), _PER_CALL, divergence=divergence, **options)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, *,
        sample_weight: Tensor | None = None, normalizer: float | Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        return distillation(
            student_logits, teacher_logits, target, sample_weight=sample_weight, normalizer=normalizer, **self.options
        )


class LinearDistillationLoss(_Options):
    """Module form of :func:`crossent.linear_distillation`: ``crit(e_student, c_student, e_teacher, c_teacher, target=None)``.

    The classifiers are passed at call time (``crit(h, student.lm_head.weight, h_t, teacher.lm_head.weight)``),
    and so are the per-call tensors (``bias_student``, ``bias_teacher``, ``sample_weight``, ``normalizer``);
    the options are :func:`crossent.linear_distillation`'s other keyword arguments, checked here.
    """

    def __init__(self, divergence: str = "kl", **options):
        checks = (checked_loss, engine_options, check_heads)
        super().__init__(linear_distillation, checks, _PER_CALL + _HEAD_BIASES, divergence=divergence, **options)

    def forward(
        self, e_student, c_student, e_teacher, c_teacher, target: Tensor | None = None, *,
        bias_student: Tensor | None = None, bias_teacher: Tensor | None = None,
        sample_weight: Tensor | None = None, normalizer: float | Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        return linear_distillation(
            e_student, c_student, e_teacher, c_teacher, target, bias_student=bias_student, bias_teacher=bias_teacher,
            sample_weight=sample_weight, normalizer=normalizer, **self.options,
        )  # fmt: skip


class InfoNCELoss(_Options):
    """Module form of :func:`crossent.contrastive.info_nce`: ``crit(query, key, positive=None, exclude=None)``.

    The options are :func:`~crossent.contrastive.info_nce`'s keyword arguments but ``exclude``, checked here.
    """

    def __init__(self, temperature: float = 0.07, **options):
        super().__init__(info_nce, (check_info_nce_options,), ("exclude",), temperature=temperature, **options)

    def forward(self, query: Tensor, key: Tensor, positive: Tensor | None = None, exclude: Tensor | None = None) -> Tensor:
        return info_nce(query, key, positive, exclude=exclude, **self.options)


class PairCircleLoss(_Options):
    """Module form of :func:`crossent.contrastive.pair_circle_loss`: ``crit(embeddings, labels)``.

    The options (``m``, ``gamma``, ``reduction``) are checked here.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, **options):
        at_call = ("ref_embeddings", "ref_labels")
        super().__init__(pair_circle_loss, (check_pair_circle_options,), at_call, m=m, gamma=gamma, **options)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings=None, ref_labels=None) -> Tensor:
        return pair_circle_loss(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels, **self.options)


#: The names under which these modules first shipped.
CrossEntropy = CrossEntropyLoss
LinearCrossEntropy = LinearCrossEntropyLoss
