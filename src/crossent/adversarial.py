"""The regularised smooth adversarial comp-sum objective (Mao, Mohri and Zhong, ICML 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation as V



def _comp_sum(log_p_y: Tensor, tau: float) -> Tensor:
    """Comp-sum loss from ``log p_y``: ``(1 - p_y**(tau-1)) / (tau-1)``, ``-log p_y`` at ``tau = 1``."""
    if tau == 1.0:
        return -log_p_y
    return -torch.expm1((tau - 1.0) * log_p_y) / (tau - 1.0)


def _margins(logits: Tensor, y: Tensor) -> Tensor:
    """``Delta(x)_k = h(x)_k - h(x)_y`` for every class ``k`` (``[N, C]``, zero at ``y``)."""
    return logits - logits.gather(-1, y[:, None])


def _norm_p(p) -> float:
    if isinstance(p, str):
        p = p.strip().lower()
        if p == "inf":
            return math.inf
        if p == "2":
            return 2.0
    elif not isinstance(p, bool) and isinstance(p, (int, float)) and float(p) in (2.0, math.inf):
        return float(p)
    raise ValueError(f"p must be 'inf' (or float('inf')) or 2, got {p!r}")


def _per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _project(delta: Tensor, epsilon: float, p: float) -> Tensor:
    if math.isinf(p):
        return delta.clamp(-epsilon, epsilon)
    norm = torch.linalg.vector_norm(_per_sample(delta), dim=-1).clamp_min(1e-12)
    factor = (epsilon / norm).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def margin_pgd(
    model,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    p="inf",
    init_std: float = 1e-3,
    clip: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Approximately solve :math:`\max_{\lVert x' - x \rVert_p \le \epsilon} \lVert \Delta(x') - \Delta(x) \rVert_2` by PGD.

    Starts from ``x + init_std * N(0, 1)`` (the objective has a zero gradient at ``x' = x``), then
    takes ``steps`` ascent steps on the squared norm (same direction as on the norm): a sign step of
    size ``step_size`` for ``p = inf``, a step along the per-sample normalised gradient for ``p = 2``,
    each followed by projection onto the ball and, if given, clamping to ``clip = (low, high)``.
    Returns the detached ``x'``. The model's parameters receive no gradient.
    """
    p = _norm_p(p)
    x = x.detach()
    with torch.no_grad():
        target = _margins(model(x), y)
        device = x.device if generator is None else generator.device
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
        x_adv = x + _project(init_std * noise, epsilon, p)
        if clip is not None:
            x_adv = x_adv.clamp(*clip)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            gap = (_margins(model(x_adv), y) - target).pow(2).sum()
            (grad,) = torch.autograd.grad(gap, [x_adv])
        with torch.no_grad():
            if math.isinf(p):
                step = grad.sign()
            else:
                g = _per_sample(grad)
                step = (g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-12)).view_as(grad)
            x_adv = x + _project(x_adv + step_size * step - x, epsilon, p)
            if clip is not None:
                x_adv = x_adv.clamp(*clip)
    return x_adv.detach()


