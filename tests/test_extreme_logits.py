"""Logits of any finite size: ties at 1e16 and 1e30 (float32), near-ties at 1e10 (float64), every engine.

A log-sum-exp held as one float64 number loses its small log term next to a large maximum (1e16 + log 4
rounds to 1e16). Every shift-invariant loss must give the value and gradient of the same rows moved to
a maximum of 0, which the float64 references here compute (``reference_streaming.py``). Engines: dense
(``cross_entropy``), row-chunked (``linear_cross_entropy``, with ``e`` and ``c`` whose products are the
rows exactly; its Triton backend too), vocabulary-parallel (the engine's own steps over column shards
in one process, and two gloo processes). Tolerances: 1e-6 relative for float32 (its rounding of the
result), 1e-15 for float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
import reference_streaming as R
from _gloo import check, run_cases
from crossent._engine.plan import Plan
from crossent._rows import index_rows
from crossent.distributed import vocab_parallel_cross_entropy
from crossent.losses._build import build_loss

C = 4
WEIGHT = torch.tensor([0.5, 2.0, 1.25, 0.75])

#: name -> (crossent arguments, float64 reference per-row function of (z, y))
LOSSES = {
    "ce": (dict(loss="ce"), R.ce),
    "smoothing": (
        dict(loss="ce", label_smoothing=0.1),
        lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1, reduction="none"),
    ),
    "weighted_smoothing": (
        dict(loss="ce", label_smoothing=0.1, weight=WEIGHT),
        lambda z, y: F.cross_entropy(z, y, weight=WEIGHT.double(), label_smoothing=0.1, reduction="none"),
    ),
    "focal": (dict(loss="focal"), R.focal),
    "nce": (dict(loss="nce"), R.nce),
    "ngce": (dict(loss="ngce"), R.ngce),
}
#: Class weights on the row-chunked engine: test_fused_column_sums_are_exact_for_exact_products.
FUSED = ("ce", "smoothing", "focal", "nce", "ngce")


def tied_rows(v: float, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ties at +-v: all equal, two against two, the target far below the rest."""
    z = torch.tensor([[v, v, v, v], [v, v, -v, -v], [-v, v, v, v]], dtype=dtype)
    return z, torch.tensor([0, 1, 0])


def near_ties() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rows at 1e10 that differ by O(1): 1e10 + s_i d_j, every entry exact."""
    d = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([1.0, -1.0, 0.25], dtype=torch.float64)
    return 1e10 + s[:, None] * d[None, :], torch.tensor([1, 3, 0])


CASES = [
    ("f32-ties-1e16", *tied_rows(1e16)),
    ("f32-ties-1e30", *tied_rows(1e30)),
    ("f64-ties-1e10", *tied_rows(1e10, torch.float64)),
    ("f64-near-ties-1e10", *near_ties()),
]


def expected(name, z, y):
    """Value and gradient (of the sum of rows) from the float64 reference on the rows moved to max 0."""
    _, ref = LOSSES[name]
    zr = (z.double() - z.double().amax(-1, keepdim=True)).requires_grad_()
    out = ref(zr, y)
    (grad,) = torch.autograd.grad(out.sum(), zr)
    return out.detach(), grad


def tol(dtype):
    return dict(rtol=1e-6, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-15, atol=1e-300)


def grad_tol(dtype):
    return dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_engine(name, case):
    _, z, y = case
    kw, _ = LOSSES[name]
    x = z.clone().requires_grad_()
    out = xe.cross_entropy(x, y, reduction="none", **kw)
    out.sum().backward()
    want, want_grad = expected(name, z, y)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, **tol(z.dtype))
    torch.testing.assert_close(x.grad.double(), want_grad, **grad_tol(z.dtype))


def factors(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``e``, ``c`` with ``e @ c.T == z`` exactly, and exact sums of the columns of ``c``."""
    v = z.abs().amax().item()
    if torch.equal(z.abs(), torch.full_like(z, v)):  # rows of +-v: e picks v, c holds the signs
        return torch.eye(z.shape[0], dtype=z.dtype) * v, (z / v).T.contiguous()
    d = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([1.0, -1.0, 0.25], dtype=torch.float64)
    assert torch.equal(1e10 + s[:, None] * d[None, :], z)
    return torch.stack([torch.full_like(s, 1e10), s], 1), torch.stack([torch.ones_like(d), d], 1)


