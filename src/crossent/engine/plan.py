"""The engine-independent half of every execution path.

A :class:`Plan` binds a loss to the transforms and statistics it needs and knows how to

* turn raw logits into transformed logits (:meth:`Plan.transform`),
* compute statistic values or mergeable states over a block of columns,
* evaluate the per-row loss from statistic values (:meth:`Plan.row_losses`),
* get the coefficients ``dL/dS`` by autograd on that tiny formula (:meth:`Plan.coefficients`),
* turn coefficients into the gradient of the raw logits of a block (:meth:`Plan.logit_grad`).

Engines differ only in where the logits come from and how blocks are laid out; this file is the
single place where gradients are assembled, so every engine inherits the same semantics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses.base import Loss
from ..rows import Rows
from ..stats import Statistic, merge_states, with_requirements
from ..transforms import Transform, apply_all, backward_all


class Plan:
    def __init__(self, loss: Loss, rows: Rows, transforms: tuple[Transform, ...] = ()):
        self.loss = loss
        self.transforms = tuple(transforms) + tuple(loss.transforms())
        self.streamable = loss.streamable
        self.stats: list[Statistic] = with_requirements(loss.statistics(rows)) if self.streamable else []

    def require_streamable(self, engine: str) -> None:
        """Refuse a whole-row loss on an engine that never holds a whole logit row."""
        if not self.streamable:
            raise ValueError(
                f"loss {self.loss!r} needs whole logit rows and cannot run on the {engine!r} engine, which "
                "only sees blocks of the vocabulary; use the dense or the row-chunked ('torch') engine"
            )

    # -- forward --------------------------------------------------------------------------------
    def transform(self, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        return apply_all(self.transforms, z, rows, cols)

    def partial_states(self, zt: Tensor, rows: Rows, cols: slice) -> dict:
        """Mergeable states of every statistic over the columns ``cols`` (``zt`` transformed)."""
        return {s: s.partial(zt, rows, cols) for s in self.stats}

    def merge_states(self, chunks: list[dict]) -> dict:
        """Final statistic values from the states of disjoint column chunks."""
        return {s: s.finalize(merge_states(s, [c[s] for c in chunks])) for s in self.stats}

    def statistics(self, zt: Tensor, rows: Rows) -> dict:
        """Final statistic values over whole rows."""
        return {s: s.compute(zt, rows) for s in self.stats}

    def row_losses(self, values: dict, rows: Rows) -> Tensor:
        """Weighted per-row losses ``[N]``, zero on ignored rows."""
        out = self.loss.weighted_row_loss(values, rows)
        return torch.where(rows.valid, out, torch.zeros_like(out))

    # -- backward -------------------------------------------------------------------------------
    def coefficients(self, values: dict, rows: Rows, grad_rows: Tensor) -> dict:
        """``sum_i grad_rows[i] * dL_i/dS`` per statistic, by autograd on the per-row formula."""
        wanted = [s for s in self.stats if s.differentiable]
        with torch.enable_grad():
            leaves = {s: (v.detach().requires_grad_() if s.differentiable else v) for s, v in values.items()}
            out = self.row_losses(leaves, rows)
            if not out.requires_grad:
                return {}
            grads = torch.autograd.grad(out, [leaves[s] for s in wanted], grad_rows.to(out.dtype), allow_unused=True)
        return {s: g for s, g in zip(wanted, grads) if g is not None}

    def logit_grad(
        self, z: Tensor, rows: Rows, values: dict, coefs: dict, cols: slice, out: Tensor | None = None
    ) -> Tensor:
        """``dL/dz`` for the raw logits ``z`` (``[N, width]``) of the columns ``cols``.

        With ``out`` (shaped like ``z``) the gradient is written there, and straight there when the
        first statistic can start a gradient in a given buffer (saves a pass and a temporary).
        """
        zt = self.transform(z, rows, cols) if self.transforms else z
        grad = None
        for s in self.stats:
            if s not in coefs:
                continue
            if grad is None and out is not None and out.dtype == z.dtype and s.writes_into:
                grad = s.add_grad(out, zt, coefs[s], values, rows, cols, fresh=True)
            else:
                grad = s.add_grad(grad, zt, coefs[s], values, rows, cols)
        if grad is None:
            grad = torch.zeros_like(z)
        grad = backward_all(self.transforms, grad, z, rows, cols)
        if out is not None and grad is not out:
            out.copy_(grad)
            return out
        return grad

    # -- whole rows with autograd -----------------------------------------------------------------
    def autograd_row_losses(self, z: Tensor, rows: Rows) -> Tensor:
        """Per-row losses with ordinary autograd through the whole row (whole-row losses)."""
        zt = self.transform(z, rows, slice(0, z.shape[-1]))
        out = self.loss.dense_row_loss(zt, rows)
        return torch.where(rows.valid, out, torch.zeros_like(out))
