"""Multi-label classification: dynamic class weights from running per-class losses (Yilmaz et al.)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dist
from .._rows import compute_dtype
from ._base import Strategy, check_losses, check_mask, check_step_count, check_vector


class DynamicClassWeights(Strategy):
    r"""Dynamic class weights for multi-label training (Yilmaz et al., IEEE TNNLS 2021).

    Static class weights are fixed from the label frequencies before training. Here each class's
    weight is the inverse of its *running* mean loss, so that every class contributes the same
    ``w_c bar l_c`` to the loss as training goes on. In multi-label data a rare class's mean loss is
    small (its many easy negatives dominate it), so rare classes are weighted up, and more so as the
    model fits them; a class whose loss stays large is weighted down. At step ``t``, with the
    elementwise losses ``l_{ic}`` of the batch (one per example ``i`` and class ``c``, e.g. binary
    cross-entropy or the multi-label focal loss ``(1 - p_t)^gamma BCE``):

    .. math::

        \bar\ell_c^{(t)} = s \cdot \frac{1}{N} \sum_i l_{ic} + (1 - s)\, \bar\ell_c^{(t-1)},
        \qquad \bar\ell_c^{(0)} = \frac{1}{C}

        w_c^{(t)} = \frac{1 / (\epsilon + \bar\ell_c^{(t)})}{\sum_k 1 / (\epsilon + \bar\ell_k^{(t)})},
        \qquad
        L^{(t)} = \frac{1}{N C} \sum_i \sum_c w_c^{(t)}\, l_{ic}

    The running losses are detached (the weights carry no gradient), and the step's loss uses the
    weights *after* that step's update, as the official code does. The weights sum to 1 (the
    official normalisation), so with equal class losses ``L`` is ``1/C`` times the plain elementwise
    mean: scale-free optimisers (Adam) do not notice, plain SGD needs a learning rate ``C`` times
    larger. :attr:`class_weights` times ``C`` gives weights that average 1.

    State (float64, on the CPU): the running class losses and a step counter. It advances once per
    ``__call__`` (or :meth:`update`) in training mode; after :meth:`eval` the weights are frozen
    (``__call__`` applies the current ones and changes nothing) until :meth:`train`. The state
    travels in :meth:`state_dict` and is copied by ``copy.deepcopy`` / pickle.

    Multi-label losses have one value per example *and class*, so unlike the per-row strategies
    this one takes ``losses`` of shape ``[..., C]`` (classes last) and :meth:`weights` returns one
    weight per element (``w_c`` broadcast over the examples). Elements where ``mask`` is false
    (missing labels) get weight 0, do not enter the class means, and are not counted in ``N C``; a
    class with no valid element in a batch keeps its running loss.

    Under ``torch.distributed`` (by default whenever a process group is initialised) the class means
    are over the global batch (per-class sums and counts all-reduced), so every rank holds the same
    state, and the loss divides by the global element count over the world size, so that averaging
    the gradients across ranks gives the global mean. Only training-mode calls (``__call__``,
    :meth:`update`, :meth:`weights`) communicate, and every rank must make them; in eval mode
    nothing is exchanged and the loss is the local mean.

    Args:
        num_classes: ``C``.
        smoothing: ``s`` in ``(0, 1]``, the weight of the new batch in the running mean. Default
            ``0.05`` (the official ``--weight_smoothing``).
        eps: ``epsilon``, keeps the weight of a class with zero loss finite. Default ``1e-5`` (the
            official constant).
        distributed: all-reduce the class sums and the loss normaliser; ``None`` (default) does so
            when a process group is initialised. ``group``: the process group.

    Inputs: ``losses`` ``[..., C]`` elementwise losses (``reduction="none"``), optional ``mask=``
    (bool, same shape).

    Example:
        >>> import torch
        >>> from crossent.weighting import DynamicClassWeights
        >>> dyn = DynamicClassWeights(num_classes=2, smoothing=0.5)
        >>> losses = torch.tensor([[0.1, 2.0], [0.3, 1.0]])      # [N, C]: class 0 is easy
        >>> dyn(losses)                                           # one step: running means 0.35, 1.0
        tensor(0.2686)
        >>> dyn.class_weights
        tensor([0.7407, 0.2593], dtype=torch.float64)
        >>> _ = dyn.eval()                                        # frozen: no update
        >>> dyn(losses), dyn.num_steps
        (tensor(0.2686), 1)

    With the focal loss adapted to multi-label targets (the official defaults ``alpha = 1``, ``gamma = 2``):

        >>> import crossent as xe
        >>> logits, targets = torch.randn(8, 3), (torch.rand(8, 3) < 0.3).float()
        >>> elementwise = xe.losses.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0)
        >>> loss = DynamicClassWeights(3)(elementwise)

    Reference: Yilmaz, Kaynak, Koc, Dibeklioglu, Kozat, *Multi-Label Sentiment Analysis on 100
    Languages with Dynamic Weighting for Label Imbalance*, IEEE TNNLS 2021, arXiv:2008.11573
    (official code: ``selimfirat/multilingual-sentiment-analysis``, ``loss.py``,
    ``calculate_dynamic_loss_size_weights``).
    """

    def __init__(
        self,
        num_classes: int,
        smoothing: float = 0.05,
        *,
        eps: float = 1e-5,
        distributed: bool | None = None,
        group=None,
    ):
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"DynamicClassWeights: num_classes must be a positive integer, got {num_classes!r}")
        smoothing, eps = float(smoothing), float(eps)
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"DynamicClassWeights: smoothing must be in (0, 1], got {smoothing}")
        if not eps > 0.0 or eps == float("inf"):
            raise ValueError(f"DynamicClassWeights: eps must be positive and finite, got {eps}")
        self.num_classes = int(num_classes)
        self.smoothing = smoothing
        self.eps = eps
        self.distributed = distributed
        self.group = group
        self.training = True
        self._running = torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)
        self.num_steps = 0

    # -- mode and state ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DynamicClassWeights:
        """Training mode (``mode=True``): each ``__call__`` advances the running losses."""
        self.training = bool(mode)
        return self

    def eval(self) -> DynamicClassWeights:
        """Evaluation mode: the weights are frozen."""
        return self.train(False)

    @property
    def running_losses(self) -> Tensor:
        """``[C]`` running per-class losses ``bar l`` (float64)."""
        return self._running.clone()

    @property
    def class_weights(self) -> Tensor:
        """``[C]`` current class weights ``w`` (float64, sum to 1)."""
        return self._weights_of(self._running)

    def state_dict(self) -> dict:
        return {"running_losses": self._running.clone(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        who = "DynamicClassWeights.load_state_dict"
        running = check_vector(state["running_losses"], "running_losses", who, length=self.num_classes)
        self.num_steps = check_step_count(state, "num_steps", who, minimum=0)
        self._running = running.cpu().clone()

    # -- the update -------------------------------------------------------------------------------
    def _inputs(self, losses, mask) -> tuple[Tensor, Tensor]:
        losses = check_losses(losses, "DynamicClassWeights")
        if losses.dim() == 0 or losses.shape[-1] != self.num_classes:
            raise ValueError(
                f"DynamicClassWeights: losses must be [..., C] with C = {self.num_classes} classes last, "
                f"got shape {tuple(losses.shape)}"
            )
        return losses, check_mask(mask, losses, "DynamicClassWeights")

    def _weights_of(self, running: Tensor) -> Tensor:
        inverse = 1.0 / (self.eps + running)
        return inverse / inverse.sum()

    def _updated(self, losses: Tensor, mask: Tensor) -> Tensor:
        """The running losses after one update with this batch, without storing them."""
        # float32 off the CPU (float64 is slow or missing on accelerators), as DoReMi does
        dtype = torch.float64 if losses.device.type == "cpu" else torch.float32
        flat = losses.detach().reshape(-1, self.num_classes).to(dtype)
        valid = mask.reshape(-1, self.num_classes)
        sums = torch.where(valid, flat, torch.zeros((), dtype=dtype, device=flat.device)).sum(0)
        counts = valid.sum(0).to(dtype)
        if _dist.active(self.group, self.distributed):
            both = _dist.all_reduce_sum(torch.stack([sums, counts]), self.group)
            sums, counts = both[0], both[1]
        sums, counts = sums.double().cpu(), counts.double().cpu()
        if not torch.isfinite(sums).all():
            c = int((~torch.isfinite(sums)).nonzero()[0, 0])
            raise ValueError(f"DynamicClassWeights: the losses of class {c} are not finite")
        means = sums / counts.clamp_min(1)
        moved = self.smoothing * means + (1.0 - self.smoothing) * self._running
        return torch.where(counts > 0, moved, self._running)

    def update(self, losses: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Advance the running losses with this batch (in training mode) and return the class weights."""
        losses, mask = self._inputs(losses, mask)
        if self.training:
            self._running = self._updated(losses, mask)
            self.num_steps += 1
        return self.class_weights

    def _element_weights(self, running: Tensor, losses: Tensor, mask: Tensor) -> Tensor:
        w = self._weights_of(running).to(device=losses.device, dtype=compute_dtype(losses.dtype))
        return torch.where(mask, w.expand_as(losses), torch.zeros((), dtype=w.dtype, device=w.device))

    def weights(self, losses: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Per-element weights (shape of ``losses``) that ``__call__`` would apply, without changing the state."""
        losses, mask = self._inputs(losses, mask)
        running = self._updated(losses, mask) if self.training else self._running
        return self._element_weights(running, losses, mask)

    def __call__(self, losses: Tensor, *, mask: Tensor | None = None) -> Tensor:
        losses, mask = self._inputs(losses, mask)
        if self.training:
            self._running = self._updated(losses, mask)
            self.num_steps += 1
        w = self._element_weights(self._running, losses, mask)
        weighted = torch.where(mask, w * losses.to(w.dtype), torch.zeros((), dtype=w.dtype, device=w.device))
        count = mask.sum().to(w.dtype)
        if self.training and _dist.active(self.group, self.distributed):
            count = _dist.all_reduce_sum(count, self.group) / _dist.world_size(self.group)
        return (weighted.sum() / count.clamp_min(1)).to(losses.dtype)

    def _repr_args(self):
        return {"num_classes": self.num_classes, "smoothing": self.smoothing, "eps": self.eps}
