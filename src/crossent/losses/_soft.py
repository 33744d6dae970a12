"""Cross-entropy against a class-probability target (HL-Gauss, two-hot, distillation targets)."""

from __future__ import annotations

from ._base import CompositeLoss, register
from ._basic import CrossEntropy


@register("soft_target_ce")
class SoftTargetCrossEntropy(CompositeLoss):
    r"""Cross-entropy against a target distribution :math:`q` given per row.

    .. math::

        \ell = -\sum_k w_k q_k \log p_k = \Big(\sum_k w_k q_k\Big)\,\mathrm{lse} - \sum_k w_k q_k z_k

    with class weights :math:`w` (all ones by default), exactly as ``torch.nn.functional.cross_entropy``
    with a probability target; ``reduction="mean"`` divides by the number of rows. :math:`q` is used as
    given (it is not renormalised). The target builders for HL-Gauss and two-hot regression and
    distillation from a teacher's probabilities produce such :math:`q`. A class-index target is also
    accepted and means the one-hot :math:`q` (ordinary CE).

    Statistics: ``lse``, ``soft_dot(q)``. Streams on every engine. A target that requires a gradient
    (e.g. a teacher trained jointly) gets one. It is :class:`CrossEntropy` without smoothing under its
    own name, and delegates to it (:class:`~crossent.losses.CompositeLoss`).

    Example:
        >>> import torch, crossent as xe
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        >>> q = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
        >>> xe.cross_entropy(logits, q, loss=xe.losses.SoftTargetCrossEntropy(), reduction="none")
        tensor([0.8413, 1.0519])

    Reference: Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*, 2015 (soft
    targets); Farebrother et al., *Stop Regressing: Training Value Functions via Classification for
    Scalable Deep RL*, ICML 2024 (HL-Gauss).
    """

    # Its one part, plain cross-entropy, streams; said here too, so tables read it off the class.
    streamable = True

    def __init__(self):
        super().__init__(CrossEntropy())