@pytest.mark.parametrize("mode", ["eager", "recompute"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", FUSED)
def test_row_chunked_engine(name, case, mode):
    _, z, y = case
    kw, _ = LOSSES[name]
    e, c = factors(z)
    assert torch.equal(e @ c.T, z)
    e, c = e.requires_grad_(), c.requires_grad_()
    reduction = "sum" if mode == "eager" else "none"
    out = xe.linear_cross_entropy(e, c, y, reduction=reduction, options=xe.LinearCrossEntropyOptions(mode=mode), **kw)
    out.sum().backward()
    want, want_grad = expected(name, z, y)
    got = out if reduction == "none" else out.reshape(1)
    torch.testing.assert_close(got.double(), want if reduction == "none" else want.sum().reshape(1), **tol(z.dtype))
    torch.testing.assert_close(e.grad.double(), want_grad @ c.detach().double(), **grad_tol(z.dtype))
    scale = e.detach().abs().amax().item()  # grad_c = G^T e carries the size of e
    want_c = want_grad.T @ e.detach().double()
    torch.testing.assert_close(c.grad.double() / scale, want_c / scale, **grad_tol(z.dtype))


def test_row_chunked_engine_without_an_in_place_softmax():
    """The route of devices without an in-place softmax: lse from the row maximum and the normaliser."""
    from crossent._engine.options import tuned

    with tuned(fused_softmax=False):
        for case in CASES:
            for name in ("ce", "smoothing", "nce"):
                for mode in ("eager", "recompute"):
                    test_row_chunked_engine(name, case, mode)


def triton_device() -> str:
    """The device the Triton kernels run on here (skips when Triton is missing or built for another)."""
    pytest.importorskip("triton")
    from crossent._engine.triton import launch

    if launch.INTERPRETED == torch.cuda.is_available():
        pytest.skip("the triton kernels were built for another device (TRITON_INTERPRET)")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_triton_engine(case):
    """The Triton backend's split states merge as (max, log-sum) pairs too (float32: its only full-precision dtype)."""
    device = triton_device()
    _, z, y = case
    for name in FUSED:
        kw, _ = LOSSES[name]
        e, c = (t.to(device).requires_grad_() for t in factors(z))
        out = xe.linear_cross_entropy(e, c, y.to(device), reduction="none", backend="triton", **kw)
        out.sum().backward()
        want, want_grad = expected(name, z, y)
        torch.testing.assert_close(out.double().cpu(), want, **tol(z.dtype))
        torch.testing.assert_close(e.grad.double().cpu(), want_grad @ c.detach().double().cpu(), **grad_tol(z.dtype))


def shards(z, y, bounds, **kw):
    """The vocabulary-parallel engine's steps over column shards in one process (per-row loss, gradient).

    Each shard's statistic states are merged in shard order (what the all-gather of every rank does),
    then each shard gets its own columns' gradient from the merged values.
    """
    weight = kw.pop("weight", None)
    loss = build_loss(kw.pop("loss"), label_smoothing=kw.pop("label_smoothing", 0.0))
    rows = index_rows(y, z.shape[1], -100, None if weight is None else weight.to(z.dtype))
    plan = Plan(loss, rows)
    cols = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    values = plan.merge_states([plan.partial_states(z[:, s], rows, s) for s in cols])
    per_row = plan.row_losses(values, rows)
    coefs = plan.coefficients(values, rows, torch.ones(z.shape[0], dtype=torch.float64))
    grad = torch.cat([plan.logit_grad(z[:, s], rows, values, coefs, s) for s in cols], 1)
    return per_row, grad


@pytest.mark.parametrize("bounds", [(0, 2, 4), (0, 1, 3, 4), (0, 3, 3, 4)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", list(LOSSES))
def test_vocab_parallel_engine_over_shards(name, case, bounds):
    _, z, y = case
    kw, _ = LOSSES[name]
    per_row, grad = shards(z, y, bounds, **dict(kw))
    want, want_grad = expected(name, z, y)
    torch.testing.assert_close(per_row, want, **tol(z.dtype))
    torch.testing.assert_close(grad.double(), want_grad, **grad_tol(z.dtype))


def test_vocab_parallel_single_process_and_the_issue_example():
    z = torch.full((1, 4), 1e20, requires_grad=True)
    vocab_parallel_cross_entropy(z, torch.tensor([0]), vocab_start=0).backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.75, 0.25, 0.25, 0.25]]))
    _, grad = shards(z.detach(), torch.tensor([0]), (0, 2, 4), loss="ce")
    torch.testing.assert_close(grad, torch.tensor([[-0.75, 0.25, 0.25, 0.25]]))


def test_nce_and_ngce_are_finite_on_tied_rows_at_1e30():
    z, y = tied_rows(1e30)
    for loss in ("nce", "ngce"):
        x = z.clone().requires_grad_()
        out = xe.cross_entropy(x, y, loss=loss, reduction="none")
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(out[0], torch.tensor(0.25))


