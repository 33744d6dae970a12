"""The contract of stateful losses: one observation per row and forward on every engine and mode,
state in ``nn.Module`` buffers that the ``crossent.nn`` wrappers reach, no change in eval mode."""

from __future__ import annotations

import pytest
import torch

import crossent as xe
from crossent._engine.backend import triton_importable
from crossent._engine.options import LinearCrossEntropyOptions
from crossent.losses import CompositeLoss, StatefulLoss
from crossent.losses._build import build_loss
from crossent.transforms import ClassBias

N, D, V = 13, 5, 9


class RunningScaleCE(StatefulLoss):
    """CE divided by a running mean of the batch's mean lse (a made-up stateful loss, to test the contract).

    The state depends on all rows of a forward at once: updating it per block of rows, or twice per
    forward, would change both the state and the values of later steps.
    """

    def __init__(self, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running", torch.ones((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def observe(self, z, rows):
        scale = self.running.to(z.dtype).expand(z.shape[0]).clone()
        return {f"running_scale.{id(self)}": scale, f"running_lse.{id(self)}": torch.logsumexp(z, -1)}

    def commit(self, rows):
        if self.training and rows.valid.any():
            mean = rows.extra[f"running_lse.{id(self)}"][rows.valid].mean().double().abs() + 1.0
            self.running.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.updates += 1

    def dense_row_loss(self, z, rows):
        scale = rows.extra[f"running_scale.{id(self)}"].to(z.dtype)
        nll = torch.logsumexp(z, -1) - z.gather(-1, rows.target[:, None]).squeeze(-1)
        return nll / scale


def _stateful_losses():
    """``(name, factory, needs_ids)`` for every stateful registry loss and the made-up one above."""
    out = []
    for name, cls in sorted(xe.losses.registered().items()):
        if issubclass(cls, StatefulLoss):
            hp = {"num_samples": N} if name == "aldr_kl" else {}
            out.append((name, lambda name=name, hp=hp: xe.losses.get(name, **hp), name == "aldr_kl"))
    out.append(("running_scale_ce", RunningScaleCE, False))
    return out


#: Every kind of loss that wraps others (``CompositeLoss``), as a function of the wrapped stateful loss.
WRAPPERS = {
    "sum": lambda inner: inner + 0.5 * xe.losses.get("ce"),
    "scaled": lambda inner: 2.5 * inner,
    "transformed": lambda inner: xe.losses.Transformed(inner, ClassBias(torch.linspace(-1.0, 2.0, V))),
    "apl_active": lambda inner: xe.losses.APL(active=inner, passive="rce", alpha=0.7, beta=0.3),
    "apl_passive": lambda inner: xe.losses.APL(active="nce", passive=inner),
    "logit_clip": lambda inner: xe.losses.LogitClip(tau=2.0, base=inner),
    "z_loss_argument": lambda inner: build_loss(inner, z_loss=1e-3),
    "nested": lambda inner: 0.5 * xe.losses.APL(active=xe.losses.LogitClip(tau=3.0, base=inner)) + xe.losses.ZLoss(),
}

INNER = _stateful_losses()
WRAPPED = [
    (f"{wrapper}_of_{name}", lambda wrap=wrap, factory=factory: wrap(factory()), needs_ids)
    for wrapper, wrap in WRAPPERS.items()
    for name, factory, needs_ids in INNER
]
STATEFUL = INNER + WRAPPED
IDS = [s[0] for s in STATEFUL]


def test_the_registry_has_a_stateful_loss():
    assert "aldr_kl" in [name for name, _, _ in STATEFUL]


def _subclasses(cls):
    return {cls} | {s for sub in cls.__subclasses__() for s in _subclasses(sub)}


def test_every_wrapper_is_tested_and_every_loss_holding_a_loss_is_a_wrapper():
    inner = RunningScaleCE()
    built = [WRAPPERS[name](inner) for name in WRAPPERS]
    covered = set()
    while built:
        loss = built.pop()
        if isinstance(loss, CompositeLoss):
            covered.add(type(loss))
            built.extend(loss.parts)
    # SoftTargetCrossEntropy's one part is fixed (plain cross-entropy): no stateful loss can be inside it.
    fixed = {CompositeLoss, xe.losses.SoftTargetCrossEntropy}
    library = {c for c in _subclasses(CompositeLoss) - fixed if c.__module__.startswith("crossent.")}
    assert library <= covered, library - covered

    # A registered loss that keeps another loss must delegate through CompositeLoss.
    for name, cls in xe.losses.registered().items():
        try:
            loss = cls()
        except (TypeError, ValueError):  # a required hyperparameter (a transition matrix)
            continue
        held = [v for v in vars(loss).values() for v in (v if isinstance(v, (list, tuple)) else [v])]
        if any(isinstance(v, xe.losses.Loss) for v in held):
            assert isinstance(loss, CompositeLoss), name


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    e = torch.randn(N, D, generator=g, dtype=dtype)
    c = torch.randn(V, D, generator=g, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[[2, 7]] = -100
    return e, c, t


def _state(loss):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(loss.state_modules()) for k, v in m.state_dict().items()}


def _run(path, factory, needs_ids, reduction, steps=2):
    """Loss values, gradients and state after ``steps`` forward+backward passes on one engine path."""
    e, c, t = _inputs()
    loss_obj = factory()
    extra = {"sample_ids": torch.arange(N)} if needs_ids else None
    values, grads = [], []
    for _ in range(steps):
        le, lc = e.clone().requires_grad_(), c.clone().requires_grad_()
        if path == "dense":
            out = xe.cross_entropy(le @ lc.T, t, loss=loss_obj, reduction=reduction, extra=extra)
        else:
            mode = {"eager": "eager", "recompute": "recompute", "auto": "auto"}[path]
            if mode == "eager" and reduction == "none":
                mode = "auto"
            options = LinearCrossEntropyOptions(chunk_size=4, mode=mode)
            out = xe.linear_cross_entropy(le, lc, t, loss=loss_obj, reduction=reduction, extra=extra, options=options)
        upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        out.backward(upstream)
        values.append(out.detach())
        grads.append((le.grad, lc.grad))
    return values, grads, _state(loss_obj)


def _moved(after, before):
    return any(not torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("path", ["auto", "eager", "recompute"])
@pytest.mark.parametrize("name,factory,needs_ids", STATEFUL, ids=IDS)
def test_every_engine_updates_state_once_and_matches_dense(name, factory, needs_ids, path, reduction):
    want = _run("dense", factory, needs_ids, reduction)
    got = _run(path, factory, needs_ids, reduction)
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for (ga, gb), (wa, wb) in zip(got[1], want[1]):
        torch.testing.assert_close(ga, wa, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, wb, rtol=1e-10, atol=1e-12)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-12, atol=1e-13)
    assert _moved(want[2], _state(factory())), "the state never moved"


@pytest.mark.parametrize("wrapper", ["itself", *WRAPPERS])
def test_made_up_loss_counts_one_update_per_forward(wrapper):
    factory = RunningScaleCE if wrapper == "itself" else lambda: WRAPPERS[wrapper](RunningScaleCE())
    for reduction in ("none", "sum"):
        for path in ("dense", "auto", "eager", "recompute"):
            _, _, state = _run(path, factory, False, reduction, steps=3)
            (updates,) = [v for k, v in state.items() if k.endswith(".updates")]
            assert int(updates) == 3, (path, reduction)


def test_a_stateful_loss_is_used_once_per_loss():
    inner = RunningScaleCE()
    twice = (lambda: inner + inner, lambda: 2.0 * inner + inner, lambda: xe.losses.APL(active=inner, passive=inner))
    for build in twice:
        with pytest.raises(ValueError, match="used more than once"):
            build()
    one_each = RunningScaleCE() + RunningScaleCE()
    assert len(one_each.state_modules()) == 2


#: The entry points whose engines never hold a whole row, with the engine their refusal names.
BLOCKWISE = {"vocab_parallel": "vocab-parallel", "vocab_parallel_linear": "vocab-parallel", "triton": "triton"}


@pytest.mark.parametrize("engine", BLOCKWISE)
@pytest.mark.parametrize("name,factory,needs_ids", STATEFUL, ids=IDS)
def test_engines_without_whole_rows_refuse_stateful_losses_by_name(name, factory, needs_ids, engine):
    from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    e, c, t = _inputs()
    loss = factory()
    extra = {"sample_ids": torch.arange(N)} if needs_ids else None
    before = _state(loss)
    if engine == "triton" and not triton_importable():
        pytest.skip("Triton does not import")
    with pytest.raises(ValueError, match=f"needs whole logit rows and cannot run on the '{BLOCKWISE[engine]}' engine"):
        if engine == "vocab_parallel":
            vocab_parallel_cross_entropy(e @ c.T, t, vocab_start=0, loss=loss, extra=extra)
        elif engine == "vocab_parallel_linear":
            vocab_parallel_linear_cross_entropy(e, c, t, vocab_start=0, loss=loss, extra=extra)
        else:
            xe.linear_cross_entropy(e, c, t, loss=loss, extra=extra, backend="triton")
    assert not _moved(_state(loss), before)


@pytest.mark.parametrize("module", ["CrossEntropy", "LinearCrossEntropy"])
@pytest.mark.parametrize("name,factory,needs_ids", STATEFUL, ids=IDS)
def test_modules_save_restore_and_freeze_the_state(name, factory, needs_ids, module):
    e, c, t = _inputs()
    extra = {"sample_ids": torch.arange(N)} if needs_ids else None
    crit = getattr(xe.nn, module)(loss=factory())
    initial = _state(crit.loss)

    def step(m):
        args = (e @ c.T, t) if module == "CrossEntropy" else (e, c, t)
        return m(*args, extra=extra)

    step(crit)
    trained = _state(crit.loss)
    assert _moved(trained, initial)
    state = crit.state_dict()
    assert len(state) == len(trained)
    for saved, held in zip(state.values(), trained.values()):
        assert torch.equal(saved, held)

    # Round trip into a fresh module: the same state, so the same values.
    fresh = getattr(xe.nn, module)(loss=factory())
    fresh.load_state_dict(state)
    restored = _state(fresh.loss)
    assert restored.keys() == trained.keys()
    assert not _moved(restored, trained)

    # eval() reaches every stateful part: the state stops changing, and values still come out.
    crit.eval(), fresh.eval()
    assert not any(m.training for m in crit.loss.state_modules())
    out, out_fresh = step(crit), step(fresh)
    assert torch.isfinite(out)
    assert torch.equal(out, out_fresh)
    assert not _moved(_state(crit.loss), trained)
    crit.train()
    assert all(m.training for m in crit.loss.state_modules())
    step(crit)
    assert _moved(_state(crit.loss), trained)


def test_state_follows_the_wrapper_to_a_dtype_and_device():
    crit = xe.nn.CrossEntropy(loss=RunningScaleCE())
    assert [k for k in crit.state_dict()] == ["loss.running", "loss.updates"]
    crit.to(torch.float32)
    assert crit.loss.running.dtype == torch.float32
