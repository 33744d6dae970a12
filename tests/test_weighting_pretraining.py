"""LossReweighting (Sow et al. 2025) and DoReMi (Xie et al. 2023) against references written from docs/weighting.md."""

import math

import pytest
import torch

from crossent.weighting import DoReMi, LossReweighting, sequence_losses

# ----------------------------------------------------------------------------------------------
# Sow et al.: normalise to [-d, d], strategy f, softmax with temperature r


def ref_sow_weights(losses, strategy, r=1.0, d=1.0):
    l = losses.double()
    lmin, lmax = l.min().item(), l.max().item()
    h = (2 * l - lmax - lmin) * d / max(lmax - lmin, 1e-6)
    f = {
        "linupper": torch.clamp(h + d, max=d),
        "quadratic": 1 - h**2 / d**2,
        "extremes": h.abs(),
        "upper": 0.5 * h + 0.5 * d,
    }[strategy]
    g = torch.exp((f - f.max()) / r)
    return g / g.sum()


def ref_sow_loss(losses, w, num_tokens=None):
    # official: sum_i w_i * lennorm_i * l_i * world_size * local_B (one process here)
    b = losses.numel()
    lennorm = torch.full_like(w, 1.0 / b) if num_tokens is None else num_tokens.double() / num_tokens.sum()
    return (w * lennorm * losses.double()).sum() * b


def test_hand_case_linupper_and_extremes():
    losses = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    # h = (-1, 0, 1); linupper f = (0, 1, 1); extremes f = (1, 0, 1)
    e = math.exp(-1)
    lin = LossReweighting("linupper", r=1.0, warmup_steps=0).weights(losses)
    torch.testing.assert_close(lin, 3 * torch.tensor([e, 1, 1], dtype=torch.float64) / (e + 2))
    ext = LossReweighting("extremes", r=0.5, warmup_steps=0).weights(losses)
    e2 = math.exp(-2)
    torch.testing.assert_close(ext, 3 * torch.tensor([1, e2, 1], dtype=torch.float64) / (2 + e2))


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "upper"])
@pytest.mark.parametrize("r,d", [(1.0, 1.0), (0.4, 1.0), (0.7, 2.5)])
def test_random_against_reference(strategy, r, d):
    gen = torch.Generator().manual_seed(0)
    losses = (2 + torch.randn(32, generator=gen, dtype=torch.float64)).requires_grad_()
    ntok = torch.randint(1, 100, (32,), generator=gen)
    rw = LossReweighting(strategy, r=r, d=d, warmup_steps=0)
    w = ref_sow_weights(losses.detach(), strategy, r, d)
    got = rw.weights(losses)
    assert not got.requires_grad
    torch.testing.assert_close(got, w * 32, rtol=1e-12, atol=1e-12)
    for tokens in (None, ntok):
        out = rw(losses, num_tokens=tokens)
        ref = ref_sow_loss(losses, w, tokens)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(out, losses)
        share = 1 / 32 if tokens is None else tokens.double() / tokens.sum()
        torch.testing.assert_close(g, w * 32 * share, rtol=1e-12, atol=1e-12)


def test_mid_alias_and_uniform():
    losses = torch.rand(10, dtype=torch.float64)
    a = LossReweighting("mid", warmup_steps=0).weights(losses)
    b = LossReweighting("quadratic", warmup_steps=0).weights(losses)
    torch.testing.assert_close(a, b)
    uniform = LossReweighting("uniform", warmup_steps=0).weights(losses)
    torch.testing.assert_close(uniform, torch.ones(10, dtype=torch.float64))
    # equal losses: the range guard 1e-6 gives h = 0 everywhere, hence uniform weights
    torch.testing.assert_close(LossReweighting("extremes", warmup_steps=0).weights(torch.ones(4)), torch.ones(4))


