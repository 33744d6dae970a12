"""Long-tailed classification: class-balanced weights and logit adjustment."""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses._base import Loss, Transformed, resolve
from ..transforms import ClassBias
from .._rows import compute_dtype
from ._base import Strategy, check_index_tensor, check_losses, check_vector


class ClassBalanced(Strategy):
    r"""Class-balanced weights from the effective number of samples (Cui et al., CVPR 2019).

    .. math::

        w_c = \frac{1 - \beta}{1 - \beta^{n_c}}, \qquad
        w \leftarrow w \cdot \frac{C}{\sum_c w_c}

    so the class weights sum to the number of classes ``C``. Each row gets ``w[target]``; the loss
    is the plain mean of the weighted rows over the non-ignored rows, ``sum_i w_{y_i} l_i / N``, as
    the official softmax code does (TensorFlow's ``SUM_BY_NONZERO_WEIGHTS``). That is *not*
    PyTorch's weighted mean, which divides by ``sum_i w_{y_i}``: pass :attr:`class_weights` as
    ``weight=`` to a crossent or PyTorch loss for that one.

    ``beta = 0`` gives uniform weights; ``beta -> 1`` tends to inverse class frequency. The paper
    searches ``beta`` in ``{0.9, 0.99, 0.999, 0.9999}``; the official scripts use ``0.9999``.

    Args:
        counts: ``[C]`` number of training examples per class (all positive).
        beta: in ``[0, 1)``. Default ``0.9999``.
        ignore_index: target value whose rows get weight 0 and are not counted. Default ``-100``.

    Inputs: ``losses`` of any shape, ``target=`` class indices of the same shape.

    Example:
        >>> import torch
        >>> from crossent.weighting import ClassBalanced
        >>> cb = ClassBalanced(counts=[1000, 100, 10], beta=0.999)
        >>> cb.class_weights
        tensor([0.0422, 0.2800, 2.6778])
        >>> losses, target = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 1, 2])
        >>> cb.weights(losses, target=target)
        tensor([0.0422, 0.2800, 2.6778])
        >>> cb(losses, target=target)
        tensor(1.8856)

    Reference: Cui et al., *Class-Balanced Loss Based on Effective Number of Samples*, CVPR 2019
    (official code: ``richardaecn/class-balanced-loss``, ``src/cifar_main.py``).
    """

    def __init__(self, counts, beta: float = 0.9999, *, ignore_index: int = -100):
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ClassBalanced: beta must be in [0, 1), got {beta}")
        counts = check_vector(counts, "counts", "ClassBalanced")
        if (counts == 0).any():
            i = int((counts == 0).nonzero()[0, 0])
            raise ValueError(
                f"ClassBalanced: class {i} has no examples (count 0), which gives it an infinite weight; "
                "drop the class or clamp the counts to at least 1"
            )
        self.counts = counts
        self.beta = beta
        self.ignore_index = int(ignore_index)
        # 1 - beta^n written as -expm1(n log beta): exact for beta close to 1 and small n.
        if beta > 0:
            effective = -torch.expm1(counts * torch.log(torch.tensor(beta, dtype=torch.float64)))
            raw = (1.0 - beta) / effective
        else:
            raw = torch.ones_like(counts)
        self._weights64 = raw * (counts.numel() / raw.sum())

    @property
    def class_weights(self) -> Tensor:
        """``[C]`` float32 class weights (they sum to ``C``)."""
        return self._weights64.float()

    def _row_weights(self, losses: Tensor, target) -> tuple[Tensor, Tensor]:
        target = check_index_tensor(target, "target", "ClassBalanced", like=losses)
        valid = target != self.ignore_index
        num_classes = self._weights64.numel()
        bad = valid & ((target < 0) | (target >= num_classes))
        if bad.any():
            value = int(target[bad][0])
            raise ValueError(
                f"ClassBalanced: target value {value} is outside [0, {num_classes}) and is not ignore_index"
            )
        w = self._weights64.to(device=losses.device, dtype=compute_dtype(losses.dtype))
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        return torch.where(valid, w[safe], torch.zeros((), dtype=w.dtype, device=w.device)), valid

    def weights(self, losses: Tensor, *, target: Tensor) -> Tensor:
        losses = check_losses(losses, "ClassBalanced")
        return self._row_weights(losses, target)[0]

    def __call__(self, losses: Tensor, *, target: Tensor) -> Tensor:
        losses = check_losses(losses, "ClassBalanced")
        w, valid = self._row_weights(losses, target)
        total = torch.where(valid, w * losses, torch.zeros((), dtype=w.dtype, device=w.device)).sum()
        count = valid.sum().clamp_min(1)
        return (total / count).to(losses.dtype)

    def _repr_args(self):
        return {"num_classes": self._weights64.numel(), "beta": self.beta}


