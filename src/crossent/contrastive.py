r"""Contrastive losses on embeddings: InfoNCE with in-batch negatives, listwise softmax CE, pair circle loss.

InfoNCE is cross-entropy over the similarities of each query with every key: the logits are
``query @ key.T / temperature``, so :func:`info_nce` runs on :func:`crossent.linear_cross_entropy`
(queries as ``e``, keys as ``c``, the temperature a logit transform) and holds one chunk of query rows
at a time: 64K+ negatives need no ``[queries, keys]`` matrix. False negatives are excluded by index
(:class:`crossent.transforms.ExcludeColumns`).

:func:`pair_circle_loss` is the pair-level circle loss of metric learning on embeddings and labels; it
forms the ``[n, n]`` cosine similarities of a batch (metric-learning batches are small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from ._engine.options import LinearCrossEntropyOptions
from ._functional import cross_entropy
from ._linear import linear_cross_entropy
from ._rows import compute_dtype
from .losses import CrossEntropy, Transformed
from .transforms import ExcludeColumns, Temperature

__all__ = ["info_nce", "listwise_cross_entropy", "pair_circle_loss"]

_EXCLUDE = "exclude"


def _check_embeddings(name: str, x: Tensor, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a [n, D] matrix, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features, expected {dim}")


def _check_same_dtype(name: str, x: Tensor, first_name: str, first: Tensor) -> None:
    """``x`` in ``first``'s dtype (under ``torch.autocast`` the products cast both, as for ``q @ k.T``)."""
    if x.dtype != first.dtype and not torch.is_autocast_enabled(first.device.type):
        raise TypeError(f"{first_name} and {name} must share one dtype, got {first.dtype} and {x.dtype}")


def check_info_nce_options(*, temperature, reduction, chunk_size, backend) -> float:
    """The options of :func:`info_nce`, checked (its module form calls this at construction): the temperature."""
    V.check_reduction(reduction)
    LinearCrossEntropyOptions(backend=backend, chunk_size=chunk_size)
    return V.positive("temperature", temperature, who="info_nce")


def check_pair_circle_options(*, m, gamma, reduction) -> tuple[float, float]:
    """The options of :func:`pair_circle_loss`, checked (its module form calls this at construction)."""
    V.check_reduction(reduction)
    return V.real("pair_circle_loss", "m", m), V.positive("gamma", gamma, who="pair_circle_loss")


def _indices(name: str, t: Tensor, length: int, high: int, device) -> Tensor:
    if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    bad = (t < 0) | (t >= high)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(t[i])} is outside [0, {high})")
    return t.to(device=device, dtype=torch.long)


def _excluded_per_row(pairs: Tensor, rows: int, cols: int, positive: Tensor) -> Tensor:
    """``[rows, K]`` excluded column indices per row (``-1`` pads) from ``[P, 2]`` (row, column) pairs."""
    if not isinstance(pairs, Tensor) or pairs.is_floating_point() or pairs.dtype == torch.bool:
        raise TypeError("exclude must be an integer tensor of (query, key) index pairs, shape [P, 2]")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"exclude must have shape [P, 2] (query, key) pairs, got {tuple(pairs.shape)}")
    pairs = pairs.to(device=positive.device, dtype=torch.long)
    r, c = pairs[:, 0], pairs[:, 1]
    for name, t, high in (("query", r, rows), ("key", c, cols)):
        bad = (t < 0) | (t >= high)
        if bool(bad.any()):
            p = int(bad.nonzero()[0, 0])
            raise ValueError(f"exclude[{p}] has {name} index {int(t[p])} outside [0, {high})")
    hit = c == positive[r]
    if bool(hit.any()):
        p = int(hit.nonzero()[0, 0])
        raise ValueError(f"exclude[{p}] = ({int(r[p])}, {int(c[p])}) excludes that query's positive")
    order = torch.argsort(r * cols + c)
    r, c = r[order], c[order]
    counts = torch.bincount(r, minlength=rows)
    width = int(counts.max()) if r.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    out = torch.full((rows, max(width, 1)), -1, dtype=torch.long, device=positive.device)
    out[r, torch.arange(r.numel(), device=r.device) - starts[r]] = c
    return out


