"""``crossent.linear_log_probs``: differentiable per-token log-probabilities, entropies and log-normalisers
of a linear head, without the ``[N, V]`` logit matrix.

RL and preference objectives (policy gradients, PPO/GRPO ratios, DPO) read per-token quantities of the
sampling distribution and combine them freely. Each is a linear function of per-row statistics whose
logit gradient a :class:`~crossent._engine.plan.Plan` already knows:

    log p_y = z_y - lse        H = lse - sum_j p_j z_j        lse = log sum_j exp(z_j)

(``z`` the transformed logits: capped, then divided by the temperature). The forward pass is one
values-only sweep of the fused engine reporting ``lse`` and ``sum_j p_j z_j``; the backward pass runs
the engine once more on the row formula ``sum_i a_i log p_i + b_i H_i + c_i lse_i``, whose per-row
coefficients are the incoming gradients (carried to the formula as per-row extras), in the engine's
eager-gradient mode: the plan's factors turn them into the gradients of ``e``, ``c`` and ``bias``
chunk by chunk, as they do for any loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validation as V
from ._dtensor import is_dtensor, local_arguments
from ._engine.plan import refuse_second_order
from ._linear_call import engine_call, linear_call, linear_inputs, resolve_options, shifted
from .losses import Loss
from .stats import ACC, LSE, P_DOT_Z, TARGET

__all__ = ["TokenLogProbs", "linear_log_probs"]

_WHO = "linear_log_probs"
#: The per-row coefficients of the backward formula, as ``extra`` keys (one per output).
_COEF = ("__coef_logp__", "__coef_entropy__", "__coef_lse__")


class TokenLogProbs(NamedTuple):
    """Per-token outputs of :func:`linear_log_probs`, each shaped like the (shifted) target.

    ``logp``: ``log softmax(z)[target]``; ``entropy``: ``-sum_j p_j log p_j``; ``lse``:
    ``logsumexp(z)``, of the transformed logits ``z``. A field that was not asked for is ``None``.
    """

    logp: Tensor
    entropy: Tensor | None
    lse: Tensor | None


class _TokenObjective(Loss):
    """``a_i log p_{i,y_i} + b_i H_i + c_i lse_i`` per row: the backward formula of :func:`linear_log_probs`.

    The coefficients ``a``, ``b``, ``c`` come from ``rows.extra`` (the incoming gradients). The formula is
    linear in the statistics, so its coefficients ``dL/dS`` are exact whatever anchor the values take.
    """

    def __init__(self, entropy: bool, lse: bool):
        self.entropy, self.lse = entropy, lse
        # log p_y and H do not move when a constant is added to a row; lse does.
        self.shift_invariant = not lse

    def statistics(self, rows):
        return (LSE, TARGET, P_DOT_Z) if self.entropy else (LSE, TARGET)

    def row_loss(self, s, rows):
        coef = rows.extra
        out = coef[_COEF[0]] * (s[TARGET] - s[LSE])
        if self.entropy:
            out = out + coef[_COEF[1]] * (s[LSE] - s[P_DOT_Z])
        if self.lse:
            out = out + coef[_COEF[2]] * s[LSE]
        return out


class _Head(NamedTuple):
    """What runs the engine for one call: the checked call, and the rank's vocabulary shard (or ``None``)."""

    call: object
    shard: object
    layout_error: Exception | None


def _run(head: _Head, e: Tensor, c: Tensor, bias, target: Tensor, loss, reduction: str, stats=(), extra=None):
    """``(value, stats)`` of one engine sweep over the rows ``e`` ``[N, D]`` with the already shifted
    ``target`` ``[N]``, in float64; ``stats`` names the reported statistics (``LinearCall.stats``)."""
    call = dataclasses.replace(head.call, loss=loss, reduction=reduction, stats=stats)
    if head.shard is None:
        return engine_call(e, c, bias, target, None, extra, None, None, call.build_loss(), call)
    from .distributed import sharded_linear_cross_entropy

    return sharded_linear_cross_entropy(
        _WHO, e, c, target, vocab_start=head.shard.vocab_start, vocab_size=head.shard.vocab_size,
        group=head.shard.group, bias_shard=bias, loss=loss, weight=None, ignore_index=call.ignore_index,
        reduction=reduction, label_smoothing=0.0, z_loss=0.0, softcap=call.softcap, temperature=call.temperature,
        shift=False, backend=call.options.backend, chunk_size=call.options.chunk_size, return_stats=call.stats or False,
        extra=extra, accum_dtype=None, options=None, layout_error=head.layout_error, finished=False,
    )  # fmt: skip


