r"""Set-level cross-entropy: odd-k-out learning (OKO).

OKO trains a classifier on *sets* of examples rather than on single ones (Muttenthaler, Vandermeulen,
Zhang, Unterthiner, Müller, "Set Learning for Accurate and Calibrated Models", ICLR 2024). A set holds
``k + 2`` examples: two of one class, the *pair class* ``y'``, and one each of ``k`` further distinct
classes, the *odd classes*. The model scores each member on its own; the set's logits are the sum of
its members' logits, and the loss is the cross-entropy of that sum,

.. math::

    \ell_{hard}(S) = -\log \mathrm{softmax}\Big(\sum_{x \in S} f(x)\Big)_{y'}, \qquad
    \ell_{soft}(S) = -\sum_c q_c \log \mathrm{softmax}\Big(\sum_{x \in S} f(x)\Big)_c,
    \quad q = \frac{1}{k + 2} \sum_{y \in S_y} e_y,

with hard targets (the pair class) or soft ones (the set's class frequencies: ``2 / (k+2)`` on the pair
class, ``1 / (k+2)`` on each odd class). At test time the model is applied to single examples, as
usual. The paper reports better calibration than CE and no loss of accuracy, mostly with little data
or a long tail, with hard targets and ``k = 1`` as its default.

* :func:`oko_cross_entropy` is the loss of a batch of sets, ``[B, k+2, C]`` logits;
* :func:`oko_targets` turns the sets' labels ``[B, k+2]`` into hard or soft targets;
* :class:`OddKOutSampler` draws the sets from a labelled dataset (a batch sampler for
  :class:`torch.utils.data.DataLoader`).

Example:
    >>> import torch, crossent as xe
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    >>> sampler = xe.sets.OddKOutSampler(labels, k=1, sets_per_batch=2, num_batches=1,
    ...                                  generator=torch.Generator().manual_seed(0))
    >>> idx = torch.tensor(next(iter(sampler)))            # 2 sets of 3 examples, set after set
    >>> set_labels = labels[idx].view(2, 3)                 # [pair, pair, odd] in every set
    >>> bool((set_labels[:, 0] == set_labels[:, 1]).all() and (set_labels[:, 2] != set_labels[:, 0]).all())
    True
    >>> logits = torch.randn(6, 3).view(2, 3, 3)            # the model's logits of the 6 examples
    >>> xe.sets.oko_cross_entropy(logits, xe.sets.oko_targets(set_labels, 3)).shape
    torch.Size([])

Differences from the official code (``LukasMut/OKO``, JAX): the sampler puts each set's members in a
fixed order, ``[pair, pair, odd_1, ..., odd_k]`` (the official loader permutes them; the loss sums over
the set, so the order changes nothing unless the model mixes the examples of a batch, as batch
normalisation does); it draws the pair class among the classes with at least two examples (the
official loader needs at least two of every class and fails otherwise). Some versions of the official
code add a second head that predicts the odd class from the concatenated features of a set, with its
own cross-entropy term; the paper's objective has no such term and it needs a model-side head, so it
is not here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from . import _validation as V
from ._functional import cross_entropy

__all__ = ["oko_cross_entropy", "oko_targets", "OddKOutSampler"]


def oko_cross_entropy(input: Tensor, target: Tensor, *, reduction: str = "mean", loss="ce") -> Tensor:
    r"""Cross-entropy of sets: ``cross_entropy(input.sum(1), target)``, the OKO objective.

    Args:
        input: per-example logits of a batch of sets, ``[B, S, C]``: ``B`` sets of ``S`` examples
            (``S = k + 2`` for odd-k-out sets), ``C`` classes.
        target: one per set: the pair class ``[B]`` (integer class indices: hard targets) or class
            probabilities ``[B, C]`` (soft targets); :func:`oko_targets` makes either from the sets'
            labels.
        reduction: ``"mean"`` over sets, ``"sum"`` or ``"none"`` (``[B]``).
        loss: the loss of the summed logits, a registered name or a loss object (``"ce"``: the paper's);
            soft targets need one that takes probabilities.

    Returns:
        The loss, in the dtype of ``input``; its gradient reaches every member's logits (the same
        ``softmax(sum) - target`` for all members of a set, for CE).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])   # one set of 3, 2 classes
        >>> xe.sets.oko_cross_entropy(logits, torch.tensor([0]))            # CE of the sum [3, 1] at class 0
        tensor(0.1269)
        >>> xe.sets.oko_cross_entropy(logits, torch.tensor([[2 / 3, 1 / 3]]))  # soft: the set's class frequencies
        tensor(0.7936)
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"oko_cross_entropy: input and target must be tensors, got {type(input).__name__} "
                        f"and {type(target).__name__}")
    if input.dim() != 3 or input.shape[1] == 0:
        raise ValueError("oko_cross_entropy: input must be the logits of a batch of sets, [B, S, C] with S >= 1, "
                         f"got shape {tuple(input.shape)}")
    sets, _, classes = input.shape
    hard = not target.is_floating_point()
    expected = (sets,) if hard else (sets, classes)
    if tuple(target.shape) != expected:
        kind = "class indices [B]" if hard else "class probabilities [B, C]"
        raise ValueError(f"oko_cross_entropy: target must be one per set, {kind} = {list(expected)} for input "
                         f"{list(input.shape)}, got shape {tuple(target.shape)}")
    return cross_entropy(input.sum(1), target, reduction=reduction, loss=loss)


