r"""Sequence-level preference objectives: DPO (sigmoid, robust, hinge, IPO), SimPO, CPO, ORPO, KTO.

Each loss is a formula over *sequence* log-probabilities, ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)``
(or its per-token mean, where the method length-normalises), so it runs on whatever produced the
per-token log-probabilities: a ``log_softmax`` of dense logits, or :func:`crossent.linear_log_probs`,
which never holds the ``[N, V]`` logits. :func:`sequence_log_prob` reduces ``[B, T]`` token log-probs
to ``[B]``; the ``linear_*`` entry points are that composition in one call.

**Layout.** Paired methods take the chosen and the rejected completions in one batch of ``2B`` rows,
the ``B`` chosen first and the ``B`` rejected after, in the same order (TRL's and Liger-Kernel's
layout); the formulas take the two halves as separate ``[B]`` tensors. Reference log-probs
(``ref_chosen_logps``, ``ref_rejected_logps``) are the frozen reference model's, usually precomputed
once per dataset; ``None`` stands for a uniform reference (zero log-ratios' offset).

**Fused entry points** (``linear_dpo_loss``, ``linear_simpo_loss``, ``linear_cpo_loss``,
``linear_orpo_loss``, ``linear_kto_loss``) take a linear head: ``e`` ``[2B, T, D]`` (``[B, T, D]`` for
KTO), ``c`` ``[V, D]`` and ``target`` ``[2B, T]`` with ``ignore_index`` on every position that is not a
completion token (prompt, padding). Their per-token log-probabilities come from
:func:`crossent.linear_log_probs` (``bias``, ``temperature``, ``softcap``, ``ignore_index``, ``shift``,
``backend``, ``chunk_size`` are its arguments), so no ``[2B, T, V]`` logits are held.

**Conventions.** ``Delta = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, the
implicit reward margin; every loss is to be minimised; ``beta`` is the inverse temperature of the
implicit reward (``r = beta log(pi / pi_ref)``), and for IPO it is ``tau``, the regularisation (the
target margin is ``1 / (2 tau)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from ._log_probs import linear_log_probs
from ._rows import compute_dtype

__all__ = [
    "DPO_LOSS_TYPES",
    "sequence_log_prob",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_reference_point",
    "linear_dpo_loss",
    "linear_simpo_loss",
    "linear_cpo_loss",
    "linear_orpo_loss",
    "linear_kto_loss",
]

#: The ``loss_type`` values of :func:`dpo_loss`, as TRL's DPOTrainer names them.
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _float(t):
    if isinstance(t, Tensor):
        return t.to(compute_dtype(t.dtype)) if t.is_floating_point() else t.float()
    return t


def _pair(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("chosen_logps", chosen), ("rejected_logps", rejected)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_logps and rejected_logps must have one shape (one pair per entry), "
            f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    return _float(chosen), _float(rejected)


def _log_ratio(logps: Tensor, ref: Tensor | None, name: str) -> Tensor:
    if ref is None:
        return logps
    if not isinstance(ref, Tensor) or ref.shape != logps.shape:
        raise ValueError(f"{name} must be a tensor of shape {tuple(logps.shape)}")
    return logps - _float(ref).detach()


def _smoothed(margin: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigmoid(margin) - eps log sigmoid(-margin)``: a preference label flipped with
    probability ``eps`` (conservative DPO, Mitchell 2023)."""
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    V.check_reduction(reduction)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def sequence_log_prob(token_logp: Tensor, mask: Tensor | None = None, *, average: bool = False) -> Tensor:
    r"""``[B, T]`` per-token log-probabilities to ``[B]`` sequence log-probabilities.

    ``sum_t m_t logp_t`` (``average=False``: ``log pi(y | x)``), or that over ``max(1, sum_t m_t)``
    (``average=True``: the per-token mean that SimPO, ORPO and IPO use). ``mask`` (``[B, T]``, bool
    or 0/1) marks the completion's tokens; without it every position counts.

    >>> import torch
    >>> lp = torch.tensor([[-1.0, -2.0, -4.0]])
    >>> sequence_log_prob(lp, torch.tensor([[1, 1, 0]])), sequence_log_prob(lp, average=True)
    (tensor([-3.]), tensor([-2.3333]))
    """
    if not isinstance(token_logp, Tensor) or not token_logp.is_floating_point() or token_logp.dim() < 1:
        raise TypeError("token_logp must be a floating-point tensor [B, T]")
    token_logp = _float(token_logp)
    if mask is None:
        mask = token_logp.new_ones(token_logp.shape)
    elif mask.shape != token_logp.shape:
        raise ValueError(f"mask must have token_logp's shape {tuple(token_logp.shape)}, got {tuple(mask.shape)}")
    m = mask.to(token_logp.dtype)
    total = (token_logp * m).sum(-1)
    return total / m.sum(-1).clamp_min(1.0) if average else total


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Direct Preference Optimization (Rafailov et al., 2023) and its pairwise variants.

    With ``Delta`` the reward margin (module docstring) and ``eps = label_smoothing``:

    * ``sigmoid``: ``-(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)`` (DPO; ``eps > 0``
      is conservative DPO, cDPO);
    * ``robust``: ``((1 - eps)(-log sigmoid(beta Delta)) + eps log sigmoid(-beta Delta)) / (1 - 2 eps)``,
      the unbiased loss under label noise (rDPO, Chowdhury et al., 2024), ``0 <= eps < 1/2``;
    * ``hinge``: ``max(0, 1 - beta Delta)`` (SLiC, Zhao et al., 2023);
    * ``ipo``: ``(Delta - 1 / (2 beta))^2`` (IPO, Azar et al., 2023). TRL length-normalises IPO's
      log-ratios: pass per-token means (:func:`sequence_log_prob` with ``average=True``, for the policy
      and the reference alike).

    Shapes: all four ``[B]`` (one entry per pair); the reference log-probs are detached (``None``: no
    reference, as in reference-free DPO). ``reduction``: ``"mean"`` (TRL), ``"sum"`` or ``"none"``
    (``[B]``).

    Conventions: TRL 1.16's ``DPOTrainer`` applies ``label_smoothing`` to ``robust`` only (and its
    ``sigmoid`` equals ``eps = 0``); its CPOTrainer and older TRL applied it to ``sigmoid`` as here.

    >>> import torch
    >>> pi_w, pi_l = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
    >>> ref_w, ref_l = torch.tensor([-10.5, -12.0]), torch.tensor([-10.5, -12.0])
    >>> dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5, reduction="none")
    tensor([0.4741, 0.9741])
    """
    chosen_logps, rejected_logps = _pair(chosen_logps, rejected_logps)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    beta = V.positive("beta", beta, who="dpo_loss")
    label_smoothing = V.real("dpo_loss", "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    delta = _log_ratio(chosen_logps, ref_chosen_logps, "ref_chosen_logps") - _log_ratio(
        rejected_logps, ref_rejected_logps, "ref_rejected_logps"
    )
    if loss_type == "sigmoid":
        loss = _smoothed(beta * delta, label_smoothing)
    elif loss_type == "robust":
        eps = label_smoothing
        loss = ((1 - eps) * -F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    else:
        loss = (delta - 1 / (2 * beta)).square()
    return _reduce(loss, reduction)


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""SimPO (Meng et al., 2024): reference-free DPO on length-normalised log-probs with a margin.

    ``-(1 - eps) log sigmoid(beta (c - r) - gamma) - eps log sigmoid(-(beta (c - r) - gamma))``, with ``c``,
    ``r`` the per-token *mean* log-probs of the chosen and rejected completions
    (:func:`sequence_log_prob` with ``average=True``) and ``gamma`` the target reward margin. (TRL's
    CPOTrainer calls ``gamma`` ``simpo_gamma`` and applies it as ``beta (c - r - gamma / beta)``, the same
    value; Liger-Kernel's ``gamma`` is the same.) Shapes ``[B]``; ``reduction`` as in :func:`dpo_loss`.

    >>> import torch
    >>> simpo_loss(torch.tensor([-0.8]), torch.tensor([-1.4]), beta=2.0, gamma=0.5)
    tensor(0.4032)
    """
    chosen_logps, rejected_logps = _pair(chosen_logps, rejected_logps)
    beta = V.positive("beta", beta, who="simpo_loss")
    gamma = V.real("simpo_loss", "gamma", gamma)
    label_smoothing = V.real("simpo_loss", "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    return _reduce(_smoothed(beta * (chosen_logps - rejected_logps) - gamma, label_smoothing), reduction)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Contrastive Preference Optimization (Xu et al., 2024): reference-free DPO plus the chosen NLL.

    ``mean_pairs(-(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))) + alpha * nll``,
    with ``c``, ``r`` the chosen and rejected sequence log-probs (sums, ``[B]``) and ``chosen_nll`` the
    scalar negative log-likelihood of the chosen completions (the mean over their tokens, TRL's
    ``cpo_alpha`` term). Returns a scalar.

    >>> import torch
    >>> cpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor(1.25), beta=0.5, alpha=1.0)
    tensor(1.3769)
    """
    chosen_logps, rejected_logps = _pair(chosen_logps, rejected_logps)
    beta = V.positive("beta", beta, who="cpo_loss")
    alpha = V.real("cpo_loss", "alpha", alpha)
    label_smoothing = V.real("cpo_loss", "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    preference = _smoothed(beta * (chosen_logps - rejected_logps), label_smoothing).mean()
    return preference + alpha * _float(chosen_nll)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-x.exp()), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, *, beta: float = 0.1) -> Tensor:
    r"""Odds Ratio Preference Optimization (Hong et al., 2024): the chosen NLL minus a log-odds-ratio term.

    ``nll - beta * mean_pairs(log sigmoid(log odds(c) - log odds(r)))``, ``log odds(p) = p - log(1 - e^p)``,
    with ``c``, ``r`` the per-token *mean* log-probs (``[B]``, :func:`sequence_log_prob` with
    ``average=True``) and ``chosen_nll`` the scalar NLL of the chosen completions (TRL: the mean over
    their tokens). ``beta`` is the paper's ``lambda``. Returns a scalar.

    >>> import torch
    >>> orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), torch.tensor(0.5), beta=0.1)
    tensor(0.5171)
    """
    chosen_logps, rejected_logps = _pair(chosen_logps, rejected_logps)
    beta = V.real("orpo_loss", "beta", beta)
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    return _float(chosen_nll) - beta * F.logsigmoid(log_odds).mean()


def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    r"""KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, detached.

    ``y'`` are *mismatched* completions (another prompt's completion, TRL pairs each prompt with the
    previous example's), so ``z0`` estimates ``KL(pi || pi_ref)``; TRL also averages it over ranks.

    >>> import torch
    >>> kto_reference_point(torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.5]))
    tensor(0.2500)
    """
    return (_float(kl_logps) - _float(ref_kl_logps)).mean().detach().clamp_min(0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float = 0.0,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired, labelled completions.

    With ``rho = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = kl``
    (:func:`kto_reference_point`, detached): ``w_D (1 - sigmoid(beta (rho - z0)))`` for a desirable
    completion, ``w_U (1 - sigmoid(beta (z0 - rho)))`` for an undesirable one (the paper's eq. 7 up to
    its constant ``lambda``). Shapes: ``logps``, ``ref_logps``, ``desirable`` (bool): ``[B]``; ``kl``
    a scalar. ``reduction``: ``"mean"`` over all ``B`` (TRL), ``"sum"`` or ``"none"``.

    >>> import torch
    >>> kto_loss(torch.tensor([-9.0, -9.0]), torch.tensor([-10.0, -10.0]), torch.tensor([True, False]),
    ...          beta=1.0, reduction="none")
    tensor([0.2689, 0.7311])
    """
    if not isinstance(logps, Tensor) or not logps.is_floating_point():
        raise TypeError("logps must be a floating-point tensor [B]")
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or desirable.shape != logps.shape:
        raise ValueError(f"desirable must be a bool tensor of shape {tuple(logps.shape)}")
    beta = V.positive("beta", beta, who="kto_loss")
    w_d = V.non_negative("desirable_weight", desirable_weight, who="kto_loss")
    w_u = V.non_negative("undesirable_weight", undesirable_weight, who="kto_loss")
    z0 = _float(kl).detach() if isinstance(kl, Tensor) else V.real("kto_loss", "kl", kl)
    rho = _log_ratio(_float(logps), ref_logps, "ref_logps")
    sign = desirable.to(rho.dtype) * 2 - 1
    weight = torch.where(desirable, rho.new_tensor(w_d), rho.new_tensor(w_u))
    return _reduce(weight * (1 - torch.sigmoid(beta * sign * (rho - z0))), reduction)


