r"""Token-level policy-gradient objectives of LLM reinforcement learning: PPO/GRPO and their variants.

Every function here is a formula over per-token tensors (the policy's log-probabilities of the sampled
tokens and what the rollout recorded about them), so it runs on whatever produced the log-probabilities:
a ``log_softmax`` of dense logits, or :func:`crossent.linear_log_probs`, which never holds the
``[N, V]`` logits. :func:`linear_grpo_loss` is that composition in one call.

**Layout.** Per-token tensors are ``[B, T]``: one row per sampled sequence (a completion), its tokens
along the last dim, padded to a common length ``T``. ``mask`` (``[B, T]``, bool or 0/1) marks the tokens
that count (the completion, not the prompt or the padding). A sequence-level quantity (the advantage of
a GRPO group, GSPO's ratio) is one value per row. Packed sequences are unpacked into this layout first.

**Conventions** (those of TRL 1.16's ``GRPOTrainer._compute_loss``, which the tests reproduce):

* ``r = exp(logp - old_logp)`` per token; with ``importance_level="sequence"`` (GSPO, Zheng et al. 2025)
  one ratio per sequence, ``s = exp(mean_t over the mask of (logp - old_logp))``.
* The clipped surrogate (PPO, Schulman et al. 2017) is a loss to *minimise*:
  ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``; ``eps_high > eps_low`` is DAPO's clip-higher.
* The KL penalty ``beta * KL(pi || pi_ref)`` is *added* per token, estimated by ``k1``, ``k2`` or ``k3``
  (:func:`kl_estimate`); an entropy bonus is *subtracted* as ``entropy_coef`` times the mean entropy
  over the mask, whatever the ``loss_type``.
* ``loss_type`` names how the per-token losses ``l`` become a scalar (:func:`aggregate`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as V
from ._log_probs import linear_log_probs
from ._rows import compute_dtype

__all__ = [
    "LOSS_TYPES",
    "KL_ESTIMATORS",
    "IMPORTANCE_LEVELS",
    "kl_estimate",
    "importance_log_ratio",
    "aggregate",
    "grpo_loss",
    "linear_grpo_loss",
]

#: The ``loss_type`` values, named as TRL's GRPOTrainer names them.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: The per-token estimators of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _float(t: Tensor) -> Tensor:
    """``t`` in the dtype the objectives compute in: float32 for half precision, else its own."""
    return t.to(compute_dtype(t.dtype)) if t.is_floating_point() else t.float()


def _check_like(name: str, t: Tensor | None, shape, *, sequence_ok: bool = False) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    allowed = [tuple(shape)]
    if sequence_ok:
        allowed += [tuple(shape[:-1]), tuple(shape[:-1]) + (1,)]
    if tuple(t.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, allowed))}, got {tuple(t.shape)}")


def _mask_of(mask: Tensor | None, logp: Tensor) -> Tensor:
    if mask is None:
        return logp.new_ones(logp.shape)
    _check_like("mask", mask, logp.shape)
    return mask.to(logp.dtype)


def _per_row(t: Tensor, logp: Tensor) -> Tensor:
    """A per-sequence ``[B]`` tensor as ``[B, 1]``, broadcasting over tokens; ``[B, T]`` as it is."""
    return t.unsqueeze(-1) if t.dim() == logp.dim() - 1 else t


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    r"""Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi`` (Schulman, 2020).

    With ``d = ref_logp - logp`` (the log of ``pi_ref / pi`` at the sampled token):

    * ``k1 = -d``: unbiased, of high variance, negative for some tokens;
    * ``k2 = d^2 / 2``: biased, non-negative; its gradient is that of the KL's (the "mse" of verl);
    * ``k3 = exp(d) - d - 1``: unbiased, non-negative, low variance (TRL's GRPO, verl's "low_var_kl").

    TRL computes ``k3`` as written; verl clamps ``d`` to ``[-20, 20]`` and the estimate to ``[-10, 10]``
    (clamp the inputs first to reproduce it). Shapes: any, ``logp`` and ``ref_logp`` alike; returns
    the same shape.

    >>> import torch
    >>> logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    >>> kl_estimate(logp, ref, "k1"), kl_estimate(logp, ref, "k2")
    (tensor([ 0.5000, -1.0000]), tensor([0.1250, 0.5000]))
    >>> kl_estimate(logp, ref, "k3")
    tensor([0.1065, 0.7183])
    """
    _choice("estimator", estimator, KL_ESTIMATORS)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    return d.exp() - d - 1


def importance_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor | None = None, level: str = "token") -> Tensor:
    r"""``log(pi / pi_old)``: per token ``[B, T]``, or per sequence ``[B, 1]`` (GSPO).

    ``level="sequence"`` gives GSPO's length-normalised sequence ratio (Zheng et al., 2025, eq. 7),
    ``log s_i = (1/|y_i|) sum_t m_it (logp_it - old_logp_it)``, with ``|y_i| = max(1, sum_t m_it)``; its
    gradient flows to every counted token of the sequence, ``s_i / |y_i|`` each. (verl's "gspo" writes
    the same value as ``sg[s_i] pi_t / sg[pi_t]``: the same gradient under its "seq-mean-token-mean".)

    >>> import torch
    >>> logp, old = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    >>> importance_log_ratio(logp, old, torch.tensor([[1, 1, 0]]), "sequence")
    tensor([[-0.2500]])
    """
    _choice("importance_level", level, IMPORTANCE_LEVELS)
    _check_like("old_logp", old_logp, logp.shape)
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    m = _mask_of(mask, log_ratio)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp_min(1.0)).unsqueeze(-1)


def aggregate(
    per_token: Tensor,
    mask: Tensor | None = None,
    loss_type: str = "dapo",
    *,
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
) -> Tensor:
    r"""The scalar loss from per-token losses ``l`` ``[B, T]`` (or per-sequence ``[B, 1]``), by ``loss_type``.

    With ``m`` the mask and ``|y_i| = max(1, sum_t m_it)``:

    ============  ==============================================  ===================================
    loss_type     loss                                            verl's ``loss_agg_mode``
    ============  ==============================================  ===================================
    ``grpo``      ``mean_i (sum_t m l / |y_i|)`` (also ``sapo``)  ``seq-mean-token-mean``
    ``bnpo``      ``sum m l / max(1, sum m)`` (this batch)        ``token-mean``
    ``dr_grpo``   ``sum m l / (B * max_completion_length)``       ``seq-mean-token-sum-norm`` (``/ T``)
    ``dapo``      ``sum m l / num_items`` (``cispo``, ``vespo``)  ``token-mean`` (a global count)
    ``luspo``     ``mean_i (sum_t m l)``                          ``seq-mean-token-sum``
    ============  ==============================================  ===================================

    verl's ``seq-mean-token-sum-norm`` divides by ``T`` alone, not by ``B * T``.

    ``max_completion_length`` defaults to ``T``. ``num_items`` is the number of counted tokens of the
    whole step (all micro-batches and ranks, TRL's ``num_items_in_batch`` over its processes); it
    defaults to this batch's ``max(1, sum m)``, where ``dapo`` equals ``bnpo``. A per-sequence ``l``
    (``[B, 1]``) is broadcast over the sequence's tokens first, as in TRL.

    >>> import torch
    >>> l, m = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    >>> [aggregate(l, m, t).item() for t in ("grpo", "bnpo", "dr_grpo", "luspo")]
    [2.0, 2.0, 1.5, 3.0]
    """
    _choice("loss_type", loss_type, LOSS_TYPES)
    if per_token.dim() < 1:
        raise ValueError("per_token must have at least one dim (the tokens)")
    m = per_token.new_ones(per_token.shape) if mask is None else mask.to(per_token.dtype)
    masked = per_token * m  # a per-sequence [B, 1] loss broadcasts over the mask's tokens
    rows = masked.shape[0] if masked.dim() > 1 else 1
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        length = masked.shape[-1]
        if max_completion_length is not None:
            length = V.count("max_completion_length", max_completion_length)
        return masked.sum() / (rows * length)
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items is None:
            return masked.sum() / m.sum().clamp_min(1.0)
        if isinstance(num_items, Tensor):
            return masked.sum() / num_items.clamp_min(1.0)
        return masked.sum() / max(V.real("aggregate", "num_items", num_items), 1.0)
    return masked.sum(-1).mean()  # luspo


def _vespo_weight(log_ratio: Tensor, m: Tensor, adv: Tensor, shapes) -> Tensor:
    """VESPO's detached gamma weight of each sequence, ``[B, 1]`` (see :func:`grpo_loss`)."""
    (k_pos, lam_pos), (k_neg, lam_neg) = shapes
    log_floor = math.log(1e-8)
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True).clamp(log_floor, 20.0)
        nonneg = (adv >= 0).to(log_w.dtype)
        k = nonneg * (k_pos - k_neg) + k_neg
        lam = (nonneg * (lam_pos - lam_neg) + lam_neg).clamp_min(1e-4)
        return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    loss_type: str = "dapo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    importance_level: str = "token",
    delta: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_shapes: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 3.0), (3.0, 2.0)),
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
) -> Tensor:
    r"""The PPO/GRPO policy loss over per-token log-probabilities, as TRL's GRPOTrainer computes it.

    Per token, with ``r`` the importance ratio (:func:`importance_log_ratio`; ``[B, 1]`` per sequence
    for GSPO) and ``A`` the advantage:

    * clipped (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``):
      ``l = -min(r' A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r' = min(r, delta)`` when ``delta`` is
      given (INTELLECT-2's two-sided clip), else ``r``;
    * ``cispo`` (MiniMax-M1): ``l = -sg[min(r, eps_high)] A logp``: the clipped, detached ratio weights
      the REINFORCE term, and ``eps_high`` is the *absolute* cap (TRL's convention);
    * ``sapo``: ``l = -(4 / tau) sigmoid(tau (r - 1)) A``, ``tau`` the first of ``sapo_temperatures``
      where ``A > 0``, the second elsewhere (a soft gate instead of the clip);
    * ``vespo``: ``l = -sg[phi(w)] A logp`` with ``w = exp(sum_t m_t (logp - old_logp))`` the whole
      sequence's ratio and ``phi(w) = exp(lambda (1 - w)) w^k``, ``(k, lambda)`` the first of
      ``vespo_shapes`` where ``A >= 0``, the second elsewhere; as TRL, the token log-ratios are clamped to
      ``[-20, 20]`` and ``log w`` to ``[log 1e-8, 20]``, and a non-finite ``phi`` counts as 0;

    then ``l += beta * KL`` (:func:`kl_estimate` with ``kl_estimator``, when ``beta != 0``), aggregated
    by ``loss_type`` (:func:`aggregate`), minus ``entropy_coef * sum(m H) / max(1, sum m)``.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask``, ``entropy``: ``[B, T]``; ``advantages``:
    ``[B]`` (one per sequence, GRPO's group-normalised reward) or ``[B, T]``. ``old_logp=None`` means
    on-policy (``old_logp = logp.detach()``, TRL's single-iteration case). ``logp`` carries the
    gradient; the others are data (``entropy`` may carry one too, to train the bonus). Returns a scalar.

    Papers: PPO (Schulman et al., 2017), GRPO (Shao et al., 2024), DAPO (Yu et al., 2025),
    Dr. GRPO (Liu et al., 2025), GSPO (Zheng et al., 2025), CISPO (MiniMax, 2025), SAPO (2025), VESPO (2026).

    >>> import torch
    >>> logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]], requires_grad=True)
    >>> old = torch.tensor([[-1.1, -1.9, -0.5], [-0.2, -2.5, 0.0]])
    >>> mask, adv = torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([1.0, -1.0])
    >>> loss = grpo_loss(logp, old, adv, mask, loss_type="dapo", eps_high=0.28)
    >>> round(loss.item(), 4)
    -0.242
    >>> loss.backward()
    """
    _choice("loss_type", loss_type, LOSS_TYPES)
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if not isinstance(logp, Tensor) or not logp.is_floating_point() or logp.dim() < 1:
        raise TypeError("logp must be a floating-point tensor [B, T]")
    eps_low = V.real("grpo_loss", "eps_low", eps_low, low=0.0)
    eps_high = eps_low if eps_high is None else V.real("grpo_loss", "eps_high", eps_high, low=0.0)
    beta = V.real("grpo_loss", "beta", beta)
    entropy_coef = V.real("grpo_loss", "entropy_coef", entropy_coef)
    if delta is not None:  # the cap of negative-advantage ratios must lie above the clip
        delta = V.real("grpo_loss", "delta", delta, low=1 + eps_high, low_open=True)
    if importance_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"importance_level='sequence' is not defined for loss_type={loss_type!r}")
    _check_like("advantages", advantages, logp.shape, sequence_ok=True)
    _check_like("entropy", entropy, logp.shape)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp, the reference policy's per-token log-probabilities")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy, the policy's per-token entropy")

    logp = _float(logp)
    old_logp = logp.detach() if old_logp is None else _float(old_logp)
    m = _mask_of(mask, logp)
    adv = _per_row(_float(advantages), logp)

    coef = importance_log_ratio(logp, old_logp, m, importance_level).exp()
    if loss_type == "cispo":
        per_token = -coef.clamp(max=eps_high).detach() * adv * logp
    elif loss_type == "sapo":
        t_pos, t_neg = (V.positive("sapo temperature", t, who="grpo_loss") for t in sapo_temperatures)
        tau = (adv > 0).to(coef.dtype) * (t_pos - t_neg) + t_neg
        per_token = -(tau * (coef - 1)).sigmoid() * 4 / tau * adv
    elif loss_type == "vespo":
        per_token = -_vespo_weight(logp - old_logp, m, adv, vespo_shapes) * adv * logp
    else:
        clipped = coef.clamp(1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef = coef.clamp(max=delta)
        per_token = -(coef * adv).minimum(clipped * adv)
    if beta != 0.0:
        _check_like("ref_logp", ref_logp, logp.shape)
        per_token = per_token + beta * kl_estimate(logp, _float(ref_logp), kl_estimator)

    loss = aggregate(per_token, m, loss_type, max_completion_length=max_completion_length, num_items=num_items)
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * (_float(entropy) * m).sum() / m.sum().clamp_min(1.0)
    return loss


def linear_grpo_loss(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    *,
    loss_type: str = "dapo",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    importance_level: str = "token",
    delta: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_shapes: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 3.0), (3.0, 2.0)),
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`grpo_loss` of the policy ``softmax(softcap(e @ c.T + bias) / temperature)``, fused: the per-token
    log-probabilities (and entropies, when ``entropy_coef != 0``) come from
    :func:`crossent.linear_log_probs`, so no ``[B, T, V]`` logits are held, forward or backward.

    ``e``: hidden states ``[B, T, D]``; ``c``: the head ``[V, D]``; ``target``: the sampled tokens ``[B, T]``,
    ``ignore_index`` where a position does not count (prompt, padding): the mask is
    ``target != ignore_index``. With ``shift=True`` position ``t`` scores ``target[..., t + 1]`` and the
    per-token inputs (``old_logp``, ``ref_logp``, a per-token ``advantages``) are ``[B, T - 1]``.
    ``temperature`` is the sampler's (TRL divides the logits by it too). The other arguments are
    :func:`grpo_loss`'s; ``bias``, ``softcap``, ``backend``, ``chunk_size`` are
    :func:`crossent.linear_cross_entropy`'s.

    >>> import torch
    >>> e, c = torch.randn(2, 5, 8, requires_grad=True), torch.randn(32, 8)
    >>> target = torch.tensor([[3, 7, 1, -100, -100], [4, 4, 9, 2, 0]])
    >>> old = torch.zeros(2, 5) - 3.0
    >>> loss = linear_grpo_loss(e, c, target, old, torch.tensor([0.5, -0.5]), entropy_coef=1e-3)
    >>> loss.backward()
    """
    if not isinstance(target, Tensor) or target.dim() < 1:
        raise TypeError("target must be an integer tensor [B, T]")
    out = linear_log_probs(
        e, c, target, bias=bias, temperature=temperature, softcap=softcap, entropy=entropy_coef != 0,
        ignore_index=ignore_index, shift=shift, backend=backend, chunk_size=chunk_size,
    )  # fmt: skip
    mask = (target[..., 1:] if shift else target) != ignore_index
    return grpo_loss(
        out.logp, old_logp, advantages, mask, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high,
        importance_level=importance_level, delta=delta, ref_logp=ref_logp, beta=beta, kl_estimator=kl_estimator,
        entropy=out.entropy, entropy_coef=entropy_coef, sapo_temperatures=sapo_temperatures,
        vespo_shapes=vespo_shapes, max_completion_length=max_completion_length, num_items=num_items,
    )  # fmt: skip
