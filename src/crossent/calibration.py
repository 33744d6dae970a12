"""Post-hoc calibration: temperature scaling (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017).

One scalar ``T > 0`` is fitted on held-out logits by minimising the NLL of ``softmax(z / T)``; it changes
confidences, never the predicted class.

The correctness-aware objective (Liu et al., *Optimizing Calibration by Gaining Aware of Prediction
Correctness*, 2024) replaces the NLL as a calibrator's training objective: it pulls the confidence of
correctly predicted samples towards 1 and of wrongly predicted ones towards 0
(:func:`correctness_aware_loss`); :class:`CorrectnessAwareCalibrator` is the paper's calibrator, a
per-sample temperature read off the softmax of transformed views of each sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TemperatureScaling:
    r"""Fit a temperature on held-out logits, then divide logits by it.

    The NLL :math:`\frac1N\sum_i -\log \mathrm{softmax}(z_i / T)_{y_i}` is minimised over
    :math:`\log T` (so that :math:`T` stays positive) with L-BFGS and a strong-Wolfe line search,
    in float64.

    Args:
        max_iter: L-BFGS iterations. Default ``100``.

    Attributes:
        temperature: the fitted :math:`T` (``1.0`` before :meth:`fit`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = 3 * torch.randn(20000, 5, generator=g)            # a model's logits
        >>> y = torch.multinomial(torch.softmax(z / 2.0, -1), 1, generator=g).squeeze(1)
        >>> ts = TemperatureScaling().fit(z, y)                     # labels drawn at temperature 2
        >>> round(ts.temperature, 1)
        2.0
        >>> ts(torch.tensor([[4.0, 0.0]])).round(decimals=1)
        tensor([[2., 0.]])
    """

    def __init__(self, max_iter: int = 100):
        self.max_iter = int(max_iter)
        self.temperature = 1.0

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        """Fit :attr:`temperature` to ``logits [N, C]`` and class indices ``labels [N]``; returns ``self``."""
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError("labels must be integer class indices")
        finite = torch.isfinite(logits.detach())
        if not finite.all():
            row, col = (int(i) for i in (~finite).nonzero()[0])
            raise ValueError(f"logits must be finite to fit a temperature; logits[{row}, {col}] = {logits[row, col].item()}")
        z = logits.detach().double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.temperature = float(log_t.detach().exp())
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits / temperature``."""
        return logits / self.temperature

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature:.4g})"


