"""Independent references for the streamable losses, written straight from their formulas.

Each reference materialises the whole row of probabilities (``torch.softmax`` / ``torch.log_softmax``)
and relies on plain autograd; none uses crossent's statistics. Two liberties are taken so that the
references themselves have finite gradients on extreme rows (logits of +-1e4):

* a power of a probability is ``exp(q * log_softmax)`` (``pow`` of an underflowed 0 has an infinite
  derivative);
* a branch that is not taken gets a safe input (``torch.where`` passes 0 * inf = NaN otherwise).

Every reference returns the unweighted per-row loss ``[N]`` for class-index targets ``y`` (all valid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _onehot(z, y):
    return F.one_hot(y, z.shape[-1]).to(torch.bool)


def _logp_y(z, y):
    return torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)


def _p_y(z, y):
    return torch.softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)


def ce(z, y):
    return -_logp_y(z, y)


def _modulator(z, y, gamma):
    """(1 - p_y)^gamma; where 1 - p_y rounds to 0 its value is 0 (1 for gamma = 0) and so is its slope."""
    u = 1 - _p_y(z, y)
    positive = u > 0
    safe = torch.where(positive, u, torch.ones_like(u))
    at_zero = torch.ones_like(u) if gamma == 0 else torch.zeros_like(u)
    return torch.where(positive, safe**gamma, at_zero)


def focal(z, y, gamma=2.0, alpha=None):
    loss = -_modulator(z, y, gamma) * _logp_y(z, y)
    if alpha is not None:
        loss = loss * torch.as_tensor(alpha, dtype=z.dtype)[y]
    return loss


def poly1(z, y, epsilon=1.0):
    return ce(z, y) + epsilon * (1 - _p_y(z, y))


def poly(z, y, epsilons=(1.0,)):
    u = 1 - _p_y(z, y)
    return ce(z, y) + sum(e * u**j for j, e in enumerate(epsilons, start=1))


def poly1_focal(z, y, epsilon=1.0, gamma=2.0):
    return focal(z, y, gamma) + epsilon * (1 - _p_y(z, y)) ** (gamma + 1)


COMP_SUM_FLOOR = math.log(1e-7)


def comp_sum(z, y, tau=1.0):
    logp = _logp_y(z, y)
    if tau == 1:
        return -logp
    if tau > 1:
        return (1 - torch.exp((tau - 1) * logp)) / (tau - 1)
    # Below p_y = 1e-7 the documented tangent continuation: L(c) + |L'(c)| (c - log p_y).
    c = COMP_SUM_FLOOR
    above = logp >= c
    safe = torch.where(above, logp, torch.full_like(logp, c))
    exact = (1 - torch.exp((tau - 1) * safe)) / (tau - 1)
    at_c = (1 - math.exp((tau - 1) * c)) / (tau - 1)
    tangent = at_c + math.exp((tau - 1) * c) * (c - logp)
    return torch.where(above, exact, tangent)


def gce(z, y, q=0.7):
    return (1 - torch.exp(q * _logp_y(z, y))) / q


def tgce(z, y, q=0.7, k=0.5):
    p = _p_y(z, y)
    return torch.where(p > k, gce(z, y, q), torch.full_like(p, (1 - k**q) / q))


def mae(z, y):
    return 1 - _p_y(z, y)


def squentropy(z, y):
    C = z.shape[-1]
    others = torch.where(_onehot(z, y), torch.zeros_like(z), z)
    return ce(z, y) + (others**2).sum(-1) / (C - 1)


def nce(z, y):
    logp = torch.log_softmax(z, -1)
    return -_logp_y(z, y) / (-logp.sum(-1))


def ngce(z, y, q=0.7):
    C = z.shape[-1]
    p_pow = torch.exp(q * torch.log_softmax(z, -1))
    return (1 - torch.exp(q * _logp_y(z, y))) / (C - p_pow.sum(-1))


def nmae(z, y):
    return (1 - _p_y(z, y)) / (2 * (z.shape[-1] - 1))


def rce(z, y, A=math.log(1e-4)):
    # -sum_k p_k log(label_k) with log(0) replaced by A.
    log_label = torch.where(_onehot(z, y), torch.zeros_like(z), torch.full_like(z, A))
    return -(torch.softmax(z, -1) * log_label).sum(-1)


def sce(z, y, alpha=0.1, beta=1.0, A=math.log(1e-4)):
    return alpha * ce(z, y) + beta * rce(z, y, A)


def apl(z, y, active="nce", passive="rce", alpha=1.0, beta=1.0):
    return alpha * REFERENCES[active](z, y) + beta * REFERENCES[passive](z, y)


def encouraging(z, y, log_end=0.75):
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    bonus = torch.log(torch.clamp(1 - p, min=1e-5))
    if log_end != 1.0:
        tangent = (p - log_end) / (log_end - 1) + math.log(1 - log_end)
        bonus = torch.where(p > log_end, tangent, bonus)
    return -(logp - bonus).gather(-1, y[:, None]).squeeze(-1)


def ldr_scores(z, normalize=None):
    if normalize is None:
        return z
    if normalize == "softplus":
        # log softplus(z) = z + log(1 - e^z / 2 + ...): below z = -30 the first term alone is exact to 1e-13,
        # and it keeps rows of very negative logits from underflowing to all zeros.
        log_sp = torch.where(z < -30, z, torch.log(F.softplus(torch.clamp(z, min=-30))))
        sp = torch.exp(log_sp - log_sp.amax(-1, keepdim=True))
        return sp / sp.mean(-1, keepdim=True)
    denom = z.abs().mean(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)
    return z / denom


def ldr_kl(z, y, lam=1.0, margin=0.1, normalize=None):
    s = ldr_scores(z, normalize)
    s_y = s.gather(-1, y[:, None])
    diff = s - s_y + margin * (~_onehot(z, y)).to(z.dtype)
    return lam * (torch.logsumexp(diff / lam, -1) - math.log(z.shape[-1]))


def mixce(z, y, eta=0.5):
    nll = ce(z, y)
    return eta * nll + (1 - eta) * torch.exp(-nll).detach() * nll


def circle_logits(z, y, m=0.25, gamma=256.0):
    """The class-level circle logits, as the canonical reimplementations build them."""
    onehot = _onehot(z, y).to(z.dtype)
    a_p = torch.clamp_min(-z.detach() + 1 + m, 0.0)
    a_n = torch.clamp_min(z.detach() + m, 0.0)
    return onehot * gamma * a_p * (z - (1 - m)) + (1 - onehot) * gamma * a_n * (z - m)


def circle(z, y, m=0.25, gamma=256.0):
    return ce(circle_logits(z, y, m, gamma), y)


def soft_target_ce(z, y):
    return ce(z, y)


def soft_target_ce_probs(z, q, weight=None):
    """-sum_k w_k q_k log p_k for a probability target ``q``."""
    w = torch.ones_like(z[0]) if weight is None else weight.to(z.dtype)
    return -(w * q * torch.log_softmax(z, -1)).sum(-1)


REFERENCES = {
    "ce": ce,
    "focal": focal,
    "poly1": poly1,
    "poly": poly,
    "poly1_focal": poly1_focal,
    "comp_sum": comp_sum,
    "gce": gce,
    "tgce": tgce,
    "mae": mae,
    "squentropy": squentropy,
    "nce": nce,
    "ngce": ngce,
    "nmae": nmae,
    "rce": rce,
    "sce": sce,
    "apl": apl,
    "encouraging": encouraging,
    "ldr_kl": ldr_kl,
    "mixce": mixce,
    "circle": circle,
    "soft_target_ce": soft_target_ce,
}


def row_scale(name, hp, z, y):
    """Magnitude of the numbers the loss's log-normalisers see, per row (rounding scales with it)."""
    scale = z.detach().abs().amax(-1)
    if name == "squentropy":
        # sum_k z_k^2 - z_y^2 cancels when z_y dominates: rounding scales with the whole sum of squares.
        scale = scale + (z.detach() ** 2).sum(-1) / (z.shape[-1] - 1)
    if name == "circle":
        scale = circle_logits(z.detach(), y, **hp).abs().amax(-1)
    elif name == "ldr_kl" and hp.get("normalize"):
        s = ldr_scores(z.detach(), hp["normalize"]) / hp.get("lam", 1.0)
        scale = torch.maximum(scale, s.abs().amax(-1))
    return 1 + scale


def reference(name, hp, z, target, *, weight=None, ignore_index=-100, reduction="mean"):
    """The reference loss with PyTorch's ``weight`` / ``ignore_index`` / ``reduction`` semantics."""
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    per_row = REFERENCES[name](z, y, **hp)
    w = torch.ones_like(per_row) if weight is None else weight.to(z.dtype)[y]
    per_row = torch.where(valid, per_row * w, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    denom = torch.where(valid, w, torch.zeros_like(w)).sum()
    return per_row.sum() / denom if denom > 0 else per_row.sum() * 0