class LogitAdjustment:
    r"""Logit adjustment for long-tailed classification (Menon et al., ICLR 2021).

    Not a reweighting: it shifts the logits by the log class priors ``pi``. Two uses:

    * **loss** (train with adjusted logits): ``CE(z + b, y)`` with ``b_c = log(pi_c^tau + 1e-12)``,
      the official code's form (the paper writes ``tau * log pi_c``; the two differ only for classes
      with ``pi_c^tau`` near ``1e-12``). :meth:`loss` returns it as a crossent loss (any base loss
      wrapped in :class:`crossent.losses.Transformed` with a :class:`crossent.transforms.ClassBias`),
      so it runs on every engine; calling the object computes it from logits.
    * **post-hoc** (train plain CE, adjust at prediction): ``argmax_c (z_c - b_c)`` with the same
      ``b`` (:meth:`adjust`, :meth:`predict`).

    Because it transforms logits rather than weighting losses, it has no ``weights`` method.

    Args:
        priors: ``[C]`` training class priors (non-negative; normally they sum to 1). Use
            :meth:`from_counts` to build them from class counts.
        tau: temperature of the adjustment. Default ``1.0``.

    Example:
        >>> import torch, crossent as xe
        >>> from crossent.weighting import LogitAdjustment
        >>> la = LogitAdjustment.from_counts([90, 9, 1])
        >>> la.bias
        tensor([-0.1054, -2.4079, -4.6052])
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.4, 0.3]])
        >>> la.predict(logits)
        tensor([2, 2])
        >>> la(logits, torch.tensor([0, 1]))
        tensor(1.2675)
        >>> xe.cross_entropy(logits, torch.tensor([0, 1]), loss=la.loss())
        tensor(1.2675)

    Reference: Menon et al., *Long-tail learning via logit adjustment*, ICLR 2021 (official code:
    ``google-research/google-research``, ``logit_adjustment/utils.py`` and ``main.py``).
    """

    def __init__(self, priors, tau: float = 1.0):
        self.priors = check_vector(priors, "priors", "LogitAdjustment")
        self.tau = float(tau)
        self._bias64 = torch.log(self.priors.pow(self.tau) + 1e-12)
        self._transform = ClassBias(self._bias64.float())

    @classmethod
    def from_counts(cls, counts, tau: float = 1.0) -> LogitAdjustment:
        """Priors ``counts / counts.sum()`` from per-class training counts."""
        counts = check_vector(counts, "counts", "LogitAdjustment")
        if counts.sum() <= 0:
            raise ValueError("LogitAdjustment: counts must not all be zero")
        return cls(counts / counts.sum(), tau)

    @property
    def bias(self) -> Tensor:
        """``[C]`` float32 per-class shift ``log(pi^tau + 1e-12)``."""
        return self._bias64.float()

    def transform(self) -> ClassBias:
        """The logit transform ``z + bias`` (for :class:`crossent.losses.Transformed`)."""
        return self._transform

    def loss(self, base="ce", **hparams) -> Loss:
        """The logit-adjusted loss: ``base`` (a registered name or a loss object) on ``z + bias``."""
        return Transformed(resolve(base, **hparams), self._transform)

    def __call__(self, logits: Tensor, target: Tensor, **kwargs) -> Tensor:
        """Logit-adjusted cross-entropy of ``logits``.

        Keyword arguments go to :func:`crossent.cross_entropy`; ``loss``, ``label_smoothing`` and
        ``z_loss`` apply to the adjusted logits.
        """
        from ..losses._build import build_loss
        from .._functional import cross_entropy

        base = build_loss(
            kwargs.pop("loss", "ce"),
            label_smoothing=kwargs.pop("label_smoothing", 0.0),
            z_loss=kwargs.pop("z_loss", 0.0),
        )
        return cross_entropy(logits, target, loss=Transformed(base, self._transform), **kwargs)

    def adjust(self, logits: Tensor) -> Tensor:
        """Post-hoc correction ``z - bias`` along the last dimension (classes last)."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError("LogitAdjustment.adjust: logits must be a floating-point tensor")
        if logits.shape[-1] != self._bias64.numel():
            raise ValueError(
                f"LogitAdjustment.adjust: logits have {logits.shape[-1]} classes in their last dimension, "
                f"priors have {self._bias64.numel()}"
            )
        return logits - self._bias64.to(device=logits.device, dtype=logits.dtype)

    def predict(self, logits: Tensor) -> Tensor:
        """Post-hoc prediction ``argmax_c (z_c - bias_c)``."""
        return self.adjust(logits).argmax(-1)

    def __repr__(self):
        return f"LogitAdjustment(num_classes={self._bias64.numel()}, tau={self.tau})"