def oko_targets(set_labels: Tensor, num_classes: int, *, soft: bool = False,
                dtype: torch.dtype | None = None) -> Tensor:
    """The targets of sets from their members' labels ``[B, S]``.

    Hard (``soft=False``): the pair class of each set, its most frequent label, ``[B]`` int64; a set in
    which no label is more frequent than every other (two pairs, or no pair) has none and is an error.
    Soft: the set's class frequencies ``[B, num_classes]`` (``dtype``, default the default float dtype),
    ``2 / (k+2)`` on the pair class and ``1 / (k+2)`` on each odd class of an odd-k-out set.

    Example:
        >>> import torch, crossent as xe
        >>> set_labels = torch.tensor([[1, 1, 0], [2, 0, 2]])
        >>> xe.sets.oko_targets(set_labels, 3)
        tensor([1, 2])
        >>> xe.sets.oko_targets(set_labels, 3, soft=True)
        tensor([[0.3333, 0.6667, 0.0000],
                [0.3333, 0.0000, 0.6667]])
    """
    if not isinstance(set_labels, Tensor) or set_labels.is_floating_point() or set_labels.dtype == torch.bool:
        raise TypeError("oko_targets: set_labels must be an integer tensor [B, S], got "
                        f"{set_labels.dtype if isinstance(set_labels, Tensor) else type(set_labels).__name__}")
    if set_labels.dim() != 2 or set_labels.shape[1] == 0:
        raise ValueError(f"oko_targets: set_labels must be [B, S] with S >= 1, got shape {tuple(set_labels.shape)}")
    num_classes = V.count("num_classes", num_classes, who="oko_targets")
    outside = (set_labels < 0) | (set_labels >= num_classes)

    def _outside() -> str:
        i, j = (int(v) for v in outside.nonzero()[0])
        return f"oko_targets: set_labels[{i}, {j}] = {int(set_labels[i, j])} is not a class in [0, {num_classes})"

    V.data_check(outside, f"oko_targets: a label is not a class in [0, {num_classes})", _outside)
    counts = torch.zeros(set_labels.shape[0], num_classes, dtype=torch.int64, device=set_labels.device)
    counts.scatter_add_(1, set_labels.long(), torch.ones_like(set_labels, dtype=torch.int64))
    if soft:
        return counts.to(dtype or torch.get_default_dtype()) / set_labels.shape[1]
    top = counts.max(1).values
    tied = (counts == top[:, None]).sum(1) != 1

    def _tied() -> str:
        i = int(tied.nonzero()[0, 0])
        return (f"oko_targets: set {i} has no pair class (no label more frequent than every other): "
                f"labels {set_labels[i].tolist()}")

    V.data_check(tied, "oko_targets: a set has no pair class (no label more frequent than every other)", _tied)
    return counts.argmax(1)


