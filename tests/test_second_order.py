"""Second derivatives: Hessian-vector products and gradient penalties through every loss.

On the dense engine every registered loss must give, under ``backward(create_graph=True)``, the same
second-order quantities as plain autograd on its formula written independently
(``reference_streaming.py`` / ``reference_whole_row.py`` / the formulas below): a Hessian-vector product
``H v`` and the gradient of a penalty ``L + ||dL/dz||^2``. Float64, tiny shapes, 1e-9 relative.
The row-chunked engine (its Triton backend too) and the vocabulary-parallel engine form their
gradients without a graph; they must refuse ``create_graph=True`` by name rather than return a
gradient whose own derivative is silently zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
import reference_streaming as R
import reference_whole_row as W
from test_distillation import CASE_IDS, CASES, reference_divergence
from crossent.distributed import vocab_parallel_cross_entropy
from crossent.losses import registered

N, C = 4, 5
T = torch.tensor(
    [[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.6, 0.1, 0.1, 0.1], [0.05, 0.05, 0.8, 0.05, 0.05],
     [0.1, 0.1, 0.1, 0.6, 0.1], [0.2, 0.1, 0.1, 0.1, 0.5]],
    dtype=torch.float64,
)  # fmt: skip


def _clipped(z):
    return torch.softmax(z, -1).clamp(1e-7, 1 - 1e-7)


def forward_correction(z, y, clip=True):
    p = _clipped(z) if clip else torch.softmax(z, -1)
    return -torch.log((p @ T).gather(-1, y[:, None]).squeeze(-1))


def backward_correction(z, y, clip=True):
    log_p = torch.log(_clipped(z)) if clip else torch.log_softmax(z, -1)
    return -(torch.linalg.inv(T)[y] * log_p).sum(-1)


def z_loss(z, y, scale=1e-4):
    return scale * torch.logsumexp(z, -1) ** 2


def ldr_kl_normalized(normalize):
    def ref(z, y):
        return R.ldr_kl(z, y, normalize=normalize)

    return ref


#: name -> [(loss object, reference per-row function of (z, y), extra)], one or more cases per loss.
def cases(name):
    get = xe.losses.get
    ids = torch.arange(N)
    table = torch.ones(N, dtype=torch.float64)
    special = {
        "z_loss": [(get("z_loss", scale=0.3), lambda z, y: z_loss(z, y, 0.3), None)],
        "forward_correction": [
            (get("forward_correction", T=T), forward_correction, None),
            (get("forward_correction", T=T, clip=False), lambda z, y: forward_correction(z, y, False), None),
        ],
        "backward_correction": [
            (get("backward_correction", T=T), backward_correction, None),
            (get("backward_correction", T=T, clip=False), lambda z, y: backward_correction(z, y, False), None),
        ],
        "circle": [(get("circle", gamma=4.0), lambda z, y: R.circle(z, y, gamma=4.0), None)],
        "ldr_kl": [
            (get("ldr_kl", lam=0.7, margin=0.3), lambda z, y: R.ldr_kl(z, y, lam=0.7, margin=0.3), None),
            (get("ldr_kl", normalize="softplus"), ldr_kl_normalized("softplus"), None),
        ],
        "focal": [(get("focal", gamma=1.5), lambda z, y: R.focal(z, y, 1.5), None)],
        "tgce": [(get("tgce", k=0.2), lambda z, y: R.tgce(z, y, k=0.2), None)],
        "sigmoid_focal": [(get("sigmoid_focal"), W.sigmoid_focal_rows, None)],
        "nfl": [(get("nfl"), lambda z, y: W.nfl(z, y, 0.5), None)],
        "logit_clip": [(get("logit_clip", tau=2.0), lambda z, y: W.logit_clip(z, y, 2.0, 2.0), None)],
        # eval(): the table stays at lam0, so every call sees the temperatures the reference starts from.
        "aldr_kl": [
            (get("aldr_kl", num_samples=N).eval(), lambda z, y: W.aldr_step(z, y, ids, table)[0], {"sample_ids": ids})
        ],
    }
    if name in special:
        return special[name]
    return [(get(name), R.REFERENCES[name], None)]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, C, (N,), generator=g)
    v = torch.randn(N, C, generator=g, dtype=torch.float64)
    return z, y, v


def second_order(loss_fn, z, v):
    """``(H v, d/dz [L + ||dL/dz||^2])`` with ``L = loss_fn(z)``, by double backward."""
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    x = z.clone().requires_grad_()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(loss + (g * g).sum(), x)
    return hv, penalty_grad


ALL = [(name, k) for name in sorted(registered()) for k in range(len(cases(name)))]


@pytest.mark.parametrize("name,k", ALL, ids=[f"{n}-{k}" for n, k in ALL])
def test_hessian_vector_product_and_gradient_penalty_equal_autograd_on_the_formula(name, k):
    obj, ref, extra = cases(name)[k]
    z, y, v = inputs(k)
    ours = second_order(lambda x: xe.cross_entropy(x, y, loss=obj, extra=extra), z, v)
    expected = second_order(lambda x: ref(x, y).mean(), z, v)
    for got, want in zip(ours, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_every_registered_loss_has_a_second_order_case():
    assert {name for name, _ in ALL} == set(registered())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_options_weights_and_upstream_gradients_against_torch(reduction):
    """CE with weights, ignored rows, smoothing and softcap against ``F.cross_entropy``'s own double backward."""
    z, y, v = inputs(3)
    y[1] = -100
    w = torch.linspace(0.3, 2.0, C, dtype=torch.float64)
    upstream = torch.linspace(0.5, 1.5, N, dtype=torch.float64)

    def run(fn, cap):
        def loss(x):
            out = fn(cap(x), y, weight=w, ignore_index=-100, label_smoothing=0.2, reduction=reduction)
            return (out * upstream).sum() if reduction == "none" else out

        return loss

    def ours(x):
        out = xe.cross_entropy(x, y, weight=w, label_smoothing=0.2, softcap=3.0, reduction=reduction)
        return (out * upstream).sum() if reduction == "none" else out

    got = second_order(ours, z, v)
    want = second_order(run(F.cross_entropy, lambda x: 3.0 * torch.tanh(x / 3.0)), z, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_probability_targets_and_a_differentiable_upstream():
    """Soft targets (the generic path), and ``grad_outputs`` that require grad (a mixed second derivative)."""
    z, _, v = inputs(4)
    q = torch.softmax(torch.randn(N, C, dtype=torch.float64), -1)
    got = second_order(lambda x: xe.cross_entropy(x, q, label_smoothing=0.1), z, v)
    want = second_order(lambda x: F.cross_entropy(x, q, label_smoothing=0.1), z, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    x = z.clone().requires_grad_()
    u = torch.rand(N, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    (g,) = torch.autograd.grad(xe.cross_entropy(x, y, reduction="none"), x, u, create_graph=True)
    (gu,) = torch.autograd.grad((g * v).sum(), u)
    x2 = z.clone().requires_grad_()
    (g2,) = torch.autograd.grad(F.cross_entropy(x2, y, reduction="none"), x2, u, create_graph=True)
    (gu2,) = torch.autograd.grad((g2 * v).sum(), u)
    torch.testing.assert_close(gu, gu2, rtol=1e-12, atol=1e-12)


def test_first_order_gradient_is_unchanged_under_create_graph():
    z, y, _ = inputs(5)
    for loss in ("ce", "nce", "ldr_kl"):
        a = z.clone().requires_grad_()
        (plain,) = torch.autograd.grad(xe.cross_entropy(a, y, loss=loss), a)
        (graphed,) = torch.autograd.grad(xe.cross_entropy(a, y, loss=loss), a, create_graph=True)
        assert graphed.requires_grad
        torch.testing.assert_close(graphed.detach(), plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["ce", "nce", "nfl"])
def test_row_chunked_engine_refuses_create_graph_by_name(reduction, loss):
    e = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(C, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (6,))
    out = xe.linear_cross_entropy(e, c, y, loss=loss, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match=r"'row-chunked' engine has no second derivatives.*crossent.cross_entropy"):
        torch.autograd.grad(out, (e, c), create_graph=True)
    # First-order gradients are unaffected, and match the dense engine.
    out = xe.linear_cross_entropy(e, c, y, loss=loss, reduction=reduction).sum()
    grads = torch.autograd.grad(out, (e, c))
    dense = torch.autograd.grad(xe.cross_entropy(e @ c.T, y, loss=loss, reduction=reduction).sum(), (e, c))
    for a, b in zip(grads, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_triton_engine_refuses_create_graph_by_name():
    pytest.importorskip("triton")
    from crossent._engine.triton import launch

    if launch.INTERPRETED == torch.cuda.is_available():
        pytest.skip("the triton kernels were built for another device (TRITON_INTERPRET)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e = torch.randn(6, 3, device=device, requires_grad=True)
    c = torch.randn(C, 3, device=device, requires_grad=True)
    out = xe.linear_cross_entropy(e, c, torch.randint(0, C, (6,), device=device), backend="triton")
    with pytest.raises(RuntimeError, match=r"'triton' engine has no second derivatives"):
        torch.autograd.grad(out, (e, c), create_graph=True)


def test_vocab_parallel_engine_refuses_create_graph_by_name():
    z, y, _ = inputs(6)
    x = z.clone().requires_grad_()
    out = vocab_parallel_cross_entropy(x, y, vocab_start=0, loss="ldr_kl")
    with pytest.raises(RuntimeError, match=r"'vocab-parallel' engine has no second derivatives"):
        torch.autograd.grad(out, x, create_graph=True)


def test_sigmoid_focal_hessian_is_finite_with_binary_targets_and_large_logits():
    z = torch.tensor([[30.0, -30.0, 0.5], [-40.0, 2.0, 60.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    v = torch.ones_like(z)
    got = second_order(lambda x: xe.cross_entropy(x, y, loss="sigmoid_focal"), z, v)
    want = second_order(lambda x: W.sigmoid_focal_rows(x, y).mean(), z, v)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert math.isfinite(xe.losses.sigmoid_focal_loss(z, torch.zeros_like(z), gamma=0.5).sum().item())


# -- distillation: every divergence on the dense engine; the fused form refuses --------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded_vocabulary"])
@pytest.mark.parametrize("divergence,hp", CASES, ids=CASE_IDS)
def test_distillation_second_derivatives_equal_autograd_on_the_formula(divergence, hp, padded):
    """Found as: ``jsd`` and ``akl`` (whole rows, a closed-form gradient) gave under
    ``create_graph=True`` a gradient without a graph. A padded vocabulary (-inf in both) is dropped."""
    z, _, v = inputs(7)
    t = torch.randn(N, C, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 1.5
    keep = slice(0, C - 2) if padded else slice(0, C)
    if padded:
        z[:, keep.stop :] = t[:, keep.stop :] = float("-inf")
    kw = dict(divergence=divergence, temperature=1.3, **hp)
    ours = second_order(lambda x: xe.distillation(x, t, **kw), z, v)
    def reference(x):
        return reference_divergence(x, t[:, keep], divergence, 1.3, **hp).mean()

    expected = second_order(reference, z[:, keep], v[:, keep])
    for got, want in zip(ours, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, keep], want, rtol=1e-9, atol=1e-11)
        assert (got[:, keep.stop :] == 0).all()


@pytest.mark.parametrize("divergence,hp", CASES, ids=CASE_IDS)
def test_linear_distillation_refuses_create_graph_by_name(divergence, hp):
    e = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(C, 3, dtype=torch.float64, requires_grad=True)
    e_t, c_t = torch.randn(6, 4, dtype=torch.float64), torch.randn(C, 4, dtype=torch.float64)
    out = xe.linear_distillation(e, c, e_t, c_t, divergence=divergence, **hp)
    with pytest.raises(RuntimeError, match=r"'row-chunked' engine has no second derivatives"):
        torch.autograd.grad(out, (e, c), create_graph=True)