def test_uniform_weights_give_token_mean():
    token_losses = torch.rand(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    seq, ntok = sequence_losses(token_losses, mask)
    out = LossReweighting("uniform")(seq, num_tokens=ntok)
    torch.testing.assert_close(out, token_losses[mask].mean(), rtol=1e-12, atol=1e-12)


def test_warmup_counter_over_several_steps():
    gen = torch.Generator().manual_seed(1)
    rw = LossReweighting("extremes", r=0.4, warmup_steps=3)
    for step in range(6):
        losses = torch.rand(8, generator=gen, dtype=torch.float64) * 3
        w = rw.weights(losses)
        expected = torch.ones(8, dtype=torch.float64) if step < 3 else ref_sow_weights(losses, "extremes", 0.4) * 8
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
        assert rw.num_steps == step  # weights() does not count
        out = rw(losses)
        torch.testing.assert_close(out, (expected * losses).mean(), rtol=1e-12, atol=1e-12)
        assert rw.num_steps == step + 1


def test_manual_steps_and_state_dict_round_trip():
    rw = LossReweighting("linupper", warmup_steps=2, auto_step=False)
    losses = torch.tensor([1.0, 2.0, 5.0])
    rw(losses)
    rw(losses)
    assert rw.num_steps == 0
    torch.testing.assert_close(rw.weights(losses), torch.ones(3))
    rw.step()
    rw.step()
    state = rw.state_dict()
    fresh = LossReweighting("linupper", warmup_steps=2)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 2
    torch.testing.assert_close(fresh.weights(losses), rw.weights(losses))
    assert not torch.allclose(fresh.weights(losses), torch.ones(3))


def test_half_precision_losses():
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    rw = LossReweighting("quadratic", warmup_steps=0)
    w = rw.weights(losses)
    assert w.dtype == torch.float32
    out = rw(losses)
    assert out.dtype == torch.bfloat16
    out.backward()
    assert torch.isfinite(losses.grad).all()


def test_loss_reweighting_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        LossReweighting("lowest")
    with pytest.raises(TypeError):
        LossReweighting(3)
    with pytest.raises(ValueError, match="r"):
        LossReweighting(r=0)
    with pytest.raises(ValueError, match="d"):
        LossReweighting(d=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        LossReweighting(warmup_steps=-1)
    rw = LossReweighting()
    with pytest.raises(ValueError, match=r"\[N\]"):
        rw(torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one"):
        rw(torch.ones(0))
    with pytest.raises(ValueError, match="shape"):
        rw(torch.ones(3), num_tokens=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        rw(torch.ones(2), num_tokens=torch.tensor([-1, 3]))
    with pytest.raises(RuntimeError, match="not initialised"):
        LossReweighting(distributed=True).weights(torch.ones(2))


def test_sequence_losses():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    loss, n = sequence_losses(t)
    torch.testing.assert_close(loss, torch.tensor([2.0, 5.0]))
    assert n.tolist() == [3, 3]
    loss, n = sequence_losses(t, torch.tensor([[1, 0, 1], [0, 0, 0]]))
    torch.testing.assert_close(loss, torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="2-D"):
        sequence_losses(torch.ones(3))


# ----------------------------------------------------------------------------------------------
# DoReMi (doremiv1)


class RefDoReMi:
    """The official update, written per domain with loops (domain ids per sequence)."""

    def __init__(self, k, eta, c, init=None, sampling=None, score0=0.0):
        self.k, self.eta, self.c = k, eta, c
        self.w = torch.full((k,), 1.0 / k, dtype=torch.float64) if init is None else init / init.sum()
        self.sampling = torch.full((k,), 1.0 / k, dtype=torch.float64) if sampling is None else sampling
        self.avg = self.w.clone()
        self.scores = torch.full((k,), score0, dtype=torch.float64)
        self.counter = 1

    def update(self, excess, mask, domain):
        scores = []
        for d in range(self.k):
            sel = domain == d
            tokens = excess[sel][mask[sel]]
            scores.append(torch.clip(tokens, min=0).mean() if tokens.numel() > 0 else self.scores[d])
        self.scores = torch.stack(scores).double()
        log_w = torch.log(self.w) + self.eta * self.scores
        log_w = log_w - torch.logsumexp(log_w, 0)
        self.w = (1 - self.c) * torch.exp(log_w) + self.c / self.k
        self.counter += 1
        self.avg = (self.avg * (self.counter - 1) + self.w) / self.counter

    def loss(self, pertoken, mask, domain):
        u = self.w / self.sampling
        u = u / u.sum()
        cw = u[domain].unsqueeze(-1).expand_as(pertoken) * mask
        return (pertoken * cw).sum() / torch.clip(cw.sum(), min=1e-10), cw


@pytest.mark.parametrize("with_sampling", [False, True])
def test_doremi_several_steps_against_reference(with_sampling):
    gen = torch.Generator().manual_seed(2)
    k, b, t = 4, 6, 5
    init = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    sampling = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64) if with_sampling else None
    ours = DoReMi(k, eta=0.7, smoothing=1e-3, initial_weights=init, sampling_weights=sampling)
    ref = RefDoReMi(k, 0.7, 1e-3, init=init, sampling=sampling)
    for step in range(5):
        proxy = (3 + torch.randn(b, t, generator=gen, dtype=torch.float64)).requires_grad_()
        reference = 3 + torch.randn(b, t, generator=gen, dtype=torch.float64)
        # domain 3 is absent from the first steps: its score stays at the initial value
        domain = torch.randint(0, 3 if step < 3 else 4, (b,), generator=gen)
        mask = torch.rand(b, t, generator=gen) > 0.2
        w_before = ours.weights(proxy, reference_losses=reference, domain_ids=domain, mask=mask)
        out = ours(proxy, reference_losses=reference, domain_ids=domain, mask=mask)
        ref.update((proxy - reference).detach(), mask, domain)
        expected, cw = ref.loss(proxy, mask.double(), domain)
        torch.testing.assert_close(ours.domain_weights, ref.w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.average_weights, ref.avg, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_before, cw, rtol=1e-12, atol=1e-12)  # weights() saw the same update
        (g,) = torch.autograd.grad(out, proxy)
        torch.testing.assert_close(g, cw / cw.sum(), rtol=1e-12, atol=1e-12)
    assert ours.state_dict()["counter"] == 6
    # average over the initial weights and the 5 updates: the official counter starts at 1
    assert ours.average_weights.sum().item() == pytest.approx(1.0)


def test_doremi_hand_case_and_smoothing():
    d = DoReMi(2, eta=1.0, smoothing=0.5)
    proxy = torch.tensor([[3.0], [1.0]])
    reference = torch.tensor([[1.0], [2.0]])
    d.update(proxy, reference_losses=reference, domain_ids=torch.tensor([0, 1]))
    # scores (2, 0): alpha' = (e^2, 1) / (e^2 + 1); alpha = 0.5 alpha' + 0.25
    a = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor([0.5 * a + 0.25, 0.5 * (1 - a) + 0.25], dtype=torch.float64)
    torch.testing.assert_close(d.domain_weights, expected)
    torch.testing.assert_close(d.scores, torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_doremi_token_domain_ids_and_masked_domain():
    d_seq = DoReMi(3, smoothing=0.0)
    d_tok = DoReMi(3, smoothing=0.0)
    proxy = torch.tensor([[2.0, 3.0], [1.0, 4.0]])
    reference = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [False, False]])  # every token of domain 1 is masked
    d_seq.update(proxy, reference_losses=reference, domain_ids=torch.tensor([0, 1]), mask=mask)
    d_tok.update(proxy, reference_losses=reference, domain_ids=torch.tensor([[0, 0], [1, 1]]), mask=mask)
    torch.testing.assert_close(d_seq.domain_weights, d_tok.domain_weights)
    # domain 1 (all masked) and domain 2 (absent) keep their initial score 0
    torch.testing.assert_close(d_seq.scores, torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64))


def test_doremi_weights_without_reference_use_current_state_and_do_not_update():
    d = DoReMi(2, initial_weights=[3.0, 1.0])
    before = d.state_dict()
    losses = torch.ones(2, 3)
    w = d.weights(losses, domain_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(w, torch.tensor([[0.75] * 3, [0.25] * 3]))
    d.weights(losses, domain_ids=torch.tensor([0, 1]), reference_losses=torch.zeros(2, 3))
    after = d.state_dict()
    for key in before:
        assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key]))


