"""CE with a second term that regularises the rest of the row or reweights the row: squentropy, MixCE."""

from __future__ import annotations

import torch

from ..stats import LSE, SUMSQ, TARGET
from .. import _validation as V
from ._base import Loss, log_prob_target, register


@register("squentropy")
class Squentropy(Loss):
    r"""Squentropy: CE plus the mean square of the non-target logits.

    .. math::

        \ell = -\log p_y + \frac{1}{C - 1} \sum_{k \ne y} z_k^2
             = \mathrm{lse} - z_y + \frac{\sum_k z_k^2 - z_y^2}{C - 1}

    The square term acts on the logits (not the probabilities) and pulls the non-target logits towards
    0. Like the reference code, the square term is formed as ``sumsq - z_y^2``; when :math:`z_y^2`
    dominates the row it carries an absolute rounding error of about :math:`\epsilon z_y^2 / (C-1)`.
    No hyperparameters (the reference code's square-term scale is 1).

    Statistics: ``lse``, ``target``, ``sumsq``. Streams on every engine. Needs :math:`C \ge 2`.

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.Squentropy(), reduction="none")
        tensor([0.8663, 1.0269])

    Reference: Hui, Belkin, Wright, *Cut your Losses with Squentropy*, ICML 2023.
    """

    def statistics(self, rows):
        return (LSE, TARGET, SUMSQ)

    def row_loss(self, s, rows):
        V.at_least_classes("squentropy", rows.num_classes)
        z_y = s[TARGET]
        return s[LSE] - z_y + (s[SUMSQ] - z_y * z_y) / (rows.num_classes - 1)


@register("mixce")
class MixCE(Loss):
    r"""MixCE: the NLL mixed with a self-weighted NLL that approximates reverse cross-entropy.

    .. math::

        \ell = \eta\, l + (1 - \eta)\, \mathrm{sg}(e^{-l})\, l, \qquad l = -\log p_y

    :math:`\mathrm{sg}(e^{-l}) = \mathrm{sg}(p_y)` is the model's own (detached) probability of the
    target: rows the model finds unlikely are down-weighted. ``eta=1`` is CE (MLE). For language models
    this is per token; the reduction over tokens is the usual one (``reduction="mean"`` over
    non-ignored tokens).

    Statistics: ``lse``, ``target``. Streams on every engine.

    Args:
        eta: mixing ratio :math:`\eta \in [0, 1]`. Default ``0.5`` (the authors tune it on dev-set
            MAUVE over :math:`\{0, 0.01, 0.1, \dots, 0.99, 1\}`).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> xe.cross_entropy(logits, torch.tensor([0, 2]), loss=xe.losses.MixCE(), reduction="none")
        tensor([0.2154, 0.6849])

    Reference: Zhang et al., *MixCE: Training Autoregressive Language Models by Mixing Forward and
    Reverse Cross-Entropies*, ACL 2023.
    """

    shift_invariant = True

    def __init__(self, eta: float = 0.5):
        self.eta = V.real("mixce", "eta", eta, low=0.0, high=1.0)

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        weight = self.eta + (1.0 - self.eta) * torch.exp(logp).detach()
        return -logp * weight