class OddKOutSampler(Sampler[list[int]]):
    """Batches of odd-k-out sets drawn from a labelled dataset: a batch sampler (``batch_sampler=``).

    Each batch is a list of ``sets_per_batch * (k + 2)`` dataset indices, set after set; each set is
    ``[pair, pair, odd_1, ..., odd_k]``. Following the official code, classes are drawn uniformly, not in
    proportion to their frequencies (a rare class is a pair class as often as a frequent one): the pair
    class uniformly among the classes with at least two examples, the ``k`` odd classes uniformly among
    the other classes present, all distinct; the two pair members are two different examples of their
    class, every member uniform within its class. Batches are independent draws; an iteration yields
    ``num_batches`` of them.

    Args:
        labels: the dataset's class labels ``[N]`` (integers >= 0).
        k: odd classes per set (the paper's default, 1, makes triplets).
        sets_per_batch: sets per batch.
        num_batches: batches per iteration (``len(sampler)``); by default as many as hold about as many
            examples as the dataset, ``ceil(N / (sets_per_batch * (k + 2)))``.
        generator: the source of randomness; successive iterations continue its stream, so a seeded
            generator gives the same batches on every run.

    Reshape a batch's logits ``[sets_per_batch * (k+2), C]`` to ``[sets_per_batch, k+2, C]`` for
    :func:`oko_cross_entropy`, and the batch's labels to ``[sets_per_batch, k+2]`` for :func:`oko_targets`.
    """

    def __init__(self, labels: Tensor, k: int = 1, sets_per_batch: int = 64, num_batches: int | None = None, *,
                 generator: torch.Generator | None = None):
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
            raise TypeError(f"OddKOutSampler: labels must be a 1-D integer tensor, got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"OddKOutSampler: labels must be >= 0, got {int(labels.min())} at position "
                             f"{int((labels < 0).nonzero()[0, 0])}")
        self.k = V.count("k", k, who="OddKOutSampler")
        self.sets_per_batch = V.count("sets_per_batch", sets_per_batch, who="OddKOutSampler")
        if num_batches is None:  # about one pass over the examples
            num_batches = max(1, -(-labels.numel() // (self.sets_per_batch * (self.k + 2))))
        self.num_batches = V.count("num_batches", num_batches, minimum=0, who="OddKOutSampler")
        self.generator = generator
        labels = labels.long().cpu()
        #: the examples grouped by class: class c's are order[start[c] : start[c] + size[c]]
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels) if labels.numel() else torch.zeros(0, dtype=torch.int64)
        self.classes = torch.nonzero(counts).flatten()
        self.size = counts[self.classes]
        self.start = torch.cumsum(counts, 0)[self.classes] - self.size
        self.pairable = torch.nonzero(self.size >= 2).flatten()  # positions in self.classes
        if len(self.pairable) == 0:
            raise ValueError("OddKOutSampler: no class has the two examples a pair needs")
        if len(self.classes) < self.k + 1:
            raise ValueError(f"OddKOutSampler: k={self.k} odd classes and a pair class need {self.k + 1} classes, "
                             f"the labels have {len(self.classes)}")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield self.sample().flatten().tolist()

    def sample(self) -> Tensor:
        """One batch of sets, ``[sets_per_batch, k + 2]`` dataset indices (each row ``[pair, pair, odds...]``)."""
        g, b, k = self.generator, self.sets_per_batch, self.k
        pair = self.pairable[torch.randint(len(self.pairable), (b,), generator=g)]
        # k distinct odd classes per set: the k lowest of uniform scores, the pair class's pushed last
        scores = torch.rand(b, len(self.classes), generator=g)
        scores[torch.arange(b), pair] = 2.0
        odd = scores.topk(k, dim=1, largest=False).indices
        size = self.size[pair]
        first = _below(size, g)
        # the second pair member: one of the class's other examples, uniformly
        second = (first + 1 + _below(size - 1, g)) % size
        odd_member = _below(self.size[odd], g)
        within = torch.cat([(self.start[pair] + first)[:, None], (self.start[pair] + second)[:, None],
                            self.start[odd] + odd_member], dim=1)
        return self.order[within]


def _below(n: Tensor, generator: torch.Generator | None) -> Tensor:
    """A uniform integer in ``[0, n)`` for each entry of ``n`` (int64, every entry >= 1)."""
    u = torch.rand(n.shape, dtype=torch.float64, generator=generator)
    return (u * n).long().minimum(n - 1)  # u * n may round up to n
