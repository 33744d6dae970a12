"""Language-model pretraining: loss-based sample reweighting (Sow et al.) and DoReMi domain weights."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dist
from .._rows import compute_dtype
from ._base import (
    Strategy,
    check_index_tensor,
    check_losses,
    check_mask,
    check_same_shape,
    check_step_count,
    check_vector,
)

STRATEGIES = ("linupper", "quadratic", "extremes", "upper", "uniform")
#: the official code's names for the same functions.
ALIASES = {"mid": "quadratic"}


def sequence_losses(token_losses: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence token-mean losses ``[B]`` and token counts ``[B]`` from ``[B, T]`` token losses.

    A sequence with no counted token gets loss 0 (the official code divides by zero there).

    Example:
        >>> import torch
        >>> from crossent.weighting import sequence_losses
        >>> sequence_losses(torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]]),
        ...                 torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
        (tensor([2., 2.]), tensor([2, 1]))
    """
    token_losses = check_losses(token_losses, "sequence_losses", dim=2)
    mask = check_mask(mask, token_losses, "sequence_losses")
    count = mask.sum(1)
    total = torch.where(mask, token_losses, torch.zeros_like(token_losses)).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)), count


class LossReweighting(Strategy):
    r"""Loss-based sample reweighting for LLM pretraining (Sow et al., ICLR 2025).

    Per-sequence losses ``l_i`` (token means) of the *global* batch (all-gathered over the process
    group when ``torch.distributed`` is initialised; detached) are normalised to ``[-d, d]``,

    .. math::

        h_i = d\,\frac{2 l_i - l_{\max} - l_{\min}}{\max(l_{\max} - l_{\min}, 10^{-6})},

    mapped by the strategy ``f`` and turned into weights by a softmax with temperature ``r``:
    ``w_i = exp((f_i - max_j f_j) / r) / sum_j exp((f_j - max_j f_j) / r)``.

    ========== ============================ ==========================================
    strategy   ``f(h)``                     effect
    ========== ============================ ==========================================
    linupper   ``min(h + d, d)``            down-weights low-loss sequences
    quadratic  ``1 - h^2 / d^2``            favours medium losses (code name ``mid``)
    extremes   ``|h|``                      favours both ends
    upper      ``h / 2 + d / 2``            code-only variant, favours high losses
    uniform    no reweighting
    ========== ============================ ==========================================

    :meth:`weights` returns ``N w_i`` for this rank's rows (``N`` = global batch size), so uniform
    weights are 1. The loss is the official code's
    ``sum_i (N w_i) * n_i / (sum_local n) * l_i`` with ``n_i`` the token counts (``num_tokens=``;
    without them every sequence counts equally, ``n_i / sum n = 1 / B``): uniform weights give back
    the plain token mean of this rank's batch, which data-parallel training then averages.

    For the first ``warmup_steps`` calls (the code's ``burnout_steps``) the weights are uniform.
    Each ``__call__`` counts one step; with gradient accumulation pass ``auto_step=False`` and call
    :meth:`step` once per optimiser step, as the official trainer counts ``global_step``.
    Weights are computed in float32 (float64 stays float64).

    Args:
        strategy: one of ``"linupper"``, ``"quadratic"`` (``"mid"``), ``"extremes"``, ``"upper"``,
            ``"uniform"``.
        r: softmax temperature (the code's ``kl_reg``). Default ``1.0`` (``0.4`` for larger models).
        d: half-width of the normalised range. Default ``1.0`` (fixed in the official code).
        warmup_steps: steps without reweighting. Default ``1000``.
        auto_step: count a step on every ``__call__``. Default ``True``.
        distributed: all-gather the losses; ``None`` (default) does so when a process group is
            initialised. ``group``: the process group (default: the world).

    Inputs: ``losses`` ``[B]`` per-sequence losses of this rank (see :func:`sequence_losses`),
    optional ``num_tokens=`` ``[B]`` (used by the loss only). Ranks may hold different batch sizes.
    Under ``torch.distributed``, :meth:`weights` and ``__call__`` are collective: every rank of the
    group must call them, in the same order.

    Example:
        >>> import torch
        >>> from crossent.weighting import LossReweighting
        >>> rw = LossReweighting("quadratic", r=1.0, warmup_steps=0)
        >>> losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> rw.weights(losses)
        tensor([0.5827, 1.4173, 1.4173, 0.5827])
        >>> rw(losses), rw.num_steps
        (tensor(2.5000), 1)

    Reference: Sow et al., *Dynamic Loss-Based Sample Reweighting for Improved Large Language Model
    Pretraining*, ICLR 2025 (official code: ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``,
    ``src/trainer.py``).
    """

    def __init__(
        self,
        strategy: str = "linupper",
        r: float = 1.0,
        d: float = 1.0,
        warmup_steps: int = 1000,
        *,
        auto_step: bool = True,
        distributed: bool | None = None,
        group=None,
    ):
        if not isinstance(strategy, str):
            raise TypeError(f"LossReweighting: strategy must be a string, got {type(strategy).__name__}")
        name = ALIASES.get(strategy, strategy)
        if name not in STRATEGIES:
            raise ValueError(
                f"LossReweighting: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} (or 'mid')"
            )
        if not float(r) > 0:
            raise ValueError(f"LossReweighting: r (softmax temperature) must be > 0, got {r}")
        if not float(d) > 0:
            raise ValueError(f"LossReweighting: d must be > 0, got {d}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"LossReweighting: warmup_steps must be a non-negative integer, got {warmup_steps}")
        self.strategy = name
        self.r = float(r)
        self.d = float(d)
        self.warmup_steps = int(warmup_steps)
        self.auto_step = bool(auto_step)
        self.distributed = distributed
        self.group = group
        self.num_steps = 0

    # -- the formula --------------------------------------------------------------------------------
    def _f(self, h: Tensor) -> Tensor:
        d = self.d
        if self.strategy == "linupper":
            return torch.minimum(h + d, torch.full_like(h, d))
        if self.strategy == "quadratic":
            return 1 - h * h / (d * d)
        if self.strategy == "extremes":
            return h.abs()
        return 0.5 * h + 0.5 * d  # upper

    def global_weights(self, all_losses: Tensor) -> Tensor:
        """Softmax weights ``w`` (summing to 1) of a whole global batch of per-sequence losses."""
        l = all_losses.detach().to(compute_dtype(all_losses.dtype))
        if self.strategy == "uniform" or self.num_steps < self.warmup_steps:
            return torch.full_like(l, 1.0 / l.numel())
        lmin, lmax = l.min(), l.max()
        h = self.d * (2 * l - lmax - lmin) / torch.clamp(lmax - lmin, min=1e-6)
        f = self._f(h)
        return torch.softmax((f - f.max()) / self.r, dim=0)

    def weights(self, losses: Tensor, *, num_tokens: Tensor | None = None) -> Tensor:
        losses = check_losses(losses, "LossReweighting", dim=1)
        if losses.numel() == 0:
            raise ValueError("LossReweighting: losses must hold at least one sequence")
        if _dist.active(self.group, self.distributed):
            local = losses.detach().to(compute_dtype(losses.dtype))
            everything, start, total = _dist.all_gather_rows(local, self.group)
            w = self.global_weights(everything)[start : start + losses.numel()]
            return w * total
        return self.global_weights(losses) * losses.numel()

    def __call__(self, losses: Tensor, *, num_tokens: Tensor | None = None) -> Tensor:
        w = self.weights(losses, num_tokens=num_tokens)
        if num_tokens is None:
            share = torch.full_like(w, 1.0 / losses.numel())
        else:
            num_tokens = check_same_shape("num_tokens", num_tokens, losses, "LossReweighting").to(w.dtype)
            if (num_tokens < 0).any() or num_tokens.sum() <= 0:
                raise ValueError("LossReweighting: num_tokens must be non-negative with a positive sum")
            share = num_tokens / num_tokens.sum()
        out = (w * share * losses.to(w.dtype)).sum().to(losses.dtype)
        if self.auto_step:
            self.step()
        return out

    def step(self) -> None:
        """Count one training step (for the warm-up)."""
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = check_step_count(state, "num_steps", "LossReweighting", minimum=0)

    def _repr_args(self):
        return {"strategy": self.strategy, "r": self.r, "d": self.d, "warmup_steps": self.warmup_steps}


class DoReMi(Strategy):
    r"""DoReMi domain reweighting (Xie et al., NeurIPS 2023), the ``doremiv1`` update of the official code.

    Each step, with per-token losses of the proxy model ``l`` and of the reference model ``l_ref``:

    1. per-domain excess loss ``lambda_k`` = mean over the step's counted tokens of domain ``k`` of
       ``max(l - l_ref, 0)`` (clipped per token, then averaged); a domain with no token in the step
       keeps its previous score;
    2. ``alpha' = softmax(log alpha + eta * lambda)`` (in log space);
    3. ``alpha = (1 - c) alpha' + c / K`` (smoothing ``c``);
    4. the running average of ``alpha`` is updated; it is DoReMi's output (:attr:`average_weights`).

    The training loss of the step uses the *updated* weights divided by the sampling weights and
    renormalised, ``u_k = (alpha_k / s_k) / sum_j (alpha_j / s_j)``: each token gets ``u`` of its
    domain (:meth:`weights`, zero on masked tokens) and the loss is ``sum_t u_t l_t / sum_t u_t``
    (under ``torch.distributed`` the denominator is the global sum divided by the world size, as
    data-parallel training averages the gradients).

    Quirks of the official code, reproduced: the running average starts from the initial weights
    with a counter at 1, so after ``t`` updates it is ``(alpha_0 + alpha_1 + ... + alpha_t) / (t + 1)``;
    scores start at ``log(vocabulary size)`` there (pass ``initial_score=math.log(V)`` for that; the
    default here is 0), which only matters for a domain absent from the first steps. Deviation: a
    domain whose sequences are all masked keeps its score (the official mean over zero tokens is NaN).
    State is kept in float64.

    Args:
        num_domains: ``K``.
        eta: step size of the exponentiated-gradient update (``--reweight_eta``). Default ``1.0``.
        smoothing: ``c`` (``--reweight_eps``). Default ``1e-3`` (the official run script; the
            argument's own default is ``1e-4``).
        initial_weights: ``[K]`` starting domain weights (normalised); default uniform.
        sampling_weights: ``[K]`` weights the data were sampled with; default uniform.
        initial_score: starting per-domain score. Default ``0.0``.
        distributed: all-reduce the per-domain sums and the loss normaliser; ``None`` (default) does
            so when a process group is initialised. ``group``: the process group.

    Inputs: ``losses`` per-token proxy losses (any shape, e.g. ``[B, T]``), ``reference_losses=`` of
    the same shape, ``domain_ids=`` of the same shape or ``[B]`` (one domain per sequence), optional
    ``mask=`` (bool, shape of ``losses``). Under ``torch.distributed``, ``__call__``, :meth:`update`
    and :meth:`weights` with ``reference_losses`` are collective: every rank must call them.

    Example:
        >>> import torch
        >>> from crossent.weighting import DoReMi
        >>> doremi = DoReMi(num_domains=2, eta=1.0, smoothing=0.0)
        >>> proxy = torch.tensor([[3.0, 2.0], [1.0, 1.0]])
        >>> reference = torch.tensor([[2.0, 1.0], [1.5, 0.5]])
        >>> loss = doremi(proxy, reference_losses=reference, domain_ids=torch.tensor([0, 1]))
        >>> doremi.domain_weights
        tensor([0.6792, 0.3208], dtype=torch.float64)
        >>> doremi.average_weights
        tensor([0.5896, 0.4104], dtype=torch.float64)
        >>> loss
        tensor(2.0188)

    Reference: Xie et al., *DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining*,
    NeurIPS 2023 (official code: ``sangmichaelxie/doremi``, ``doremi/trainer.py``).
    """

    def __init__(
        self,
        num_domains: int,
        eta: float = 1.0,
        smoothing: float = 1e-3,
        *,
        initial_weights=None,
        sampling_weights=None,
        initial_score: float = 0.0,
        distributed: bool | None = None,
        group=None,
    ):
        if int(num_domains) != num_domains or num_domains < 1:
            raise ValueError(f"DoReMi: num_domains must be a positive integer, got {num_domains}")
        k = int(num_domains)
        if not float(eta) > 0:
            raise ValueError(f"DoReMi: eta must be > 0, got {eta}")
        if not 0.0 <= float(smoothing) <= 1.0:
            raise ValueError(f"DoReMi: smoothing must be in [0, 1], got {smoothing}")
        self.num_domains = k
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
        if initial_weights is not None:
            alpha = check_vector(initial_weights, "initial_weights", "DoReMi", length=k, positive=True)
            alpha = alpha / alpha.sum()
        self.sampling_weights = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if sampling_weights is None
            else check_vector(sampling_weights, "sampling_weights", "DoReMi", length=k, positive=True)
        )
        self.distributed = distributed
        self.group = group
        self._alpha = alpha
        self._average = alpha.clone()
        self._scores = torch.full((k,), float(initial_score), dtype=torch.float64)
        self._counter = 1

    # -- state ------------------------------------------------------------------------------------
    @property
    def domain_weights(self) -> Tensor:
        """Current domain weights ``alpha_t`` (float64, sum to 1)."""
        return self._alpha.clone()

    @property
    def average_weights(self) -> Tensor:
        """Running average of the domain weights: DoReMi's result."""
        return self._average.clone()

    @property
    def scores(self) -> Tensor:
        """Last per-domain excess-loss scores ``lambda``."""
        return self._scores.clone()

    def state_dict(self) -> dict:
        return {
            "domain_weights": self._alpha.clone(),
            "average_weights": self._average.clone(),
            "scores": self._scores.clone(),
            "counter": self._counter,
        }

    def load_state_dict(self, state: dict) -> None:
        who, k = "DoReMi.load_state_dict", self.num_domains
        alpha = check_vector(state["domain_weights"], "domain_weights", who, length=k, positive=True)
        average = check_vector(state["average_weights"], "average_weights", who, length=k, positive=True)
        scores = state["scores"]
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (k,):
            raise ValueError(f"{who}: scores must be a tensor of {k} entries")
        scores = scores.detach().to(torch.float64)
        if not torch.isfinite(scores).all():
            raise ValueError(f"{who}: scores must be finite")
        counter = check_step_count(state, "counter", who, minimum=1)
        self._alpha, self._average, self._scores = alpha.cpu().clone(), average.cpu().clone(), scores.cpu().clone()
        self._counter = counter

    # -- the update -------------------------------------------------------------------------------
    def _inputs(self, losses, domain_ids, mask, reference_losses=None):
        losses = check_losses(losses, "DoReMi")
        if reference_losses is not None:
            reference_losses = check_same_shape("reference_losses", reference_losses, losses, "DoReMi")
        domain_ids = check_index_tensor(domain_ids, "domain_ids", "DoReMi")
        if domain_ids.shape != losses.shape:
            lead = tuple(losses.shape[: domain_ids.dim()])
            if domain_ids.dim() > losses.dim() or lead != tuple(domain_ids.shape):
                raise ValueError(
                    f"DoReMi: domain_ids must have the shape of losses {tuple(losses.shape)} or a leading part "
                    f"of it (one domain per sequence), got {tuple(domain_ids.shape)}"
                )
            trailing = (1,) * (losses.dim() - domain_ids.dim())
            domain_ids = domain_ids.reshape(domain_ids.shape + trailing).expand_as(losses)
        if ((domain_ids < 0) | (domain_ids >= self.num_domains)).any():
            bad = int(domain_ids[(domain_ids < 0) | (domain_ids >= self.num_domains)][0])
            raise ValueError(f"DoReMi: domain id {bad} is outside [0, {self.num_domains})")
        mask = check_mask(mask, losses, "DoReMi")
        return losses, reference_losses, domain_ids.long(), mask

    def _updated(self, losses, reference_losses, domain_ids, mask):
        """``(alpha, average, scores)`` after one update, without storing them."""
        if reference_losses is None:
            raise ValueError("DoReMi: reference_losses= (per-token losses of the reference model) is required")
        dtype = torch.float64 if losses.device.type == "cpu" else torch.float32
        excess = (losses.detach().to(dtype) - reference_losses.detach().to(dtype)).clamp_min(0)
        excess = torch.where(mask, excess, torch.zeros_like(excess))
        ids = domain_ids.reshape(-1)
        sums = torch.zeros(self.num_domains, dtype=dtype, device=losses.device).index_add_(0, ids, excess.reshape(-1))
        counts = torch.zeros(self.num_domains, dtype=dtype, device=losses.device).index_add_(
            0, ids, mask.reshape(-1).to(dtype)
        )
        if _dist.active(self.group, self.distributed):
            both = _dist.all_reduce_sum(torch.stack([sums, counts]), self.group)
            sums, counts = both[0], both[1]
        sums, counts = sums.double().cpu(), counts.double().cpu()
        scores = torch.where(counts > 0, sums / counts.clamp_min(1), self._scores)
        log_alpha = torch.log(self._alpha) + self.eta * scores
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0)
        alpha = (1 - self.smoothing) * torch.exp(log_alpha) + self.smoothing / self.num_domains
        counter = self._counter + 1
        average = (self._average * (counter - 1) + alpha) / counter
        return alpha, average, scores

    def update(
        self, losses: Tensor, *, reference_losses: Tensor, domain_ids: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Apply one update of the domain weights and return them."""
        losses, reference_losses, domain_ids, mask = self._inputs(losses, domain_ids, mask, reference_losses)
        self._alpha, self._average, self._scores = self._updated(losses, reference_losses, domain_ids, mask)
        self._counter += 1
        return self.domain_weights

    def _token_weights(self, alpha: Tensor, losses: Tensor, domain_ids: Tensor, mask: Tensor) -> Tensor:
        u = alpha / self.sampling_weights
        u = (u / u.sum()).to(device=losses.device, dtype=compute_dtype(losses.dtype))
        return torch.where(mask, u[domain_ids], torch.zeros((), dtype=u.dtype, device=u.device))

    def weights(
        self,
        losses: Tensor,
        *,
        domain_ids: Tensor,
        reference_losses: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Per-token weights ``u`` that ``__call__`` would use: after this step's update when
        ``reference_losses`` is given, from the current domain weights otherwise."""
        losses, reference_losses, domain_ids, mask = self._inputs(losses, domain_ids, mask, reference_losses)
        alpha = self._alpha
        if reference_losses is not None:
            alpha = self._updated(losses, reference_losses, domain_ids, mask)[0]
        return self._token_weights(alpha, losses, domain_ids, mask)

    def __call__(
        self, losses: Tensor, *, reference_losses: Tensor, domain_ids: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        losses, reference_losses, domain_ids, mask = self._inputs(losses, domain_ids, mask, reference_losses)
        self._alpha, self._average, self._scores = self._updated(losses, reference_losses, domain_ids, mask)
        self._counter += 1
        u = self._token_weights(self._alpha, losses, domain_ids, mask)
        normaliser = u.sum()
        if _dist.active(self.group, self.distributed):
            normaliser = _dist.all_reduce_sum(normaliser, self.group) / _dist.world_size(self.group)
        weighted = torch.where(mask, u * losses.to(u.dtype), torch.zeros((), dtype=u.dtype, device=u.device))
        return (weighted.sum() / normaliser.clamp_min(1e-10)).to(losses.dtype)

    def _repr_args(self):
        return {"num_domains": self.num_domains, "eta": self.eta, "smoothing": self.smoothing}
