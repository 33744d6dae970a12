"""Reweighting strategies: turn per-row losses (and what they need) into weights or a reweighted loss.

Every strategy takes per-row losses (from any crossent engine with ``reduction="none"``, or from
anywhere) and keyword inputs, and has

* ``weights(losses, **inputs)``: detached weights, one per row, exactly those ``__call__`` would
  apply to this batch, without changing any state;
* ``__call__(losses, **inputs)``: the reweighted scalar loss, differentiable w.r.t. ``losses``,
  advancing the state (if any);
* ``state_dict()`` / ``load_state_dict()``.

=========================== ======================================== ===========================
strategy                    inputs                                   state
=========================== ======================================== ===========================
:class:`ClassBalanced`      ``target``                               none
:class:`LogitAdjustment`    logits (a transform, not a weighting)    none
:class:`LossReweighting`    per-sequence losses (global batch)       step counter
:class:`DoReMi`             ``reference_losses``, ``domain_ids``     domain weights, average
:class:`RENT`               ``target``, ``probs`` / ``logits``       random generator
:class:`DirichletWeightSampling` ``target``, ``probs`` / ``logits``  random generator
:class:`MixCEWeights`       per-token losses                         none
:class:`BiasLossWeights`    ``features``                             running minimum
:class:`DynamicClassWeights` elementwise ``[..., C]`` multi-label losses running class losses
=========================== ======================================== ===========================

:class:`ForwardCorrection` and :class:`BackwardCorrection` are losses over logits (the registry
losses ``forward_correction`` / ``backward_correction``), re-exported here with
:func:`estimate_transition_matrix`.
"""

from ._base import Strategy
from ._bias import BiasLossWeights, bias_loss_weights
from ._long_tail import ClassBalanced, LogitAdjustment
from ._mixce import MixCEWeights
from ._multilabel import DynamicClassWeights
from ._noisy_labels import (
    RENT,
    BackwardCorrection,
    DirichletWeightSampling,
    ForwardCorrection,
    estimate_transition_matrix,
)
from ._pretraining import DoReMi, LossReweighting, sequence_losses

__all__ = [
    "Strategy",
    "ClassBalanced",
    "LogitAdjustment",
    "LossReweighting",
    "sequence_losses",
    "DoReMi",
    "ForwardCorrection",
    "BackwardCorrection",
    "estimate_transition_matrix",
    "RENT",
    "DirichletWeightSampling",
    "MixCEWeights",
    "bias_loss_weights",
    "BiasLossWeights",
    "DynamicClassWeights",
]