def test_return_stats_lse_keeps_its_tail():
    e, c = factors(tied_rows(1e10, torch.float64)[0])
    _, stats = xe.linear_cross_entropy(e, c, torch.tensor([0, 1, 0]), return_stats=True)
    torch.testing.assert_close(stats.lse.double(), torch.full((3,), 1e10, dtype=torch.float64), rtol=1e-12, atol=0)
    z = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    e = torch.eye(1, dtype=torch.float64)
    _, stats = xe.linear_cross_entropy(e, z.T.contiguous(), torch.tensor([0]), return_stats=True)
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, -1).float())


def test_fused_column_sums_are_exact_for_exact_products():
    """Class-weighted smoothing on ties of exactly representable products (float64, where c^T w is exact)."""
    z = torch.tensor([[1e10] * 4, [1e10, 1e10, -1e10, -1e10]], dtype=torch.float64)
    w = torch.tensor([0.5, 2.0, 1.25, 0.75], dtype=torch.float64)
    y = torch.tensor([0, 1])
    e, c = torch.eye(2, dtype=torch.float64) * 1e10, (z / 1e10).T.contiguous()
    out = xe.linear_cross_entropy(e, c, y, weight=w, label_smoothing=0.1, reduction="none")
    want = F.cross_entropy(z - z.amax(-1, keepdim=True), y, weight=w, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)


def _two_ranks(rank: int, world: int):
    """Each of two gloo ranks holds two of the four classes."""
    lo, hi = (0, 2) if rank == 0 else (2, 4)
    x = torch.full((1, 2), 1e20, requires_grad=True)
    vocab_parallel_cross_entropy(x, torch.tensor([0]), vocab_start=lo, vocab_size=4).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.75, 0.25, 0.25, 0.25]])[:, lo:hi])
    for _, z, y in CASES:
        for name in LOSSES:
            x = z[:, lo:hi].clone().requires_grad_()
            out = vocab_parallel_cross_entropy(x, y, vocab_start=lo, vocab_size=4, reduction="none", **LOSSES[name][0])
            out.sum().backward()
            want, want_grad = expected(name, z, y)
            torch.testing.assert_close(out.double(), want, **tol(z.dtype))
            torch.testing.assert_close(x.grad.double(), want_grad[:, lo:hi], **grad_tol(z.dtype))


@pytest.mark.slow
def test_vocab_parallel_engine_on_two_gloo_ranks():
    check(run_cases(2, {"extreme_logits": _two_ranks}, timeout=120, gloo_timeout=20), "extreme_logits")


# -- class-probability targets at large logits, against PyTorch's own error ----------------------------
PROB_CASES = [
    (torch.bfloat16, 30.0), (torch.bfloat16, 330.0), (torch.float16, 30.0),
    (torch.float32, 30.0), (torch.float32, 330.0),
]  # fmt: skip


def _prob_errors(fn, z, q, target_grad):
    """Largest errors of the value, the logit gradient and (optionally) the target gradient against float64."""
    zr, qr = z.double().requires_grad_(), q.double().requires_grad_()
    ref = F.cross_entropy(zr, qr, reduction="none")
    ref_gz, ref_gq = torch.autograd.grad(ref.sum(), (zr, qr))
    x, t = z.clone().requires_grad_(), q.clone().requires_grad_(target_grad)
    out = fn(x, t, reduction="none")
    grads = torch.autograd.grad(out.sum(), (x, t) if target_grad else (x,))
    errors = [(out.double() - ref).abs().max().item(), (grads[0].double() - ref_gz).abs().max().item()]
    if target_grad:
        errors.append((grads[1].double() - ref_gq).abs().max().item())
    return errors


@pytest.mark.parametrize("target_grad", [False, True], ids=["fixed-target", "target-grad"])
@pytest.mark.parametrize("dtype,offset", PROB_CASES, ids=[f"{d}-{o:g}".replace("torch.", "") for d, o in PROB_CASES])
def test_probability_targets_at_large_logits_are_as_precise_as_torch(dtype, offset, target_grad):
    """``mass * lse - sum q z`` cancels at large logits, and a half-precision target's gradient
    ``lse - z_k`` must not be rounded in two pieces: every error is at most PyTorch's own."""
    g = torch.Generator().manual_seed(0)
    z = (offset + torch.randn(64, 50, generator=g, dtype=torch.float64)).to(dtype)
    q = torch.softmax(torch.randn(64, 50, generator=g, dtype=torch.float64), -1).to(dtype)
    ours = _prob_errors(xe.cross_entropy, z, q, target_grad)
    theirs = _prob_errors(F.cross_entropy, z, q, target_grad)
    for what, a, b in zip(("value", "logit gradient", "target gradient"), ours, theirs):
        assert a <= b + 1e-12, f"{what}: crossent {a:.3g} > torch {b:.3g}"