def _one_direction(q, k, positive, temperature, exclude, reduction, chunk_size, backend):
    t = Temperature(temperature)
    if exclude is None:
        loss, extra = Transformed(CrossEntropy(), t), None
    else:
        loss = Transformed(CrossEntropy(), ExcludeColumns(_EXCLUDE), t)
        extra = {_EXCLUDE: _excluded_per_row(exclude, q.shape[0], k.shape[0], positive)}
    return linear_cross_entropy(
        q, k, positive, loss=loss, reduction=reduction, chunk_size=chunk_size, backend=backend, extra=extra
    )


def info_nce(
    query: Tensor,
    key: Tensor,
    positive: Tensor | None = None,
    *,
    temperature: float = 0.07,
    symmetric: bool = False,
    exclude: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE: each query's positive key against every other key, as cross-entropy over similarities.

    .. math::

        \ell_i = -\log \frac{\exp(q_i \cdot k_{y_i} / \tau)}{\sum_{j \notin E_i} \exp(q_i \cdot k_j / \tau)}

    equal to ``F.cross_entropy(query @ key.T / temperature, positive)`` (with the excluded logits
    set to :math:`-\infty`), computed by :func:`crossent.linear_cross_entropy` without the
    ``[n, m]`` similarity matrix. Normalise the embeddings first for cosine similarities.
    van den Oord, Li, Vinyals, *Representation Learning with Contrastive Predictive Coding*, 2018;
    in-batch negatives as in Chen et al., *SimCLR*, ICML 2020 and Radford et al., *CLIP*, ICML 2021.

    Args:
        query: ``[n, D]``.
        key: ``[m, D]``, same dtype: the candidates (``m >= n`` with the default ``positive``; keys
            beyond the first ``n`` are extra negatives).
        positive: ``[n]`` index of each query's positive key; default ``arange(n)``.
        temperature: :math:`\tau > 0`. Default ``0.07``.
        symmetric: also the keys-to-queries direction (CLIP's loss) and return the mean of the two
            (per pair for ``reduction="none"``); needs ``m == n`` and ``positive`` a permutation.
        exclude: optional ``[P, 2]`` integer (query, key) pairs removed from the softmax: known false
            negatives (duplicates, other positives of the same query). A query's positive cannot be
            excluded. The symmetric direction excludes the transposed pairs.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[n]``).
        chunk_size, backend: as in :func:`crossent.linear_cross_entropy`.

    Example:
        >>> import torch, crossent as xe
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> k = torch.tensor([[0.9, 0.1], [0.2, 0.9], [0.5, 0.9]])
        >>> xe.contrastive.info_nce(q, k, temperature=0.5)
        tensor(0.6939)
        >>> xe.contrastive.info_nce(q, k, temperature=0.5, symmetric=True)
        tensor(0.6955)
        >>> xe.contrastive.info_nce(q, k, temperature=0.5, exclude=torch.tensor([[2, 1]]), reduction="none")
        tensor([0.5282, 0.7893, 0.3711])
    """
    temperature = check_info_nce_options(
        temperature=temperature, reduction=reduction, chunk_size=chunk_size, backend=backend
    )
    _check_embeddings("query", query)
    _check_embeddings("key", key, query.shape[1])
    _check_same_dtype("key", key, "query", query)
    n, m = query.shape[0], key.shape[0]
    if m == 0:
        raise ValueError("key must have at least one row: each query's softmax runs over the keys")
    if positive is None:
        if m < n:
            raise ValueError(f"the default positive (arange(n)) needs at least as many keys as queries, got {m} < {n}")
        positive = torch.arange(n, device=query.device)
    else:
        positive = _indices("positive", positive, n, m, query.device)
    run = dict(temperature=temperature, reduction=reduction, chunk_size=chunk_size, backend=backend)
    forward = _one_direction(query, key, positive, exclude=exclude, **run)
    if not symmetric:
        return forward
    if m != n:
        raise ValueError(f"symmetric=True needs as many keys as queries, got {m} keys for {n} queries")
    inverse = torch.full_like(positive, -1)
    inverse[positive] = torch.arange(n, device=positive.device)
    if bool((inverse < 0).any()):
        raise ValueError("symmetric=True needs positive to be a permutation (each key the positive of one query)")
    flipped = None if exclude is None else torch.as_tensor(exclude).flip(-1)
    backward = _one_direction(key, query, inverse, exclude=flipped, **run)
    if reduction == "none":
        backward = backward[positive]
    return (forward + backward) / 2


def listwise_cross_entropy(
    query: Tensor,
    candidates: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    in_batch: bool = True,
    exclude: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Listwise softmax cross-entropy of a retriever or reranker: each query's list of candidates.

    Query ``i`` scores its ``L`` candidates (one positive, ``target[i]``, and hard negatives) by
    :math:`q_i \cdot d_{il} / \tau`. With ``in_batch=True`` (default) every query also sees the
    other queries' candidates as negatives: InfoNCE (:func:`info_nce`) over the pooled
    ``candidates.reshape(n * L, D)``, so ``n * L`` can be tens of thousands without the score matrix.
    With ``in_batch=False`` the softmax runs over the query's own list only (local contrastive
    estimation; ``[n, L]`` scores). Karpukhin et al., *Dense Passage Retrieval*, EMNLP 2020; Gao,
    Dai, Callan, *Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline*, ECIR 2021.

    Args:
        query: ``[n, D]``.
        candidates: ``[n, L, D]``, query ``i``'s list in row ``i``.
        target: ``[n]`` position of each query's positive in its list; default ``0`` (the first).
        temperature: :math:`\tau > 0`. Default ``1.0`` (scores as they are).
        in_batch: pool every list's candidates as negatives for every query.
        exclude: optional ``[P, 2]`` (query, candidate) pairs left out of the softmax; the candidate
            indexes the pooled ``n * L`` candidates (``in_batch``) or the query's own list.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size, backend: as in :func:`crossent.linear_cross_entropy` (``in_batch`` only).

    Example:
        >>> import torch, crossent as xe
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> docs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.1, 0.8], [0.7, 0.7]]])
        >>> xe.contrastive.listwise_cross_entropy(q, docs)
        tensor(1.1114)
        >>> xe.contrastive.listwise_cross_entropy(q, docs, in_batch=False)
        tensor(0.5787)
    """
    V.check_reduction(reduction)
    _check_embeddings("query", query)
    if not isinstance(candidates, Tensor):
        raise TypeError(f"candidates must be a tensor, got {type(candidates).__name__}")
    if not candidates.is_floating_point():
        raise TypeError(f"candidates must be floating point, got {candidates.dtype}")
    if candidates.dim() != 3 or candidates.shape[0] != query.shape[0]:
        raise ValueError(
            f"candidates must be [n, L, D] with n = {query.shape[0]} queries, got {tuple(candidates.shape)}"
        )
    _check_same_dtype("candidates", candidates, "query", query)
    n, length, dim = candidates.shape
    if dim != query.shape[1]:
        raise ValueError(f"candidates have {dim} features but query has {query.shape[1]}")
    if length == 0:
        raise ValueError("candidates must hold at least one candidate per query")
    if target is None:
        target = torch.zeros(n, dtype=torch.long, device=query.device)
    else:
        target = _indices("target", target, n, length, query.device)
    if in_batch and n > 0:  # (no queries: no pooled candidates either; the local form gives the empty loss)
        positive = torch.arange(n, device=query.device) * length + target
        return info_nce(
            query, candidates.reshape(n * length, dim), positive, temperature=temperature, exclude=exclude,
            reduction=reduction, chunk_size=chunk_size, backend=backend,
        )  # fmt: skip
    temperature = V.positive("temperature", temperature, who="listwise_cross_entropy")
    scores = torch.einsum("nd,nld->nl", query, candidates) / temperature
    if exclude is not None:
        per_row = _excluded_per_row(exclude, n, length, target)
        i, k = (per_row >= 0).nonzero(as_tuple=True)
        scores = scores.index_put((i, per_row[i, k]), scores.new_full((), float("-inf")))
    # The fused entry points' dtype rule (docs/linear.md): a float32 loss for half-precision inputs.
    return cross_entropy(scores.to(compute_dtype(scores.dtype)), target, reduction=reduction)


def pair_circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Pair-level circle loss on embeddings and labels (metric learning).

    With cosine similarities :math:`s` between anchors and references, positives :math:`s_p` (same
    label, the anchor itself excluded) and negatives :math:`s_n` (other labels), per anchor

    .. math::

        \ell = \mathrm{softplus}\Big(\mathrm{lse}_j\, \gamma\, a_n^j (s_n^j - m)
               + \mathrm{lse}_i\, \big(-\gamma\, a_p^i (s_p^i - (1 - m))\big)\Big),

    :math:`a_p = [1 + m - \mathrm{sg}(s_p)]_+`, :math:`a_n = [\mathrm{sg}(s_n) + m]_+`. Anchors without a
    positive or a negative have loss 0; ``"mean"`` averages the nonzero losses. Equals
    pytorch-metric-learning's ``CircleLoss(m, gamma)`` (whose defaults these are: fine-grained
    retrieval; the paper uses ``m=0.25, gamma=256`` for face recognition). The class-level form is
    ``crossent.losses.Circle``. Sun et al., *Circle Loss: A Unified Perspective of Pair Similarity
    Optimization*, CVPR 2020.

    Args:
        embeddings: ``[n, D]`` (normalised here).
        labels: ``[n]`` integer labels.
        m: relaxation margin. Default ``0.4``.
        gamma: scale. Default ``80.0``.
        ref_embeddings, ref_labels: optional references ``[n', D]`` / ``[n']`` (default: the batch
            itself, without the anchor's own pair).
        reduction: ``"mean"`` (over nonzero losses), ``"sum"`` or ``"none"`` (``[n]``).

    Example:
        >>> import torch, crossent as xe
        >>> x = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.4], [-0.3, 1.0]])
        >>> xe.contrastive.pair_circle_loss(x, torch.tensor([0, 0, 1, 1]), reduction="none")
        tensor([ 86.5729,  76.7773, 107.6029,  97.8073])
    """
    m, gamma = check_pair_circle_options(m=m, gamma=gamma, reduction=reduction)
    _check_embeddings("embeddings", embeddings)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("give ref_embeddings and ref_labels together")
    own = ref_embeddings is None
    ref, ref_labels = (embeddings, labels) if own else (ref_embeddings, ref_labels)
    _check_embeddings("ref_embeddings", ref, embeddings.shape[1])
    _check_same_dtype("ref_embeddings", ref, "embeddings", embeddings)
    for name, lab, rows in (("labels", labels, embeddings.shape[0]), ("ref_labels", ref_labels, ref.shape[0])):
        if not isinstance(lab, Tensor) or lab.shape != (rows,):
            raise ValueError(f"{name} must be a [{rows}] tensor")
    x = F.normalize(embeddings, dim=1)
    s = x @ (x if own else F.normalize(ref, dim=1)).T
    same = labels[:, None] == ref_labels[None, :]
    pos = same & ~torch.eye(*same.shape, dtype=torch.bool, device=same.device) if own else same
    neg = ~same
    counted = pos.any(1) & neg.any(1)
    sd = s.detach()
    logit_p = -gamma * (1 + m - sd).clamp_min(0) * (s - (1 - m))
    logit_n = gamma * (sd + m).clamp_min(0) * (s - m)
    # Rows without both kinds use zeros (finite, their loss is dropped), so no 0 * inf in the gradient.
    fill = torch.where(counted, float("-inf"), 0.0).to(s.dtype)[:, None]
    lse_p = torch.logsumexp(torch.where(pos, logit_p, fill), 1)
    lse_n = torch.logsumexp(torch.where(neg, logit_n, fill), 1)
    loss = torch.where(counted, F.softplus(lse_p + lse_n), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    nonzero = loss > 0
    return (loss * nonzero).sum() / nonzero.sum().clamp_min(1)
