"""From the forward kernel's per-split outputs to statistic values, with the statistics' merge rules.

Each split of the vocabulary leaves, per row, the state its statistic's :class:`~crossent.stats.Form`
defines (built here from the kernel's running maxima and sums, in float64 like every statistic
state). The splits are merged pairwise, adjacent ones first, by each statistic's own ``merge`` on
``[splits, rows]`` tensors (``log2(splits)`` vectorised steps; the left split wins ties, as in a
sequential merge), then ``finalize`` gives the value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...stats import ACC, Statistic
from .program import Program


def split_states(program: Program, out: Tensor, argmax_index: Tensor | None) -> dict:
    """``{stat: state}`` with ``[splits, rows]`` components, from ``out[slot, split, row]``."""

    def slot(name):
        return out[program.slots[name]].to(ACC)

    states: dict[Statistic, tuple] = {}
    if program.needs_lse:
        # The (max, log-sum) pair: the log term is kept apart from a large maximum.
        lse_sum, lse_max = slot("lse_sum"), slot("lse_max")
        lse = (lse_max, lse_sum.log())
    roles = program.roles
    for role, stat in roles.items():
        if role == "lse":
            states[stat] = lse
        elif role in ("target", "squares"):
            states[stat] = (slot(role),)
        elif role == "argmax":
            states[stat] = (out[program.slots["argmax_value"]], argmax_index.long())
        elif role == "tempered":
            # The kernels keep the maximum of (z + m) / t; the statistic's state has it in logit units.
            states[stat] = (slot("tempered_max") * stat.temperature, slot("tempered_sum").log())
        elif role == "prob_dot":
            # sum_j p_j z_j of the split, measured from its maximum.
            states[stat] = (*lse, slot("prob_dot") / lse_sum - lse_max)
        elif role == "prob_power":
            states[stat] = (*lse, slot("prob_power") / lse_sum.pow(stat.power))
    for k, (stat, _) in enumerate(program.columns):
        column = slot(f"column{k}")
        zero = torch.zeros_like(column)
        states[stat] = (zero, column, zero)  # a plain sum: measured from 0
    return states


def merge_splits(stat: Statistic, state: tuple) -> tuple:
    """The state of all splits (``[rows]`` components) by pairwise merges of neighbours."""
    while state[0].shape[0] > 1:
        n = state[0].shape[0]
        pairs = n - n % 2
        merged = stat.merge(tuple(t[0:pairs:2] for t in state), tuple(t[1:pairs:2] for t in state))
        if n % 2:
            merged = tuple(torch.cat([m, t[-1:]]) for m, t in zip(merged, state))
        state = merged
    return tuple(t[0] for t in state)


def merged_values(program: Program, out: Tensor, argmax_index: Tensor | None) -> dict:
    """Final ``[rows]`` values of every statistic of the program."""
    states = split_states(program, out, argmax_index)
    return {stat: stat.finalize(merge_splits(stat, state)) for stat, state in states.items()}


__all__ = ["split_states", "merge_splits", "merged_values"]