class _LogProbs(torch.autograd.Function):
    """``(logp, entropy, lse)`` per row (``[N]``, float64; unasked ones empty); backward: one engine sweep."""

    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias, target: Tensor, head: _Head, want_entropy: bool, want_lse: bool):
        with torch.no_grad():
            neg_logp, stats = _run(head, e, c, bias, target, "ce", "none", head.call.stats)
        counted = target != head.call.ignore_index
        zero = torch.zeros((), dtype=ACC, device=e.device)
        logp = torch.where(counted, -neg_logp, zero)
        entropy = torch.where(counted, stats[LSE] - stats[P_DOT_Z], zero) if want_entropy else logp.new_empty(0)
        lse = torch.where(counted, stats[LSE], zero) if want_lse else logp.new_empty(0)
        ctx.save_for_backward(e, c, bias, target)
        ctx.head, ctx.want = head, (want_entropy, want_lse)
        # An output that reaches no loss gets ``None``, not zeros: its term leaves the backward formula
        # (an entropy logged only keeps the fused kernel of log p's gradient).
        ctx.set_materialize_grads(False)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_lse):
        refuse_second_order(
            _WHO, "differentiate crossent.cross_entropy(e @ c.T + bias, ...) of materialised logits instead"
        )
        e, c, bias, target = ctx.saved_tensors
        want_entropy, want_lse = ctx.want
        need = ctx.needs_input_grad[:3]
        coefs = [g_logp, g_entropy if want_entropy else None, g_lse if want_lse else None]
        if not any(need) or all(g is None for g in coefs):
            return (None,) * 7
        counted = target != ctx.head.call.ignore_index
        zero = torch.zeros(e.shape[0], dtype=ACC, device=e.device)
        extra = {k: zero if g is None else torch.where(counted, g.to(ACC), zero) for k, g in zip(_COEF, coefs)}
        objective = _TokenObjective(coefs[1] is not None, coefs[2] is not None)
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((e, c, bias), need)]
        with torch.enable_grad():
            value, _ = _run(ctx.head, leaves[0], leaves[1], leaves[2], target, objective, "sum", extra=extra)
            wanted = [t for t, n in zip(leaves, need) if n]
            found = iter(torch.autograd.grad(value, wanted))
        return (*(next(found) if n else None for n in need), None, None, None, None)


