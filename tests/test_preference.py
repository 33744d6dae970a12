"""crossent.preference: DPO (sigmoid, robust, hinge, IPO), SimPO, CPO, ORPO and KTO against float64 references
written from the papers' formulas, against TRL's loss code, and against Liger-Kernel's chunked losses
(values and gradients); the fused entry points against the dense composition on the engines of this tree."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.preference import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    sequence_log_prob,
    simpo_loss,
)

B = 5
CUDA = torch.cuda.is_available()


def _logps(seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    pi_w, pi_l, ref_w, ref_l = (-torch.rand(B, generator=g, dtype=torch.float64) * scale - 0.05 for _ in range(4))
    return pi_w.requires_grad_(), pi_l.requires_grad_(), ref_w, ref_l


def _log_sigmoid(x):
    """log(1 / (1 + e^-x)) written out (float64; the test inputs are moderate)."""
    return -torch.log1p(torch.exp(-x))


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


# ---- the formulas against the papers ---------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_against_papers(loss_type, eps):
    if eps and loss_type in ("hinge", "ipo"):
        pytest.skip("no label smoothing for hinge / ipo")
    pi_w, pi_l, ref_w, ref_l = _logps()
    beta = 0.7
    ours = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, loss_type=loss_type, label_smoothing=eps)
    h = beta * ((pi_w - ref_w) - (pi_l - ref_l))  # the implicit reward margin (Rafailov et al. eq. 7)
    if loss_type == "sigmoid":  # DPO; eps > 0: the label flipped with probability eps (cDPO)
        paper = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
    elif loss_type == "robust":  # rDPO (Chowdhury et al. 2024, eq. 10): an unbiased estimate under flips
        paper = ((1 - eps) * -_log_sigmoid(h) - eps * -_log_sigmoid(-h)) / (1 - 2 * eps)
    elif loss_type == "hinge":  # SLiC
        paper = torch.clamp(1 - h, min=0)
    else:  # IPO (Azar et al. eq. 17): the squared distance of the log-ratio margin to 1 / (2 tau)
        paper = (h / beta - 1 / (2 * beta)) ** 2
    paper = paper.mean()
    _close(ours, paper)
    for a, b in zip(_grads(ours, pi_w, pi_l), _grads(paper, pi_w, pi_l)):
        _close(a, b)


def test_simpo_cpo_orpo_kto_against_papers():
    pi_w, pi_l, ref_w, ref_l = _logps(1, scale=1.5)
    nll = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    cases = [
        # SimPO (Meng et al. eq. 6): beta times the mean log-prob margin, minus gamma
        (simpo_loss(pi_w, pi_l, beta=2.5, gamma=0.3), -_log_sigmoid(2.5 * (pi_w - pi_l) - 0.3).mean()),
        # CPO (Xu et al. eq. 3-4): reference-free DPO plus the NLL of the chosen
        (cpo_loss(pi_w, pi_l, nll, beta=0.4, alpha=0.5), -_log_sigmoid(0.4 * (pi_w - pi_l)).mean() + 0.5 * nll),
        # ORPO (Hong et al. eq. 6-7): odds(y) = P / (1 - P) with P the mean-token probability e^logp
        (
            orpo_loss(pi_w, pi_l, nll, beta=0.3),
            nll - 0.3 * _log_sigmoid(torch.log((pi_w.exp() / (1 - pi_w.exp())) / (pi_l.exp() / (1 - pi_l.exp())))).mean(),
        ),
    ]
    # KTO (Ethayarajh et al. eq. 7-8, lambda_D = 0.8, lambda_U = 1.3): value v, loss lambda_y - v
    desirable = torch.tensor([True, False, True, False, False])
    z0 = torch.tensor(0.15, dtype=torch.float64)
    r = pi_w - ref_w
    lam_d, lam_u = (torch.tensor(x, dtype=torch.float64) for x in (0.8, 1.3))
    v = torch.where(desirable, lam_d * torch.sigmoid(0.9 * (r - z0)), lam_u * torch.sigmoid(0.9 * (z0 - r)))
    paper_kto = (torch.where(desirable, lam_d, lam_u) - v).mean()
    kto = kto_loss(pi_w, ref_w, desirable, z0, beta=0.9, desirable_weight=0.8, undesirable_weight=1.3)
    cases.append((kto, paper_kto))
    for ours, paper in cases:
        _close(ours, paper)
        inputs = [t for t in (pi_w, pi_l, nll) if t.requires_grad]
        for a, b in zip(
            torch.autograd.grad(ours, inputs, allow_unused=True, retain_graph=True),
            torch.autograd.grad(paper, inputs, allow_unused=True, retain_graph=True),
        ):
            if a is None or b is None:
                assert a is None and b is None
            else:
                _close(a, b)


def test_orpo_log_odds_accurate_near_zero():
    """log(1 - e^x) for x near 0 and far below: the two branches agree with float64 mpmath-free values."""
    x = torch.tensor([-1e-6, -0.5, -0.7, -30.0], dtype=torch.float64)
    ours = orpo_loss(x, x, torch.tensor(0.0), beta=1.0)  # equal sides: log sigmoid(0)
    _close(ours, torch.tensor(math.log(2), dtype=torch.float64))
    loss = orpo_loss(torch.tensor([-1e-7]), torch.tensor([-1.0]), torch.tensor(0.0))
    assert torch.isfinite(loss)


def test_sequence_log_prob_and_reference_point():
    lp = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    _close(sequence_log_prob(lp, m), torch.tensor([-7.0, -1.0]))
    _close(sequence_log_prob(lp, m, average=True), torch.tensor([-7 / 3, -0.5]))
    _close(kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -5.0])), torch.tensor(0.0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, b: dpo_loss(a, b, loss_type="orpo"), "loss_type must be one of"),
        (lambda a, b: dpo_loss(a, b, beta=0.0), "beta must be > 0"),
        (lambda a, b: dpo_loss(a, b, label_smoothing=0.5), "label_smoothing must be in"),
        (lambda a, b: dpo_loss(a, b, loss_type="ipo", label_smoothing=0.1), "not defined for loss_type='ipo'"),
        (lambda a, b: dpo_loss(a, b[:2]), "one shape"),
        (lambda a, b: dpo_loss(a, b, b[:2]), "ref_chosen_logps must be a tensor of shape"),
        (lambda a, b: dpo_loss(a, b, reduction="avg"), "reduction must be one of"),
        (lambda a, b: kto_loss(a, b, torch.ones(B)), "desirable must be a bool tensor"),
    ],
)
def test_bad_arguments(call, match):
    a, b, _, _ = _logps()
    with pytest.raises(ValueError, match=match):
        call(a.detach(), b.detach())


# ---- TRL 1.16 ----------------------------------------------------------------------------------------


def _trl_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, completion_mask, *, loss_type, beta,
             label_smoothing):
    """TRL 1.16's ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py), its loss path for
    ``f_divergence_type="reverse_kl"`` (standard DPO), ``ld_alpha=None``, ``use_weighting=False`` and one
    loss type; the method needs a model, so the lines are reproduced here."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_sequence_loss = (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    return per_sequence_loss.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_against_trl(loss_type):
    """Sequence sums as TRL forms them, and our per-token-mean convention for IPO (sums / counts)."""
    pi_w, pi_l, ref_w, ref_l = _logps(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]] * 2)
    eps = 0.1 if loss_type == "robust" else 0.0
    trl = _trl_dpo(pi_w, pi_l, ref_w, ref_l, mask, loss_type=loss_type, beta=0.3, label_smoothing=eps)
    if loss_type == "ipo":
        n_w, n_l = mask.sum(1).double().chunk(2)
        ours = dpo_loss(pi_w / n_w, pi_l / n_l, ref_w / n_w, ref_l / n_l, beta=0.3, loss_type="ipo")
    else:
        ours = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    _close(ours, trl)
    for a, b in zip(_grads(ours, pi_w, pi_l), _grads(trl, pi_w, pi_l)):
        _close(a, b)


