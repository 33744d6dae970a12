"""crossent.policy: the GRPO-family policy losses against TRL's computation, a float64 reference written
from the papers' formulas, and Liger-Kernel's chunked GRPO loss; values and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import crossent as xe
from crossent.policy import LOSS_TYPES, aggregate, grpo_loss, importance_log_ratio, kl_estimate

B, T = 4, 6


def _batch(seed=0, *, spread=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    entropy = torch.rand(B, T, generator=g, dtype=dtype) * 2
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(T) < lengths[:, None]
    return logp, old, ref, adv, entropy, mask


def _trl_grpo(logp, old, ref, adv, entropy, mask, *, loss_type, eps_low, eps_high, level, beta, delta,
              entropy_coef, max_completion_length, num_items, sapo=(1.0, 1.05)):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py), its loss path line for line
    with the trainer's state as arguments: no vLLM correction, no entropy or off-policy masks, one
    process, no gradient accumulation (``current_gradient_accumulation_steps == 1``,
    ``steps_per_generation == 1``); ``num_items`` is ``inputs["num_items_in_batch"]``. The trainer's
    method needs a model, so its code path is reproduced here rather than called."""
    per_token_logps, old_per_token_logps, ref_per_token_logps = logp, old, ref
    mask = mask.to(logp.dtype)
    advantages = adv.unsqueeze(1) if adv.dim() == 1 else adv
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        # TRL writes torch.where(advantages > 0, t_pos, t_neg), whose Python floats make a float32 tensor
        # (1.05 rounded); the temperatures are kept in the advantages' dtype here
        temperatures = torch.where(advantages > 0, advantages.new_tensor(sapo[0]), advantages.new_tensor(sapo[1]))
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    elif loss_type == "vespo":
        phi_seq = _trl_gamma_weights(advantages, log_ratio, mask)
        per_token_loss = -phi_seq * advantages * per_token_logps
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ["cispo", "dapo", "vespo"]:
        loss = (per_token_loss * mask).sum() / num_items.clamp(min=1.0)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)
    return loss


