"""The contract of stateful losses: one observation per row and forward on every engine and mode,
state in ``nn.Module`` buffers that the ``crossent.nn`` wrappers reach, no change in eval mode."""

from __future__ import annotations

import pytest
import torch

import crossent as xe
from crossent._engine.options import LinearCrossEntropyOptions
from crossent.losses import StatefulLoss

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
    # A stateful loss inside a whole-row wrapper and a sum.
    out.append(("logit_clip_of_aldr_kl", lambda: xe.losses.LogitClip(tau=2.0, base=xe.losses.AdaptiveLDRKL(num_samples=N)), True))
    out.append(("running_scale_plus_ce", lambda: RunningScaleCE() + 0.5 * xe.losses.get("ce"), False))
    return out


STATEFUL = _stateful_losses()


def test_the_registry_has_a_stateful_loss():
    assert "aldr_kl" in [name for name, _, _ in STATEFUL]


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


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("path", ["auto", "eager", "recompute"])
@pytest.mark.parametrize("name,factory,needs_ids", STATEFUL, ids=[s[0] for s in STATEFUL])
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


def test_made_up_loss_counts_one_update_per_forward():
    for path in ("dense", "auto", "recompute"):
        _, _, state = _run(path, RunningScaleCE, False, "none", steps=3)
        assert int(state["0.updates"]) == 3, path


@pytest.mark.parametrize("name,factory,needs_ids", STATEFUL, ids=[s[0] for s in STATEFUL])
def test_vocab_parallel_refuses_stateful_losses_by_name(name, factory, needs_ids):
    from crossent.distributed import vocab_parallel_cross_entropy

    e, c, t = _inputs()
    with pytest.raises(ValueError, match="vocab-parallel"):
        vocab_parallel_cross_entropy(e @ c.T, t, vocab_start=0, loss=factory())


@pytest.mark.parametrize("wrap", ["itself", "with_z_loss"])
@pytest.mark.parametrize("module", ["CrossEntropy", "LinearCrossEntropy"])
def test_wrappers_reach_the_state(module, wrap):
    e, c, t = _inputs()
    ids = {"sample_ids": torch.arange(N)}
    loss = xe.losses.AdaptiveLDRKL(num_samples=N)
    kw = dict(loss=loss, z_loss=1e-3 if wrap == "with_z_loss" else 0.0)
    crit = getattr(xe.nn, module)(**kw)

    def step(m):
        args = (e @ c.T, t) if module == "CrossEntropy" else (e, c, t)
        return m(*args, extra=ids)

    step(crit)
    state = crit.state_dict()
    lambda_keys = [k for k in state if k.endswith("lambdas")]
    assert len(lambda_keys) == 1, state.keys()
    torch.testing.assert_close(state[lambda_keys[0]], loss.lambdas, rtol=0, atol=0)

    # Round trip into a fresh wrapper.
    fresh = getattr(xe.nn, module)(loss=xe.losses.AdaptiveLDRKL(num_samples=N), z_loss=kw["z_loss"])
    fresh.load_state_dict(state)
    restored = [m for m in fresh.modules() if isinstance(m, xe.losses.AdaptiveLDRKL)][0]
    torch.testing.assert_close(restored.lambdas, loss.lambdas, rtol=0, atol=0)

    # eval() reaches the loss: the state stops changing, and values still come out.
    crit.eval()
    assert not loss.training
    frozen = loss.lambdas.clone()
    out = step(crit)
    assert torch.isfinite(out)
    assert torch.equal(loss.lambdas, frozen)
    crit.train()
    assert loss.training
    step(crit)
    assert not torch.equal(loss.lambdas, frozen)


def test_state_follows_the_wrapper_to_a_dtype_and_device():
    crit = xe.nn.CrossEntropy(loss=RunningScaleCE())
    assert [k for k in crit.state_dict()] == ["loss.running", "loss.updates"]
    crit.to(torch.float32)
    assert crit.loss.running.dtype == torch.float32