class _Sequences(NamedTuple):
    """Per-sequence quantities of one fused pass: ``logps`` (sum or mean over the counted tokens, ``[R]``),
    ``counts`` (counted tokens per row, at least 1) and ``token_logp`` / ``mask`` (``[R, T]``)."""

    logps: Tensor
    counts: Tensor
    token_logp: Tensor
    mask: Tensor


def _sequences(e, c, target, head: dict, *, average: bool, paired: bool = True) -> _Sequences:
    if not isinstance(target, Tensor) or target.dim() < 2:
        raise TypeError("target must be an integer tensor [R, T]: one completion per row")
    if paired:
        _halves(target)
    token_logp = linear_log_probs(e, c, target, **head).logp
    shift, ignore_index = head["shift"], head["ignore_index"]
    mask = (target[..., 1:] if shift else target) != ignore_index
    counts = mask.sum(-1).clamp_min(1).to(token_logp.dtype)
    return _Sequences(sequence_log_prob(token_logp, mask, average=average), counts, token_logp, mask)


def _halves(t: Tensor, name: str = "target") -> tuple[Tensor, Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"{name} must hold 2B rows, the B chosen then the B rejected; got {t.shape[0]} rows")
    return t.chunk(2, dim=0)


def _chosen_nll(seqs: _Sequences) -> Tensor:
    """The mean negative log-likelihood over the chosen half's counted tokens."""
    logp, _ = _halves(seqs.token_logp)
    mask, _ = _halves(seqs.mask)
    m = mask.to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp_min(1.0)


