"""The backward kernel's per-row factors, from the plan's coefficients ``dL/dS`` (float64 ``[rows]``).

For every form the kernel computes, the row's factor of its elementwise derivative:

* ``lse`` (``p_j``), ``target`` (``1[j = y]``), column sums (``w_j``) and squares (``2 z_j``) come from
  :meth:`Plan.factors <crossent._engine.plan.Plan.factors>`;
* ``sum_j p_j z_j`` adds ``c (1 - S)`` to the softmax factor and ``c`` to a ``p_j z_j`` factor;
* ``sum_j p_j^k`` subtracts ``c k S`` from the softmax factor and adds ``c k`` to a ``p_j^k`` factor;
* the tempered ``lse`` has a factor of its own softmax.

The kernel rebuilds ``p = exp(z - hi)`` from the float32 head ``hi`` of ``lse``; the float64 tail
``exp(hi - lse)`` is folded into the factors (``exp(k (hi - lse))`` for ``p^k``), as the other
engines fold it (docs/design.md, Precision). Every factor reaches the kernel as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...stats import ACC
from ..plan import Plan
from .program import Program


@dataclass
class RowFactors:
    """Float32 ``[rows]`` operands of the backward kernel (``None``: the kernel does not read it)."""

    lse_hi: Tensor | None = None
    softmax: Tensor | None = None
    prob_dot: Tensor | None = None
    prob_power: Tensor | None = None
    target: Tensor | None = None
    columns: tuple = (None, None)
    squares: Tensor | None = None
    tempered_hi: Tensor | None = None
    tempered: Tensor | None = None
    threshold: Tensor | None = None


def _split(lse: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lse - hi)``: the float32 head of a float64 ``lse`` and its tail."""
    hi = lse.float()
    return hi, lse - hi.to(ACC)


def row_factors(program: Program, plan: Plan, values: dict, coefs: dict, grad_rows: Tensor, filter_eps) -> RowFactors:
    roles = program.roles
    zeros = torch.zeros_like(grad_rows, dtype=ACC)

    def coef(stat):
        return coefs.get(stat, zeros) if stat is not None else zeros

    f = plan.factors(coefs)
    out = RowFactors()
    if program.needs_lse:
        hi, tail = _split(values[roles["lse"]])
        softmax = f.softmax if f.softmax is not None else zeros
        if program.has("prob_dot"):
            stat = roles["prob_dot"]
            softmax = softmax + coef(stat) * (1 - values[stat])
            out.prob_dot = (coef(stat) * torch.exp(-tail)).float()
        if program.has("prob_power"):
            stat = roles["prob_power"]
            k = stat.power
            softmax = softmax - coef(stat) * k * values[stat]
            out.prob_power = (coef(stat) * k * torch.exp(-k * tail)).float()
        out.lse_hi, out.softmax = hi, (softmax * torch.exp(-tail)).float()
    if program.has("target"):
        out.target = (f.onehot if f.onehot is not None else zeros).float()
    out.columns = tuple(coef(stat).float() for stat, _ in program.columns) + (None,) * (2 - len(program.columns))
    if program.has("squares"):
        out.squares = (2 * (f.squares if f.squares is not None else zeros)).float()
    if program.has("tempered"):
        stat = roles["tempered"]
        hi, tail = _split(values[stat] / stat.temperature)
        out.tempered_hi, out.tempered = hi, (coef(stat) * torch.exp(-tail)).float()
    if filter_eps is not None:
        out.threshold = (grad_rows.abs().to(ACC) * filter_eps).float()
    return out


__all__ = ["RowFactors", "row_factors"]