def test_doremi_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    a, b = DoReMi(3, initial_score=math.log(50)), DoReMi(3)
    for _ in range(3):
        proxy, reference = torch.rand(4, 2, generator=gen), torch.rand(4, 2, generator=gen)
        a(proxy, reference_losses=reference, domain_ids=torch.tensor([0, 0, 1, 1]))
    b.load_state_dict(a.state_dict())
    proxy, reference, dom = torch.rand(4, 2, generator=gen), torch.rand(4, 2, generator=gen), torch.tensor([2, 0, 1, 1])
    out_a = a(proxy, reference_losses=reference, domain_ids=dom)
    torch.testing.assert_close(out_a, b(proxy, reference_losses=reference, domain_ids=dom))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(b.state_dict()[key]))
    # the initial score log(50) of the never-seen domain 2 was kept until step 4
    assert a.scores[2].item() != pytest.approx(math.log(50))


def test_doremi_errors():
    with pytest.raises(ValueError, match="num_domains"):
        DoReMi(0)
    with pytest.raises(ValueError, match="eta"):
        DoReMi(2, eta=0)
    with pytest.raises(ValueError, match="smoothing"):
        DoReMi(2, smoothing=1.5)
    with pytest.raises(ValueError, match="2 entries"):
        DoReMi(2, initial_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        DoReMi(2, sampling_weights=[1.0, 0.0])
    d = DoReMi(2)
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="outside"):
        d(x, reference_losses=x, domain_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="domain_ids"):
        d(x, reference_losses=x, domain_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="reference_losses"):
        d(x, reference_losses=torch.ones(3, 2), domain_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        d(x, reference_losses=x, domain_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="mask"):
        d(x, reference_losses=x, domain_ids=torch.tensor([0, 1]), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 entries"):
        d.load_state_dict(
            {"domain_weights": torch.ones(3), "average_weights": torch.ones(2), "scores": torch.ones(2), "counter": 1}
        )