def smooth_adversarial_comp_sum(
    model,
    x: Tensor,
    y: Tensor,
    *,
    tau: float,
    rho: float,
    nu: float,
    epsilon: float,
    step_size: float,
    steps: int,
    p="inf",
    init_std: float = 1e-3,
    clip: tuple[float, float] | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Regularised smooth adversarial comp-sum objective, with its inner supremum solved by PGD.

    For a model :math:`h` (``model(x)`` returns logits ``[N, C]``), :math:`\Delta(x)` the vector of
    logit margins :math:`(h(x)_k - h(x)_y)_{k=1..C}` and :math:`L_\tau` the comp-sum loss
    (:math:`L_\tau = (1 - p_y^{\tau-1})/(\tau-1)`, :math:`L_1 = -\log p_y`; :math:`\tau = 0` sum-exp,
    1 cross-entropy, :math:`\tau \in (1,2)` GCE, 2 MAE):

    .. math::

        \ell(x, y) = L_\tau\big(h(x)/\rho,\ y\big)
            + \nu \sup_{\lVert x' - x \rVert_p \le \epsilon} \lVert \Delta(x') - \Delta(x) \rVert_2

    The supremum is replaced by its value at the PGD point :math:`x'` of :func:`margin_pgd`
    (detached, TRADES-style); the gradient then flows into the model through :math:`h(x)` and
    :math:`h(x')`. Add weight decay in the optimiser for the paper's regularised objective.

    **What is and is not confirmed.** Confirmed from the paper's abstract (arXiv 2304.07288): the
    family of smooth adversarial comp-sum losses adds a smooth term to a comp-sum loss, and the
    algorithms minimise a regularised smooth adversarial comp-sum loss. Not confirmed (the paper's
    adversarial section and any official code could not be read): the exact multi-class form above
    (reconstructed from the same authors' binary smooth adversarial losses), where :math:`\rho`
    enters, the norm of the margin difference, the PGD settings, and every default. Hence ``tau``,
    ``rho``, ``nu`` and the PGD settings are required arguments and none is presented as the paper's.

    Args:
        model: callable ``x -> [N, C]`` logits (its train/eval mode is left as it is; TRADES runs the
            attack in eval mode, which matters with batch norm).
        x: inputs ``[N, ...]``; y: class indices ``[N]``.
        tau: comp-sum parameter :math:`\tau \ge 0`. For :math:`\tau < 1` the loss grows like
            :math:`p_y^{\tau-1}` and overflows for :math:`\log p_y < -88/(1-\tau)` in float32.
        rho: logit scale :math:`\rho > 0`. nu: weight :math:`\nu \ge 0` of the smooth term.
        epsilon: radius :math:`\epsilon` of the perturbation ball. step_size, steps: PGD settings.
        p: ``"inf"`` or ``2``, the perturbation norm. init_std: std of the random start.
        clip: ``(low, high)`` valid input range (e.g. ``(0.0, 1.0)`` for images), or ``None``.
        reduction: ``"none"`` (``[N]``), ``"mean"`` or ``"sum"``. generator: for the random start.

    Example:
        >>> import torch, crossent as xe
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = xe.losses.smooth_adversarial_comp_sum(
        ...     model, x, y, tau=1.0, rho=1.0, nu=1.0, epsilon=0.1, step_size=0.05, steps=5)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        1.103

    Reference: Mao, Mohri and Zhong, *Cross-Entropy Loss Functions: Theoretical Analysis and
    Applications*, ICML 2023 (arXiv 2304.07288).
    """
    tau = V.non_negative("tau", tau)
    rho = V.positive("rho", rho)
    nu = V.non_negative("nu", nu)
    epsilon = V.non_negative("epsilon", epsilon)
    step_size = V.non_negative("step_size", step_size)
    steps = V.count("steps", steps, minimum=0)
    init_std = V.non_negative("init_std", init_std)
    V.check_reduction(reduction)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be tensors")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"y must hold one class index per input, shape [{x.shape[0]}], got {tuple(y.shape)} {y.dtype}")
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be a (low, high) pair with low < high, got {clip!r}")
    y = y.long()

    x_adv = margin_pgd(
        model, x, y, epsilon=epsilon, step_size=step_size, steps=steps, p=p,
        init_std=init_std, clip=clip, generator=generator,
    )
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model(x) must return logits of shape [N, C], got {tuple(logits.shape)}")
    log_p_y = torch.log_softmax(logits / rho, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    loss = _comp_sum(log_p_y, tau)
    if nu:
        gap = _margins(model(x_adv), y) - _margins(logits, y)
        loss = loss + nu * torch.linalg.vector_norm(gap, dim=-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


__all__ = ["smooth_adversarial_comp_sum", "margin_pgd"]