def _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size) -> dict:
    return dict(bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
                backend=backend, chunk_size=chunk_size)  # fmt: skip


def linear_dpo_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`dpo_loss` on the sequence log-probs (sums over the completion) of a linear head, fused (module
    docstring: the ``[chosen; rejected]`` layout and the head's arguments).

    The reference log-probs are sequence sums ``[B]`` (TRL's precomputed ``ref_chosen_logps``); for
    ``loss_type="ipo"`` the policy's and the reference's log-ratios are divided by each completion's
    token count, as TRL does.

    >>> import torch
    >>> e, c = torch.randn(4, 6, 8, requires_grad=True), torch.randn(50, 8)     # 2 pairs: rows 0-1 chosen
    >>> target = torch.randint(0, 50, (4, 6))
    >>> target[:, :2] = -100                                                       # the prompt
    >>> loss = linear_dpo_loss(e, c, target, torch.tensor([-20.0, -22.0]), torch.tensor([-21.0, -20.0]))
    >>> loss.backward()
    """
    seqs = _sequences(e, c, target, _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size),
                      average=False)  # fmt: skip
    chosen, rejected = _halves(seqs.logps)
    if loss_type == "ipo":
        n_w, n_l = _halves(seqs.counts)
        chosen, rejected = chosen / n_w, rejected / n_l
        ref_chosen_logps = None if ref_chosen_logps is None else _float(ref_chosen_logps) / n_w
        ref_rejected_logps = None if ref_rejected_logps is None else _float(ref_rejected_logps) / n_l
    return dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, reduction=reduction)  # fmt: skip


def linear_simpo_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`simpo_loss` on the per-token mean log-probs of a linear head's completions, fused (module
    docstring: the ``[chosen; rejected]`` layout and the head's arguments)."""
    seqs = _sequences(e, c, target, _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size),
                      average=True)  # fmt: skip
    chosen, rejected = _halves(seqs.logps)
    return simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction)