@torch.no_grad()
def _trl_gamma_weights(advantages, log_ratio_per_token, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """TRL 1.16's ``GRPOTrainer.get_gamma_weights`` (a static method; reproduced so that this file need not
    import the trainer, and called as TRL's own in ``test_vespo_weights_are_trls``), without the vLLM ratio."""
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _paper_grpo(logp, old, ref, adv, entropy, mask, *, loss_type, eps_low, eps_high, level, beta, delta,
                entropy_coef, max_completion_length, num_items, kl_estimator="k3", sapo=(1.0, 1.05)):
    """The objectives written from the papers, sequence by sequence and token by token (float64)."""
    seq_losses, total, count = [], 0.0, 0
    for i in range(B):
        a = adv[i]
        toks = [t for t in range(T) if mask[i, t]]
        n = max(len(toks), 1)
        if level == "sequence":  # GSPO eq. 7: the geometric mean of the token ratios
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / n) if toks else logp.new_tensor(1.0)
        terms = []
        for t in toks:
            r = s if level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            if loss_type == "cispo":
                term = -min(r.detach(), torch.as_tensor(eps_high)) * a * logp[i, t]
            elif loss_type == "sapo":
                tau = sapo[0] if a > 0 else sapo[1]
                term = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
            elif loss_type == "vespo":  # the gamma weight e^lam w^k e^(-lam w) of the sequence's ratio w
                k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
                w = torch.exp(sum(logp[i, u] - old[i, u] for u in toks)).detach()
                term = -(math.exp(lam) * w**k * torch.exp(-lam * w)) * a * logp[i, t]
            elif a >= 0:  # PPO's pessimistic bound: for A > 0 the ratio is capped above at 1 + eps_high,
                term = -a * torch.clamp(r, max=1 + eps_high)
            else:  # for A < 0 below at 1 - eps_low, and above at delta (INTELLECT-2's two-sided clip)
                term = -a * torch.clamp(r, min=1 - eps_low, max=math.inf if delta is None else delta)
            if beta:
                d = ref[i, t] - logp[i, t]
                kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
                term = term + beta * kl
            terms.append(term)
        seq_sum = sum(terms) if terms else logp.new_tensor(0.0)
        seq_losses.append((seq_sum, n))
        total, count = total + seq_sum, count + len(toks)
    if loss_type in ("grpo", "sapo"):
        loss = sum(s / n for s, n in seq_losses) / B
    elif loss_type == "bnpo":
        loss = total / max(count, 1)
    elif loss_type == "dr_grpo":
        loss = total / (B * max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo"):
        loss = total / num_items
    else:
        loss = sum(s for s, _ in seq_losses) / B
    if entropy_coef:
        loss = loss - entropy_coef * sum(entropy[i, t] for i in range(B) for t in range(T) if mask[i, t]) / count
    return loss


CASES = [
    dict(loss_type=lt, level=lv, beta=beta, delta=delta, entropy_coef=ec)
    for lt, lv, beta, delta, ec in itertools.chain(
        ((lt, "token", 0.0, None, 0.0) for lt in LOSS_TYPES),
        ((lt, "token", 0.04, None, 0.01) for lt in LOSS_TYPES),
        ((lt, "sequence", 0.04, None, 0.0) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")),
        (("dapo", "token", 0.0, 1.3, 0.0), ("grpo", "sequence", 0.0, 1.5, 0.0)),
    )
]


def _run(fn, case, spread=0.3, seed=0, **extra):
    logp, old, ref, adv, ent, mask = _batch(seed, spread=spread)
    logp.requires_grad_(True)
    ent.requires_grad_(True)
    eps_high = 3.0 if case["loss_type"] == "cispo" else 0.28  # cispo's eps_high is an absolute cap
    kwargs = dict(eps_low=0.2, eps_high=eps_high, max_completion_length=8, num_items=torch.tensor(17.0), **case)
    loss = fn(logp, old, ref, adv, ent, mask, **{**kwargs, **extra})
    grads = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    return loss.detach(), [torch.zeros_like(logp) if g is None else g for g in grads]


def _ours(logp, old, ref, adv, ent, mask, *, level, **kw):
    return grpo_loss(logp, old, adv, mask, importance_level=level, ref_logp=ref, entropy=ent, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_against_trl_and_paper(case, spread):
    ours = _run(_ours, case, spread)
    for reference in (_trl_grpo, _paper_grpo):
        ref = _run(reference, case, spread)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-12)
        for g, h in zip(ours[1], ref[1]):
            torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # importing TRL's GRPOTrainer takes seconds
def test_vespo_weights_are_trls():
    trainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    logp, old, _, adv, _, mask = _batch(4, spread=0.4)
    m = mask.double()
    theirs = trainer.get_gamma_weights(adv[:, None], logp - old, m, None)
    torch.testing.assert_close(_trl_gamma_weights(adv[:, None], logp - old, m), theirs)


def test_clip_is_active():
    """The test inputs reach both clip bounds and both advantage signs (else the clip tests prove nothing)."""
    logp, old, _, adv, _, mask = _batch(0, spread=0.5)
    r = importance_log_ratio(logp, old).exp()[mask]
    assert (r > 1.28).any() and (r < 0.8).any() and (adv > 0).any() and (adv < 0).any()
    case = dict(loss_type="dapo", level="token", beta=0.0, delta=None, entropy_coef=0.0)
    clipped = _run(_ours, case, 0.5)[1][0]
    unclipped = _run(_ours, case, 0.5, eps_low=0.99, eps_high=9.0)[1][0]  # a clip that never binds
    assert (clipped == 0).sum() > (unclipped == 0).sum()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_against_verl(estimator):
    """verl's ``kl_penalty_forward`` (verl/trainer/ppo/core_algos.py): "k1" = "kl", "k2" = "mse",
    "k3" = "low_var_kl"; verl clamps k3's log-ratio to [-20, 20] and its value to [-10, 10], which
    agrees inside those bounds; outside them TRL's k3 (as here) is not clamped."""
    logp, _, ref, *_ = _batch(1, spread=0.7)
    if estimator == "k1":
        verl = logp - ref
    elif estimator == "k2":
        verl = 0.5 * (logp - ref).square()
    else:
        kl = torch.clamp(ref - logp, min=-20, max=20)
        verl = torch.clamp(kl.exp() - kl - 1, min=-10, max=10)
    torch.testing.assert_close(kl_estimate(logp, ref, estimator), verl)
    if estimator == "k3":
        far = kl_estimate(torch.tensor([-6.0]), torch.tensor([-1.0]), "k3")  # d = 5: e^5 - 6, verl's clamp 10
        torch.testing.assert_close(far, torch.tensor([math.exp(5) - 6]))
    # the expectation of k1 and k3 under pi is KL(pi || q): checked on a small categorical
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    if estimator != "k2":
        torch.testing.assert_close((p * kl_estimate(p.log(), q.log(), estimator)).sum(), exact)


def test_aggregate_normalisations_differ():
    """Each loss_type is a different scalar on ragged sequences (a wrong branch would show)."""
    per_token = torch.arange(1.0, 1 + B * T, dtype=torch.float64).reshape(B, T)
    mask = _batch()[-1]
    values = {lt: aggregate(per_token, mask, lt, max_completion_length=T).item() for lt in LOSS_TYPES}
    assert len({round(v, 9) for k, v in values.items() if k not in ("sapo", "cispo", "dapo")}) == 4
    assert values["dapo"] == values["bnpo"]  # without a global count, dapo normalises by this batch's tokens
    assert math.isclose(aggregate(per_token, mask, "dapo", num_items=40).item(), (per_token * mask).sum() / 40)


def test_on_policy_ratio_is_one():
    """old_logp=None is the on-policy case: the loss is -mean(A) under every clipped type, and the gradient
    is the policy gradient A / normaliser."""
    logp, _, _, adv, _, mask = _batch()
    logp.requires_grad_(True)
    loss = grpo_loss(logp, None, adv, mask, loss_type="bnpo")
    (g,) = torch.autograd.grad(loss, logp)
    m = mask.double()
    torch.testing.assert_close(loss, -(adv[:, None] * m).sum() / m.sum())
    torch.testing.assert_close(g, -(adv[:, None] * m) / m.sum())


def test_half_precision_computes_in_float32():
    logp, old, ref, adv, _, mask = _batch(dtype=torch.float32)
    full = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    half = grpo_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, ref_logp=ref.bfloat16(), beta=0.1)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(beta=0.1), "beta != 0 needs ref_logp"),
        (dict(entropy_coef=0.1), "entropy_coef != 0 needs entropy"),
        (dict(eps_low=-0.1), "eps_low must be in"),
        (dict(delta=1.1, eps_high=0.2), "delta must be in"),
        (dict(importance_level="sequence", loss_type="sapo"), "not defined for loss_type='sapo'"),
        (dict(importance_level="tokens"), "importance_level must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    logp, old, _, adv, _, mask = _batch()
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, old, adv, mask, **kwargs)