@pytest.fixture(scope="module")
def trl_experimental():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    return cpo.CPOTrainer, orpo.ORPOTrainer


@pytest.mark.slow  # importing TRL's experimental trainers takes seconds
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.15), ("simpo", 0.0), ("simpo", 0.15)])
def test_cpo_and_simpo_against_trl(trl_experimental, loss_type, eps):
    """TRL's own ``CPOTrainer.cpo_loss`` (trl/experimental/cpo/cpo_trainer.py), called unbound with the
    trainer's attributes; its total loss is ``losses.mean() + cpo_alpha * nll`` (get_batch_loss_metrics)."""
    cpo_trainer, _ = trl_experimental
    pi_w, pi_l, _, _ = _logps(3, scale=1.0)
    nll = torch.tensor(2.0, dtype=torch.float64)
    state = SimpleNamespace(alpha=0.0, beta=0.6, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.4,
                            accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    losses, _, _ = cpo_trainer.cpo_loss(state, pi_w, pi_l)
    if loss_type == "simpo":
        trl = losses.mean()
        ours = simpo_loss(pi_w, pi_l, beta=0.6, gamma=0.4, label_smoothing=eps)
    else:
        trl = losses.mean() + 1.0 * nll
        ours = cpo_loss(pi_w, pi_l, nll, beta=0.6, alpha=1.0, label_smoothing=eps)
    _close(ours, trl)
    for a, b in zip(_grads(ours, pi_w, pi_l), _grads(trl, pi_w, pi_l)):
        _close(a, b)


@pytest.mark.slow
def test_orpo_against_trl(trl_experimental):
    """TRL's own ``ORPOTrainer.odds_ratio_loss``; its total loss is ``nll - losses.mean()``. TRL casts the
    log-probs to float32 first: float32 agreement."""
    _, orpo_trainer = trl_experimental
    pi_w, pi_l, _, _ = _logps(4, scale=2.0)
    nll = torch.tensor(1.1, dtype=torch.float64)
    state = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = orpo_trainer.odds_ratio_loss(state, pi_w, pi_l)
    trl = nll - losses.mean()
    ours = orpo_loss(pi_w, pi_l, nll, beta=0.25)
    _close(ours, trl, 1e-6)
    for a, b in zip(_grads(ours, pi_w, pi_l), _grads(trl, pi_w, pi_l)):
        _close(a, b, 1e-6)


def test_kto_against_trl():
    """TRL 1.16's ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py), loss_type "kto": the
    reference point from the mismatched pairs, then the chosen and rejected losses concatenated and
    averaged (``losses.nanmean()``); reproduced (the method needs a model)."""
    logps, _, ref_logps, _ = _logps(5)
    kl_logps, ref_kl_logps = -torch.rand(B, dtype=torch.float64), -torch.rand(B, dtype=torch.float64) - 0.2
    desirable = torch.tensor([True, True, False, True, False])
    beta, w_d, w_u = 0.5, 1.0, 1.4
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_idx, rejected_idx = desirable.nonzero()[:, 0], (~desirable).nonzero()[:, 0]
    chosen_logratios = logps.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
    rejected_logratios = logps.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    trl = torch.cat((w_d * chosen_losses, w_u * rejected_losses), 0).nanmean()
    z0 = kto_reference_point(kl_logps, ref_kl_logps)
    ours = kto_loss(logps, ref_logps, desirable, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    _close(ours, trl)
    _close(_grads(ours, logps)[0], _grads(trl, logps)[0])


# ---- the fused entry points: against the dense composition and against Liger-Kernel --------------------

T, D, V = 7, 12, 53


def _head_batch(rows=2 * B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(rows, T, D, generator=g, dtype=dtype)
    c = torch.randn(V, D, generator=g, dtype=dtype) / math.sqrt(D)
    target = torch.randint(0, V, (rows, T), generator=g)
    starts = torch.randint(0, 3, (rows,), generator=g)  # a prompt of 0-2 positions, then padding after
    ends = T - torch.randint(0, 3, (rows,), generator=g)
    pos = torch.arange(T)
    target[(pos < starts[:, None]) | (pos >= ends[:, None])] = -100
    return e.requires_grad_(), c.requires_grad_(), target


def _dense_token_logp(e, c, target, temperature=1.0):
    logits = (e @ c.T) / temperature
    safe = target.clamp_min(0)
    lp = torch.log_softmax(logits.double(), -1).gather(-1, safe[..., None])[..., 0]
    return torch.where(target != -100, lp, torch.zeros_like(lp)), target != -100


def _dense(name, e, c, target, ref=None, **kw):
    lp, m = _dense_token_logp(e, c, target, kw.pop("temperature", 1.0))
    average = name in ("simpo", "orpo")
    seq = sequence_log_prob(lp, m, average=average)
    if name == "kto":
        return kto_loss(seq, ref, kw.pop("desirable"), kw.pop("kl"), **kw)
    w, l_ = seq.chunk(2)
    if name == "dpo":
        if kw.get("loss_type") == "ipo":
            n_w, n_l = m.sum(-1).double().chunk(2)
            return dpo_loss(w / n_w, l_ / n_l, ref[0] / n_w, ref[1] / n_l, **kw)
        return dpo_loss(w, l_, *ref, **kw)
    if name == "simpo":
        return simpo_loss(w, l_, **kw)
    mw = m.chunk(2)[0].double()
    nll = -(lp.chunk(2)[0] * mw).sum() / mw.sum()
    return cpo_loss(w, l_, nll, **kw) if name == "cpo" else orpo_loss(w, l_, nll, **kw)


FUSED = {
    "dpo": (xe.linear_dpo_loss, dict(beta=0.3)),
    "dpo-ipo": (xe.linear_dpo_loss, dict(beta=0.3, loss_type="ipo")),
    "simpo": (xe.linear_simpo_loss, dict(beta=2.0, gamma=0.4, label_smoothing=0.1)),
    "cpo": (xe.linear_cpo_loss, dict(beta=0.2, alpha=0.7)),
    "orpo": (xe.linear_orpo_loss, dict(beta=0.2)),
    "kto": (xe.linear_kto_loss, dict(beta=0.4, undesirable_weight=1.3)),
}
ENGINES = [dict(backend="torch", chunk_size=3), dict(backend="torch", chunk_size=64), dict(backend="triton")]


def _fused_args(name, target):
    rows = target.shape[0]
    if name.startswith("dpo"):
        g = torch.Generator().manual_seed(7)
        return (-10 * torch.rand(rows // 2, generator=g, dtype=torch.float64) - 3,
                -10 * torch.rand(rows // 2, generator=g, dtype=torch.float64) - 3), {}  # fmt: skip
    if name == "kto":
        desirable = torch.arange(rows) % 3 != 0
        return (desirable, -10 * torch.rand(rows, dtype=torch.float64) - 3, 0.2), {}
    return (), {}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_against_dense(name, engine):
    if engine["backend"] == "triton":
        pytest.importorskip("triton")
        if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton engine needs CUDA or TRITON_INTERPRET=1")
    dtype = torch.float32 if engine["backend"] == "triton" else torch.float64
    fn, kw = FUSED[name]
    rows = B if name == "kto" else 2 * B
    e, c, target = _head_batch(rows, dtype=dtype)
    args, _ = _fused_args(name, target)
    device = "cuda" if engine["backend"] == "triton" and CUDA else "cpu"
    e_, c_ = (t.detach().to(device).requires_grad_() for t in (e, c))
    moved = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    fused = fn(e_, c_, target.to(device), *moved, **kw, **engine)
    g_fused = torch.autograd.grad(fused, (e_, c_))
    e64, c64 = (t.detach().double().requires_grad_() for t in (e, c))
    base = name.split("-")[0]
    if base == "kto":
        dense = _dense("kto", e64, c64, target, args[1], desirable=args[0], kl=args[2], **kw)
    elif base == "dpo":
        dense = _dense("dpo", e64, c64, target, args, **kw)
    else:
        dense = _dense(base, e64, c64, target, **kw)
    g_dense = torch.autograd.grad(dense, (e64, c64))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused.double().cpu(), dense, rtol=tol, atol=tol)
    for a, b in zip(g_fused, g_dense):
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol)


def test_fused_shift_and_temperature():
    """shift=True scores target[t + 1] at position t; the temperature divides the logits."""
    e, c, target = _head_batch()
    ref = (torch.full((B,), -20.0, dtype=torch.float64), torch.full((B,), -21.0, dtype=torch.float64))
    fused = xe.linear_dpo_loss(e, c, target, *ref, beta=0.2, shift=True, temperature=0.7)
    dense = _dense("dpo", e[:, :-1], c, target[:, 1:], ref, beta=0.2, temperature=0.7)
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-10)


def test_fused_rows_must_pair():
    e, c, target = _head_batch(rows=2 * B - 1)
    with pytest.raises(ValueError, match="2B rows"):
        xe.linear_simpo_loss(e, c, target)


# Liger-Kernel's chunked preference losses: plain torch (compiled=False: no compilation in the test), fused
# over (e, c) with the reference computed from a second head. Liger forms its softmax in float32: the
# comparison is to float32 accuracy.
LIGER = {
    "dpo": ("LigerFusedLinearDPOLoss", dict(beta=0.3, use_ref_model=True, compute_nll_loss=False)),
    "simpo": ("LigerFusedLinearSimPOLoss", dict(beta=2.0, gamma=0.4, compute_nll_loss=False)),
    "cpo": ("LigerFusedLinearCPOLoss", dict(beta=0.2, alpha=0.7)),
    "orpo": ("LigerFusedLinearORPOLoss", dict(beta=0.2)),
    "kto": ("LigerFusedLinearKTOLoss", dict(beta=0.4, use_ref_model=True)),
}


@pytest.mark.parametrize("name", list(LIGER))
def test_against_liger(name):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    cls, kw = LIGER[name]
    rows = B if name == "kto" else 2 * B
    e, c, target = _head_batch(rows, seed=1)
    ref_e, ref_c, _ = _head_batch(rows, seed=2)
    ref_e, ref_c = ref_e.detach(), ref_c.detach()
    liger = getattr(chunked, cls)(compiled=False, chunk_size=2, **kw)
    with torch.no_grad():
        ref_lp, ref_m = _dense_token_logp(ref_e, ref_c, target)
        ref_seq = sequence_log_prob(ref_lp, ref_m)
    ours_kw = {k: v for k, v in kw.items() if k not in ("use_ref_model", "compute_nll_loss")}
    if name == "kto":
        desirable = torch.arange(rows) % 3 != 0
        out = liger(e, c, target, None, desirable, ref_e, ref_c, None, kl=torch.tensor(0.2, dtype=torch.float64))
        ours = xe.linear_kto_loss(e, c, target, desirable, ref_seq, 0.2, **ours_kw)
    elif name == "dpo":
        out = liger(c, e, target, None, ref_e, ref_c)
        ours = xe.linear_dpo_loss(e, c, target, *ref_seq.chunk(2), **ours_kw)
    else:
        out = liger(c, e, target)
        ours = getattr(xe, f"linear_{name}_loss")(e, c, target, **ours_kw)
    theirs = out[0] if isinstance(out, tuple) else out
    g_theirs = torch.autograd.grad(theirs, (e, c))
    g_ours = torch.autograd.grad(ours, (e, c))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


def _vocab_parallel_case(rank: int, world: int):
    """linear_dpo_loss with a head split by vocabulary rows (a DTensor, Shard(0)) against the dense
    composition of the whole head: the vocabulary-parallel engine under the objective."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    e, c, target = _head_batch(seed=4)
    ref = _fused_args("dpo", target)[0]
    per_rank = -(-V // world)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local_c = c.detach()[rows].clone().requires_grad_()
    head = DTensor.from_local(local_c, init_device_mesh("cpu", (world,)), [Shard(0)], run_check=False,
                              shape=c.shape, stride=c.stride())  # fmt: skip
    e_ = e.detach().clone().requires_grad_()
    loss = xe.linear_dpo_loss(e_, head, target, *ref, beta=0.3, chunk_size=4)
    loss.backward()
    dense = _dense("dpo", e, c, target, ref, beta=0.3)
    grad_e, grad_c = torch.autograd.grad(dense, (e, c))
    torch.testing.assert_close(loss, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e_.grad, grad_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(local_c.grad, grad_c[rows], rtol=1e-10, atol=1e-10)


def test_linear_dpo_loss_vocab_parallel_over_two_gloo_ranks():
    from _gloo import check as check_ranks
    from _gloo import run_cases

    check_ranks(run_cases(2, {"dpo": _vocab_parallel_case}, timeout=120), "dpo")