@torch._disable_dynamo  # lazy: torch.compile runs this call eagerly (a graph break), importing nothing now
def linear_log_probs(
    e: Tensor,
    c: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    entropy: bool = False,
    lse: bool = False,
    ignore_index: int = -100,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> TokenLogProbs:
    r"""Per-token log-probabilities (and entropies, log-normalisers) of ``e @ c.T + bias``, differentiable,
    without materialising the logits.

    With ``z = softcap(e @ c.T + bias) / temperature`` (the temperature applied last, as samplers do) and
    ``p = softmax(z)`` over the vocabulary, per row ``i``:

    .. math::

        \text{logp}_i = z_{i,y_i} - \text{lse}_i, \qquad
        H_i = -\sum_j p_{ij} \log p_{ij} = \text{lse}_i - \sum_j p_{ij} z_{ij}, \qquad
        \text{lse}_i = \log \sum_j e^{z_{ij}}.

    Every output is differentiable with respect to ``e``, ``c`` and ``bias`` and may be combined freely
    (``-(advantage * logp).sum() - 0.01 * entropy.mean()``, a PPO ratio ``(logp - old_logp).exp()``,
    DPO's sequence sums). The forward pass is one sweep of the fused engine; the backward pass one more,
    with the incoming gradients as per-row coefficients of ``d logp / dz = onehot - p``,
    ``dH / dz = -p (log p + H)`` and ``d lse / dz = p`` (each divided by the temperature): at most one
    ``[chunk_size, V]`` block of logits is alive. Second derivatives are refused by name.

    Args:
        e: hidden states ``[..., D]``; float32, bfloat16, float16 or float64.
        c: classifier ``[V, D]`` (``lm_head.weight``), same dtype; a DTensor split by vocabulary rows
            (``Shard(0)``) runs the vocabulary-parallel engine, as in :func:`crossent.linear_cross_entropy`.
        target: token ids ``[...]`` (``e`` without its last dim).
        bias: optional ``[V]``.
        temperature: the (capped) logits are divided by it.
        softcap: ``softcap * tanh(z / softcap)`` before the temperature (``None``: none).
        entropy, lse: also return the entropy / the log-sum-exp per token.
        ignore_index: target value whose rows give 0 in every output and no gradient.
        shift: the causal-LM shift of :func:`crossent.linear_cross_entropy`: position ``t`` scores
            ``target[..., t + 1]``, and the outputs have shape ``target[..., 1:]``.
        backend, chunk_size: the engine and its rows per chunk, as in :func:`crossent.linear_cross_entropy`.

    Returns:
        :class:`TokenLogProbs` ``(logp, entropy, lse)``, each shaped like ``target`` (``target[..., 1:]``
        with ``shift``); float32 for float32 and half-precision inputs, float64 for float64; fields not
        asked for are ``None``.

    Example:
        >>> import torch, crossent as xe
        >>> e = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], requires_grad=True)
        >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
        >>> target = torch.tensor([0, 2, -100])
        >>> out = xe.linear_log_probs(e, c, target, temperature=2.0, entropy=True)
        >>> out.logp
        tensor([-0.6803, -1.6099,  0.0000], grad_fn=<ToCopyBackward0>)
        >>> torch.log_softmax(e @ c.T / 2.0, -1)[[0, 1], [0, 2]]
        tensor([-0.6803, -1.6099], grad_fn=<IndexBackward0>)
        >>> out.entropy
        tensor([1.0202, 1.0023, 0.0000], grad_fn=<ToCopyBackward0>)
        >>> (torch.tensor([1.0, -0.5, 3.0]) * out.logp).sum().backward()
        >>> e.grad                                         # the ignored row gets no gradient
        tensor([[ 0.3399, -0.2468],
                [ 0.3359, -0.1359],
                [ 0.0000,  0.0000]])
    """
    layout_error = shard = None
    if is_dtensor(c) or is_dtensor(e):
        e, c, target, bias, _, shard, layout_error = local_arguments(e, c, target, bias)
    call = linear_call(
        e, c, target, bias, loss="ce", label_smoothing=0.0, z_loss=0.0, softcap=softcap, reduction="none",
        ignore_index=ignore_index, shift=shift, return_stats=("lse", "entropy") if entropy else ("lse",),
        options=resolve_options(None, backend=backend, chunk_size=chunk_size), temperature=temperature,
        allow_no_classes=shard is not None,
    )  # fmt: skip
    target = V.index_target(target, "integer class indices")
    e, c, bias, out_dtype = linear_inputs(e, c, bias)
    rows_shape = tuple(target.shape)
    if call.shift:  # shifted once here, so that both sweeps and the coefficients share the rows
        target, _ = shifted(target, call.ignore_index, None)
        call = dataclasses.replace(call, shift=False)
    flat = e.reshape(math.prod(rows_shape), e.shape[-1])
    head = _Head(call, shard, layout_error)
    logp, ent, log_z = _LogProbs.apply(flat, c, bias, target.reshape(-1), head, bool(entropy), bool(lse))

    def per_row(t: Tensor) -> Tensor:
        t = t.reshape(rows_shape)
        return (t[..., :-1] if shift else t).to(out_dtype)

    return TokenLogProbs(per_row(logp), per_row(ent) if entropy else None, per_row(log_z) if lse else None)