def test_bad_shapes_name_the_argument():
    logp, old, _, adv, _, mask = _batch()
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        grpo_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logp, old, adv, mask[:, :2])


# Liger-Kernel's chunked GRPO loss: plain torch (compiled=False here), fused over (e, c); compared with
# the dense composition log_softmax -> gather -> grpo_loss, values and gradients of e and c.
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_against_liger_grpo(loss_type, level):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    if level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        pytest.skip("sequence-level ratios are not defined for cispo / sapo (refused by both)")
    torch.manual_seed(0)
    D, V = 8, 17
    e = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    c = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (B, T))
    mask = _batch()[-1]
    with torch.no_grad():
        logp0 = torch.log_softmax(e @ c.T, -1).gather(-1, target[..., None])[..., 0]
    old = logp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)
    ref = logp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    eps_high = 3.0 if loss_type == "cispo" else 0.28
    liger = chunked.LigerFusedLinearGRPOLoss(
        beta=0.04, compiled=False, chunk_size=2, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
        max_completion_length=T, importance_sampling_level=level,
    )
    out = liger(e, c, target, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
    theirs = out[0] if isinstance(out, tuple) else out
    g_theirs = torch.autograd.grad(theirs, (e, c))

    logp = torch.log_softmax(e @ c.T, -1).gather(-1, target[..., None])[..., 0]
    ours = grpo_loss(logp, old, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=eps_high,
                     importance_level=level, ref_logp=ref, beta=0.04, max_completion_length=T)
    g_ours = torch.autograd.grad(ours, (e, c))
    # Liger forms its logits' softmax in float32 whatever the inputs' dtype: float32 agreement
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


# ---- the fused entry point against the dense composition, on the engines of this tree -------------------

ENGINES = [dict(backend="torch", chunk_size=3), dict(backend="torch", chunk_size=64), dict(backend="triton")]


def _dense_logp_entropy(e, c, target, temperature):
    z = torch.log_softmax((e @ c.T).double() / temperature, -1)
    lp = z.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    ent = -(z.exp() * z).sum(-1)
    return lp, ent


@pytest.mark.parametrize("engine", ENGINES, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="dapo", eps_high=0.28, beta=0.05, entropy_coef=0.01),
        dict(loss_type="grpo", importance_level="sequence", beta=0.02, kl_estimator="k2"),
        dict(loss_type="dr_grpo", max_completion_length=9, temperature=0.8),
        dict(loss_type="cispo", eps_high=2.0, shift=True),
    ],
    ids=lambda d: d["loss_type"],
)
def test_linear_grpo_loss_against_dense(kwargs, engine):
    if engine["backend"] == "triton":
        pytest.importorskip("triton")
    kwargs = dict(kwargs)
    cuda = torch.cuda.is_available() and engine["backend"] == "triton"
    dtype = torch.float32 if engine["backend"] == "triton" else torch.float64
    g = torch.Generator().manual_seed(3)
    D, V = 10, 41
    e = torch.randn(B, T, D, generator=g, dtype=dtype)
    c = torch.randn(V, D, generator=g, dtype=dtype) / math.sqrt(D)
    target = torch.randint(0, V, (B, T), generator=g)
    target[~_batch()[-1]] = -100
    shift, temperature = kwargs.pop("shift", False), kwargs.pop("temperature", 1.0)
    rows = target[:, 1:] if shift else target
    mask = rows != -100
    old = -3 * torch.rand(rows.shape, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(rows.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():  # old and ref near the policy, so that the clip binds on some tokens only
        lp0, _ = _dense_logp_entropy(e[:, :-1] if shift else e, c, rows, temperature)
        old, ref = lp0 + 0.3 * old / 3, lp0 + 0.3 * ref / 3
    device = "cuda" if cuda else "cpu"
    e_, c_ = (t.to(device).requires_grad_() for t in (e, c))
    fused = xe.linear_grpo_loss(
        e_, c_, target.to(device), old.to(device), adv.to(device), ref_logp=ref.to(device), shift=shift,
        temperature=temperature, **kwargs, **engine,
    )  # fmt: skip
    g_fused = torch.autograd.grad(fused, (e_, c_))
    e64, c64 = (t.detach().double().requires_grad_() for t in (e, c))
    lp, ent = _dense_logp_entropy(e64[:, :-1] if shift else e64, c64, rows, temperature)
    dense = grpo_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent, **kwargs)
    g_dense = torch.autograd.grad(dense, (e64, c64))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused.double().cpu(), dense, rtol=tol, atol=tol)
    for a, b in zip(g_fused, g_dense):
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol)


