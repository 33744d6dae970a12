"""Independent references for the whole-row losses, the sigmoid focal loss, the regression targets and the
smooth adversarial comp-sum objective, written straight from the formulas with plain torch autograd.

They share no code with ``crossent``: where the library uses a numerically careful form, the reference
uses the textbook one (``1 - p`` instead of ``-expm1(log p)``, ``sum |z|^p`` without rescaling,
``erf`` differences without tail handling), so agreement checks the algebra as well as the code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# -- reductions, as torch.nn.functional.cross_entropy defines them ---------------------------------------
def reduce_rows(per_row, target, weight=None, ignore_index=-100, reduction="mean"):
    """``per_row`` holds the unweighted loss of each row computed with a valid class in ignored rows."""
    valid = target != ignore_index
    if weight is None:
        w = valid.to(per_row.dtype)
    else:
        w = torch.where(valid, weight.to(per_row.dtype)[torch.where(valid, target, 0)], 0.0)
    per = torch.where(valid, per_row * w, torch.zeros_like(per_row))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / w.sum()


# -- NFL ----------------------------------------------------------------------------------------------
def nfl(z, y, gamma=0.5):
    """(1 - sg(p_y))^g (-log p_y) / sum_k (1 - sg(p_k))^g (-log p_k), per row."""
    p = torch.softmax(z, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    factor = (1.0 - p).detach() ** gamma
    num = factor[torch.arange(z.shape[0]), y] * -logp[torch.arange(z.shape[0]), y]
    return num / (factor * -logp).sum(-1)


# -- LogitClip ----------------------------------------------------------------------------------------
def lp_norm(z, p):
    if math.isinf(p):
        return z.abs().max(-1).values
    return (z.abs() ** p).sum(-1) ** (1.0 / p)


def logit_clip(z, y, tau=1.0, p=2.0, base=None):
    """CE (or ``base(z', y)``) of z' = z * min(1, tau / ||z||_p), row by row."""
    rows = []
    for i in range(z.shape[0]):
        norm = lp_norm(z[i], p)
        zi = z[i] * (tau / norm) if norm > tau else z[i]
        rows.append(zi)
    zc = torch.stack(rows)
    if base is None:
        return F.cross_entropy(zc, y, reduction="none")
    return base(zc, y)


# -- ALDR-KL --------------------------------------------------------------------------------------------
def aldr_step(z, y, ids, table, lam0=1.0, margin=0.1, alpha=2.0):
    """One evaluation of the official ALDRLoss_V1 order: returns (per-row loss, updated table copy).

    ``table`` is a float64 tensor indexed by sample id; the returned loss uses the new, detached lambdas.
    """
    n, c = z.shape
    table = table.clone()
    s = z / (z.abs().sum(-1, keepdim=True) / c)
    lam_old = table[ids].to(z.dtype)
    q = torch.softmax(s.detach() / lam_old[:, None], dim=-1) + 1e-5
    q = q / q.sum(-1, keepdim=True)
    kl = (q * torch.log(c * q)).sum(-1)
    lam = (lam0 - lam0 * kl / (alpha * math.log(c))).detach()
    table[ids] = lam.to(torch.float64)
    onehot = F.one_hot(y, c).to(z.dtype)
    diff = s - (s * onehot).sum(-1, keepdim=True) + margin * (1 - onehot)
    ldr = lam * torch.log(torch.mean(torch.exp(diff / lam[:, None]), dim=-1))
    extra = -0.5 * alpha * math.log(c) / lam0 * (lam - lam0) ** 2
    return ldr + extra, table


# -- sigmoid focal (torchvision.ops.sigmoid_focal_loss, as documented) --------------------------------
def torchvision_sigmoid_focal(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """The formula of torchvision/ops/focal_loss.py, written out (torchvision is not installed here)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_focal_rows(z, y, gamma=2.0, alpha=0.25):
    """Sum over classes of the elementwise loss against one-hot(y)."""
    t = F.one_hot(y, z.shape[-1]).to(z.dtype)
    return torchvision_sigmoid_focal(z, t, alpha=alpha, gamma=gamma).sum(-1)


# -- comp-sum, from its definition Phi^tau(sum_{k != y} exp(z_k - z_y)) --------------------------------
def comp_sum_from_definition(z, y, tau):
    zy = z.gather(-1, y[:, None])
    others = torch.ones_like(z).scatter(-1, y[:, None], 0.0)
    v = (torch.exp(z - zy) * others).sum(-1)
    if tau == 1:
        return torch.log1p(v)
    return ((1 + v) ** (1 - tau) - 1) / (1 - tau)


# -- regression targets --------------------------------------------------------------------------------
def hl_gauss(y, v_min, v_max, m, sigma_ratio=0.75):
    """Normal CDF differences over the edges, divided by the mass inside [v_min, v_max] (float64)."""
    y = min(max(float(y), v_min), v_max)
    edges = [v_min + (v_max - v_min) * i / m for i in range(m + 1)]
    sigma = sigma_ratio * (v_max - v_min) / m
    cdf = [0.5 * (1 + math.erf((e - y) / (math.sqrt(2) * sigma))) for e in edges]
    z = cdf[-1] - cdf[0]
    return torch.tensor([(cdf[i + 1] - cdf[i]) / z for i in range(m)], dtype=torch.float64)


def hl_gauss_by_quadrature(y, v_min, v_max, m, sigma_ratio=0.75, points=2001):
    """The same masses by Simpson integration of the density: keeps relative precision in the tails."""
    y = min(max(float(y), v_min), v_max)
    sigma = sigma_ratio * (v_max - v_min) / m
    out = []
    for i in range(m):
        a = v_min + (v_max - v_min) * i / m
        b = v_min + (v_max - v_min) * (i + 1) / m
        t = torch.linspace(a, b, points, dtype=torch.float64)
        f = torch.exp(-0.5 * ((t - y) / sigma) ** 2)
        h = (b - a) / (points - 1)
        out.append(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))
    mass = torch.stack(out)
    return mass / mass.sum()


def two_hot(y, v_min, v_max, m):
    w = (v_max - v_min) / m
    centers = [v_min + w * (i + 0.5) for i in range(m)]
    y = min(max(float(y), centers[0]), centers[-1])
    out = torch.zeros(m, dtype=torch.float64)
    if m == 1:
        out[0] = 1
        return out
    for k in range(m - 1):
        if centers[k] <= y <= centers[k + 1]:
            hi = (y - centers[k]) / (centers[k + 1] - centers[k])
            out[k], out[k + 1] = 1 - hi, hi
            return out
    raise AssertionError("unreachable")