def correctness_aware_loss(logits: Tensor, target: Tensor, *, balanced: bool = True) -> Tensor:
    r"""The correctness-aware (CA) calibration objective of Liu et al. (2024).

    With the confidence :math:`c_i = \max_k \mathrm{softmax}(z_i)_k` and the correctness
    :math:`a_i = [\arg\max_k z_{ik} = y_i]` of each row,

    .. math::
        \mathcal{L}_{CA} = \frac12 \Big( \frac1{|\mathcal{C}|} \sum_{i \in \mathcal{C}} (1 - c_i)^2
            + \frac1{|\mathcal{W}|} \sum_{i \in \mathcal{W}} c_i^2 \Big)

    over the correctly (:math:`\mathcal{C}`) and wrongly (:math:`\mathcal{W}`) predicted rows: a calibrator
    trained on it lowers the confidence of wrong predictions and raises that of correct ones, whatever
    the probability of the true class (cross-entropy instead raises :math:`p_{y_i}`, and with it the
    confidence of a narrowly wrong prediction). This is the official code's loss: the squared gap
    :math:`(c_i - a_i)^2` with correct rows weighted by the batch's error rate and wrong rows by its
    accuracy, that is each group's mean weighted one half. ``balanced=False`` drops those weights:
    :math:`\frac1N \sum_i (c_i - a_i)^2`, the Brier score of the top-label confidence.

    The two differ in what they calibrate to. Rows of accuracy :math:`a` that share a confidence are
    pulled to :math:`c = a` by the unweighted gap, but by the balanced one to
    :math:`c = \frac{a/A}{a/A + (1-a)/(1-A)}` for a batch accuracy :math:`A`: calibrated only at
    :math:`A = 1/2`, otherwise under-confident where the model is usually right (``c = 1/2`` at
    :math:`a = A`). A batch with no correct (or no wrong) row takes the mean of the other group alone
    (the official weights divide by zero there).

    :math:`a_i` has no gradient; a calibrator that keeps every row's arg max (a positive temperature)
    sees the same correctness before and after calibration.

    Args:
        logits: ``[N, C]`` (calibrated) logits.
        target: ``[N]`` class indices.
        balanced: weight the correct and the wrong rows' means one half each, as the official code.
            Default ``True``.

    Returns:
        A scalar.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
        >>> y = torch.tensor([0, 1, 1])                      # rows 0 and 1 right, row 2 wrong
        >>> correctness_aware_loss(z, y).round(decimals=4)   # (mean of (1 - c)^2 over 0, 1 + c_2^2) / 2
        tensor(0.4753)
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, C] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be integer class indices, got dtype {target.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("correctness_aware_loss needs at least one row")
    confidence = torch.softmax(logits, -1).amax(-1)
    correct = logits.detach().argmax(-1) == target
    gap = torch.where(correct, 1 - confidence, confidence).square()
    if not balanced:
        return gap.mean()
    n_correct = correct.sum().to(gap.dtype)
    n_wrong = correct.numel() - n_correct
    # 1/0 only lands on rows of an empty group, that is on no row
    weight = torch.where(correct, 1 / n_correct, 1 / n_wrong)
    groups = (n_correct > 0).to(gap.dtype) + (n_wrong > 0).to(gap.dtype)
    return (gap * weight).sum() / groups


class CorrectnessAwareCalibrator(nn.Module):
    r"""A per-sample temperature read off transformed views, trained with :func:`correctness_aware_loss`.

    The calibrator of Liu et al., *Optimizing Calibration by Gaining Aware of Prediction Correctness*
    (2024). Each sample comes with the model's logits :math:`z_i` and the logits :math:`z_i^{(v)}` of
    :math:`V` transformed versions of its input (rotated, greyscaled, colour-jittered images in the
    paper). Its features are the softmax of every view at the top-:math:`K` classes of the original
    prediction,

    .. math::
        f_i = \big[\mathrm{softmax}(z_i^{(v)})_{k}\big]_{v = 1..V,\ k \in \mathrm{top}_K(z_i)} \in \mathbb{R}^{VK},

    (how consistently the views agree with the prediction tells how likely it is correct), and a small
    network maps them to a temperature

    .. math::
        T_i = \mathrm{clamp}\big(w_2^\top \mathrm{ReLU}(W_1 f_i + b_1) + b_2,\ T_{\min},\ T_{\max}\big),
        \qquad \hat z_i = z_i / T_i,

    which keeps every row's arg max. :meth:`fit` minimises :func:`correctness_aware_loss` of
    :math:`\hat z` (balanced by default, as the official code; ``balanced=False`` for the unweighted gap)
    with Adam in mini-batches, as the official code does (its defaults: :math:`K = 4`, 5 hidden units,
    :math:`T \in [0.1, 10]`).

    Deviations from the official code, which trains 10 epochs at learning rate 1e-4 on an ImageNet
    validation set: the defaults here (100 epochs at 1e-2) suit validation sets of hundreds to thousands
    of samples; the output layer starts at :math:`T_i = 1` (zero weights, unit bias), where a random
    start can begin below :math:`T_{\min}`, where the clamp passes no gradient. Which transforms make
    the views is the caller's choice: with logits alone there is nothing to transform, so the views are
    an input, ``[N, V, C]``, the model's logits on ``V`` transformed copies of each input.

    Args:
        num_views: :math:`V`, the transformed views per sample.
        top_k: :math:`K`, the classes of the original prediction read in each view. Default ``4``.
        hidden: hidden units. Default ``5``.
        min_temperature, max_temperature: the clamp of :math:`T_i`. Defaults ``0.1`` and ``10``.

    Shapes:
        logits ``[N, C]``, views ``[N, V, C]`` (:math:`C \ge K`), labels ``[N]``; output ``[N, C]``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> u = 2 * torch.randn(1000, 5, generator=g)                     # what the data supports
        >>> y = torch.multinomial(torch.softmax(u, -1), 1, generator=g).squeeze(1)
        >>> z = 3 * u                                                     # an over-confident model
        >>> views = 3 * (u.unsqueeze(1) + 0.5 * torch.randn(1000, 3, 5, generator=g))  # 3 perturbed inputs
        >>> def gap(logits):                                              # mean confidence - accuracy
        ...     accuracy = (z.argmax(-1) == y).float().mean()
        ...     return round(float(torch.softmax(logits, -1).amax(-1).mean() - accuracy), 2) + 0.0
        >>> def fit(**kw):
        ...     seeded = torch.Generator().manual_seed(0)
        ...     return CorrectnessAwareCalibrator(num_views=3).fit(z, views, y, generator=seeded, **kw)
        >>> with torch.no_grad():
        ...     gap(z), gap(fit()(z, views)), gap(fit(balanced=False)(z, views))
        (0.22, -0.09, 0.01)

    At an accuracy of 64 % the balanced objective overshoots into under-confidence (see
    :func:`correctness_aware_loss`); the unweighted one lands on the accuracy.
    """

    def __init__(self, num_views: int, top_k: int = 4, hidden: int = 5, min_temperature: float = 0.1,
                 max_temperature: float = 10.0):
        super().__init__()
        for name, value in (("num_views", num_views), ("top_k", top_k), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < min_temperature < max_temperature < math.inf:
            raise ValueError(
                f"need 0 < min_temperature < max_temperature < inf, got {min_temperature!r} and {max_temperature!r}"
            )
        self.num_views, self.top_k = num_views, top_k
        self.min_temperature, self.max_temperature = float(min_temperature), float(max_temperature)
        self.net = nn.Sequential(nn.Linear(num_views * top_k, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.ones_(self.net[2].bias)

    def _check(self, logits: Tensor, views: Tensor) -> None:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
        n, c = logits.shape
        if views.dim() != 3 or views.shape[0] != n or views.shape[2] != c:
            raise ValueError(f"views must be [N, V, C] = [{n}, {self.num_views}, {c}] beside logits [{n}, {c}], "
                             f"got shape {tuple(views.shape)}")
        if views.shape[1] != self.num_views:
            raise ValueError(f"views holds {views.shape[1]} views per sample; this calibrator was built for "
                             f"num_views={self.num_views}")
        if c < self.top_k:
            raise ValueError(f"top_k={self.top_k} needs at least {self.top_k} classes, got {c}")

    def features(self, logits: Tensor, views: Tensor) -> Tensor:
        """``[N, V * K]``: each view's softmax at the top-``K`` classes of ``logits``, view after view."""
        self._check(logits, views)
        top = logits.topk(self.top_k, -1).indices.unsqueeze(1).expand(-1, self.num_views, -1)
        return torch.softmax(views, -1).gather(-1, top).flatten(1)

    def temperature(self, logits: Tensor, views: Tensor) -> Tensor:
        """``[N]``: each sample's temperature :math:`T_i`."""
        return self._temperature(self.features(logits, views))

    def _temperature(self, features: Tensor) -> Tensor:
        t = self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)
        return t.clamp(self.min_temperature, self.max_temperature)

    def forward(self, logits: Tensor, views: Tensor) -> Tensor:
        """``logits / T`` row by row."""
        return logits / self.temperature(logits, views).to(logits.dtype).unsqueeze(-1)

    def fit(self, logits: Tensor, views: Tensor, labels: Tensor, *, epochs: int = 100, lr: float = 1e-2,
            batch_size: int = 1000, balanced: bool = True,
            generator: torch.Generator | None = None) -> CorrectnessAwareCalibrator:
        """Train on held-out ``logits [N, C]``, their ``views [N, V, C]`` and ``labels [N]``; returns ``self``
        in eval mode. ``generator`` shuffles the mini-batches."""
        self._check(logits, views)
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        for name, t in (("logits", logits), ("views", views)):
            finite = torch.isfinite(t.detach())
            if not finite.all():
                at = tuple(int(i) for i in (~finite).nonzero()[0])
                raise ValueError(f"{name} must be finite to fit a calibrator; {name}{list(at)} = {t[at].item()}")
        if len(labels) == 0:
            raise ValueError("fit needs at least one sample")
        logits = logits.detach()
        features = self.features(logits, views.detach())  # fixed during training: computed once
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(labels), generator=generator, device=labels.device)
                for batch in order.split(batch_size):
                    optimizer.zero_grad()
                    scaled = logits[batch] / self._temperature(features[batch]).to(logits.dtype).unsqueeze(-1)
                    loss = correctness_aware_loss(scaled, labels[batch], balanced=balanced)
                    loss.backward()
                    optimizer.step()
        return self.eval()


__all__ = ["TemperatureScaling", "correctness_aware_loss", "CorrectnessAwareCalibrator"]