def _vocab_parallel_case(rank: int, world: int):
    """linear_grpo_loss with a head split by vocabulary rows (a DTensor, Shard(0)) against the dense
    composition of the whole head: the vocabulary-parallel engine under the objective."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    g = torch.Generator().manual_seed(5)
    D, V = 6, 29
    e = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (B, T), generator=g)
    target[~_batch()[-1]] = -100
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    per_rank = -(-V // world)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local_c = c.detach()[rows].clone().requires_grad_()
    head = DTensor.from_local(local_c, init_device_mesh("cpu", (world,)), [Shard(0)], run_check=False,
                              shape=c.shape, stride=c.stride())  # fmt: skip
    kw = dict(loss_type="grpo", eps_high=0.28, beta=0.05, entropy_coef=0.01)
    e_ = e.detach().clone().requires_grad_()
    xe.linear_grpo_loss(e_, head, target, old, adv, ref_logp=ref, chunk_size=5, **kw).backward()
    lp, ent = _dense_logp_entropy(e, c, target, 1.0)
    dense = grpo_loss(lp, old, adv, target != -100, ref_logp=ref, entropy=ent, **kw)
    grad_e, grad_c = torch.autograd.grad(dense, (e, c))
    torch.testing.assert_close(e_.grad, grad_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(local_c.grad, grad_c[rows], rtol=1e-10, atol=1e-10)


def test_linear_grpo_loss_vocab_parallel_over_two_gloo_ranks():
    from _gloo import check as check_ranks
    from _gloo import run_cases

    check_ranks(run_cases(2, {"grpo": _vocab_parallel_case}, timeout=120), "grpo")