def linear_cpo_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`cpo_loss` on a linear head, fused: sequence sums, and the NLL averaged over the chosen tokens
    (module docstring: the ``[chosen; rejected]`` layout and the head's arguments)."""
    seqs = _sequences(e, c, target, _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size),
                      average=False)  # fmt: skip
    chosen, rejected = _halves(seqs.logps)
    return cpo_loss(chosen, rejected, _chosen_nll(seqs), beta=beta, alpha=alpha, label_smoothing=label_smoothing)


def linear_orpo_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    *,
    beta: float = 0.1,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`orpo_loss` on a linear head, fused (module docstring): per-token mean log-probs, and the NLL
    averaged over the chosen tokens (TRL's ORPO counts the prompt's tokens in the NLL too: leave them unignored in ``target`` for
    that, at the price of counting them in the odds as well)."""
    seqs = _sequences(e, c, target, _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size),
                      average=True)  # fmt: skip
    chosen, rejected = _halves(seqs.logps)
    return orpo_loss(chosen, rejected, _chosen_nll(seqs), beta=beta)


def linear_kto_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    desirable: Tensor,
    ref_logps: Tensor,
    kl: Tensor | float = 0.0,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`kto_loss` on a linear head: ``e`` ``[B, T, D]`` and ``target`` ``[B, T]`` hold ``B`` unpaired
    completions, ``desirable`` ``[B]`` their labels and ``ref_logps`` ``[B]`` the reference's sequence
    sums; ``kl`` the reference point (:func:`kto_reference_point`)."""
    seqs = _sequences(e, c, target, _head(bias, temperature, softcap, ignore_index, shift, backend, chunk_size),
                      average=False, paired=False)  # fmt: skip
    return kto_loss(seqs.logps, ref_logps, desirable, kl, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight, reduction=reduction)  # fmt: skip

