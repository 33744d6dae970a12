"""crossent.linear_cross_entropy against the dense path, F.cross_entropy, and formulas written here.

Tolerances: float64 1e-10; float32 1e-5 relative (to the largest entry of the reference); bfloat16
and float16 are compared with the float32 reference of the same rounded inputs, within 2e-2 relative
(loss) and 3e-2 (gradients), the same order as the naive path's own half-precision error.
"""

from __future__ import annotations

import weakref
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import crossent as xe
from crossent._engine import chunked, options as chunk_options
from crossent.losses import Loss
from crossent.losses._base import log_prob_target
from crossent.stats import LSE, SUMSQ, TARGET, SumProbPower
from crossent.transforms import ClassBias, Temperature

# -- losses defined here, from their formulas -------------------------------------------------------


class FocalLike(Loss):
    """Softmax focal loss over lse / target: -(1 - p_y)^gamma log p_y."""

    def __init__(self, gamma=2.0):
        self.gamma = gamma

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        return -((1 - logp.exp()) ** self.gamma) * logp


class Squentropy(Loss):
    """CE plus the mean square of the non-target logits: reads SUMSQ."""

    def statistics(self, rows):
        return (LSE, TARGET, SUMSQ)

    def row_loss(self, s, rows):
        zy = s[TARGET]
        return s[LSE] - zy + (s[SUMSQ] - zy * zy) / (rows.num_classes - 1)


class PowerMix(Loss):
    """GCE-like term plus sum_j p_j^2: reads SumProbPower."""

    def statistics(self, rows):
        return (LSE, TARGET, SumProbPower(2.0))

    def row_loss(self, s, rows):
        logp = log_prob_target(s, rows)
        return (1 - torch.exp(0.7 * logp)) / 0.7 + 0.5 * s[SumProbPower(2.0)]


class EntropyPenalised(Loss):
    """A whole-row loss (streamable = False): NLL + 0.3 * sum_j p_j log p_j, via autograd on the row."""

    streamable = False

    def dense_row_loss(self, z, rows):
        logp = z.log_softmax(-1)
        nll = -logp.gather(-1, rows.target[:, None]).squeeze(-1)
        out = nll + 0.3 * (logp.exp() * logp).sum(-1)
        w = rows.target_weight()
        return out if w is None else out * w.to(out.dtype)


class Piecewise(Loss):
    """CE on rows with a positive target logit, -z_y / 2 elsewhere: lse's coefficient is zero on some rows."""

    def statistics(self, rows):
        return (LSE, TARGET)

    def row_loss(self, s, rows):
        zy = s[TARGET]
        return torch.where(zy > 0, s[LSE] - zy, -0.5 * zy)


def focal_reference(logits, target, gamma=2.0):
    logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    return -((1 - logp.exp()) ** gamma) * logp


# -- helpers ------------------------------------------------------------------------------------------


def make(n=37, d=8, v=50, dtype=torch.float64, bias=True, seed=0, ignore=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        if i < n:
            t[i] = -100
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(e), cast(c), cast(b), t


def close(actual, expected, rel):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.detach().abs().max().item(), 1e-12) if expected.numel() else 1.0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def run_both(e, c, b, t, upstream=None, grads=(True, True, True), **kw):
    """Loss and gradients from linear_cross_entropy and from the dense path on the same inputs."""
    out = []
    for fn in ("linear", "dense"):
        leaves = [x.detach().clone().requires_grad_(g) if x is not None else None for x, g in zip((e, c, b), grads)]
        le, lc, lb = leaves
        if fn == "linear":
            loss = xe.linear_cross_entropy(le, lc, t, bias=lb, **kw)
        else:
            dense_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend", "options")}
            logits = le @ lc.T + (lb if lb is not None else 0)
            loss = xe.cross_entropy(logits, t, **dense_kw)
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        gs = ()
        if wrt and loss.requires_grad:
            up = torch.ones_like(loss) if upstream is None else upstream
            gs = torch.autograd.grad(loss, wrt, up)
        out.append((loss.detach(), gs))
    return out


def assert_agree(e, c, b, t, rel, **kw):
    (l1, g1), (l2, g2) = run_both(e, c, b, t, **kw)
    close(l1, l2, rel)
    assert len(g1) == len(g2)
    for x, y in zip(g1, g2):
        assert x.dtype == y.dtype
        close(x, y, rel)


LOSSES = {
    "ce": dict(),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.5),
    "registry_z_loss": dict(loss="z_loss"),
    "focal": dict(loss=FocalLike()),
    "sumsq": dict(loss=Squentropy()),
    "sum_p_pow": dict(loss=PowerMix()),
    "whole_row": dict(loss=EntropyPenalised()),
    "piecewise": dict(loss=Piecewise()),
    "temperature_bias": dict(loss=xe.losses.Transformed(FocalLike(1.5), Temperature(1.7), ClassBias(torch.linspace(-1, 1, 50)))),
    # Sum statistics under affine transforms (the engine forms the row sums from e and c, then transforms them).
    "smoothing_temperature_bias": dict(loss=xe.losses.Transformed(xe.losses.CrossEntropy(0.1), Temperature(1.7), ClassBias(torch.linspace(-1, 1, 50)))),
    "smoothing_bias_temperature": dict(loss=xe.losses.Transformed(xe.losses.CrossEntropy(0.1), ClassBias(torch.linspace(2, -1, 50)), Temperature(0.6))),
    "composed": dict(loss=xe.losses.CrossEntropy(0.05) + 0.5 * FocalLike(), z_loss=1e-3, softcap=4.0),
}


# -- agreement with the dense path ----------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_float64(name, reduction):
    e, c, b, t = make()
    assert_agree(e, c, b, t, 1e-10, reduction=reduction, chunk_size=8, **LOSSES[name])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_loss_float32(name, reduction):
    e, c, b, t = make(dtype=torch.float32)
    w = torch.rand(t.shape[0], generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    assert_agree(e, c, b, t, 1e-5, reduction=reduction, chunk_size=8, upstream=w, **LOSSES[name])


@pytest.mark.parametrize("name", ["ce", "label_smoothing", "focal", "sumsq", "whole_row"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights(name, reduction):
    e, c, b, t = make()
    weight = torch.rand(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    assert_agree(e, c, b, t, 1e-10, reduction=reduction, weight=weight, chunk_size=5, **LOSSES[name])


def test_focal_against_formula():
    e, c, b, t = make(ignore=())
    ref = focal_reference(e @ c.T + b, t).mean()
    close(xe.linear_cross_entropy(e, c, t, bias=b, loss=FocalLike(), chunk_size=6), ref, 1e-12)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_combinations(grads, reduction):
    e, c, b, t = make()
    assert_agree(e, c, b, t, 1e-10, reduction=reduction, grads=grads, chunk_size=7, label_smoothing=0.1, z_loss=1e-2)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 36, 37, 1000])
def test_chunk_sizes_that_do_not_divide_n(chunk_size):
    e, c, b, t = make()
    assert_agree(e, c, b, t, 1e-10, chunk_size=chunk_size, z_loss=1e-3)


@pytest.mark.parametrize("name", ["ce", "focal", "sumsq", "whole_row", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recompute_mode_matches_eager(name, reduction):
    e, c, b, t = make()
    eager = run_both(e, c, b, t, reduction=reduction, chunk_size=6, **LOSSES[name])[0]
    recompute_mode = chunk_options.LinearCrossEntropyOptions(mode="recompute")
    recompute, dense = run_both(e, c, b, t, reduction=reduction, chunk_size=6, options=recompute_mode, **LOSSES[name])
    for got in (eager, recompute):
        close(got[0], dense[0], 1e-10)
        for x, y in zip(got[1], dense[1]):
            close(x, y, 1e-10)


def test_upstream_scale_and_non_scalar_upstream():
    e, c, b, t = make()
    (l1, g1), (l2, g2) = run_both(e, c, b, t, upstream=torch.tensor(3.5, dtype=torch.float64), chunk_size=9)
    close(l1, l2, 1e-12)
    for x, y in zip(g1, g2):
        close(x, y, 1e-10)
    up = torch.randn(t.shape[0], dtype=torch.float64)
    assert_agree(e, c, b, t, 1e-10, reduction="none", upstream=up, chunk_size=9, z_loss=1e-2)


def test_backward_through_loss_expression():
    e, c, b, t = make()
    leaves = [x.clone().requires_grad_() for x in (e, c, b)]
    (2.0 * xe.linear_cross_entropy(*leaves[:2], t, bias=leaves[2], chunk_size=4) + 1.0).backward()
    ref = [x.clone().requires_grad_() for x in (e, c, b)]
    (2.0 * xe.cross_entropy(ref[0] @ ref[1].T + ref[2], t) + 1.0).backward()
    for x, y in zip(leaves, ref):
        close(x.grad, y.grad, 1e-10)


def test_eager_gradient_refuses_a_second_backward():
    e, c, b, t = make()
    e.requires_grad_()
    loss = xe.linear_cross_entropy(e, c, t, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated once"):
        loss.backward()


@pytest.mark.parametrize("name", ["ce", "focal", "whole_row", "label_smoothing"])
def test_no_grad_forward(name):
    e, c, b, t = make()
    e.requires_grad_()
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            got = xe.linear_cross_entropy(e, c, t, bias=b, reduction=reduction, chunk_size=5, **LOSSES[name])
            assert not got.requires_grad
            dense_kw = {k: v for k, v in LOSSES[name].items()}
            close(got, xe.cross_entropy(e @ c.T + b, t, reduction=reduction, **dense_kw), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift(reduction):
    g = torch.Generator().manual_seed(5)
    e = torch.randn(3, 9, 8, generator=g, dtype=torch.float64)
    c = torch.randn(40, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 40, (3, 9), generator=g)
    t[0, 0] = 12345  # dropped by the shift: never range-checked
    t[1, 4] = -100
    ref_t = t[:, 1:]
    el, cl = e.clone().requires_grad_(), c.clone().requires_grad_()
    got = xe.linear_cross_entropy(el, cl, t, shift=True, reduction=reduction, chunk_size=4, z_loss=1e-3)
    er, cr = e.clone().requires_grad_(), c.clone().requires_grad_()
    ref = xe.cross_entropy((er[:, :-1] @ cr.T).reshape(-1, 40), ref_t.reshape(-1), reduction=reduction, z_loss=1e-3)
    if reduction == "none":
        ref = ref.reshape(3, 8)
    close(got, ref, 1e-12)
    up = torch.rand_like(ref)
    torch.autograd.backward(got, up)
    torch.autograd.backward(ref, up)
    close(el.grad, er.grad, 1e-10)
    close(cl.grad, cr.grad, 1e-10)
    assert el.grad[:, -1].abs().max() == 0


def test_shift_does_not_copy_e():
    e = torch.randn(2, 6, 4, requires_grad=True)
    c = torch.randn(10, 4)
    t = torch.randint(0, 10, (2, 6))
    copies = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            reads_e = any(a is e or (isinstance(a, torch.Tensor) and a._base is e) for a in args)
            if reads_e and not name.endswith("_") and isinstance(out, torch.Tensor) and out.numel() > 3 * 4:
                if out.untyped_storage().data_ptr() != e.untyped_storage().data_ptr():
                    copies.append((func, tuple(out.shape)))
            return out

    with Spy():
        xe.linear_cross_entropy(e, c, t, shift=True, chunk_size=3).backward()
    assert not copies


def test_one_dimensional_sequence_and_unbatched_shift():
    e, c, _, t = make(n=10, ignore=())
    got = xe.linear_cross_entropy(e, c, t, shift=True)
    close(got, F.cross_entropy(e[:-1] @ c.T, t[1:]), 1e-12)


def test_matches_torch_cross_entropy():
    e, c, b, t = make(dtype=torch.float32)
    for reduction in ("mean", "sum", "none"):
        for kw in (dict(), dict(label_smoothing=0.2), dict(weight=torch.rand(50) + 0.5)):
            got = xe.linear_cross_entropy(e, c, t, bias=b, reduction=reduction, chunk_size=10, **kw)
            close(got, F.cross_entropy(e @ c.T + b, t, reduction=reduction, **kw), 1e-5)


def test_empty_batch_and_all_ignored():
    e, c, b, _ = make()
    for n in (0, 5):
        t = torch.full((n,), -100)
        ee = e[:n].clone().requires_grad_()
        cc = c.clone().requires_grad_()
        for reduction in ("mean", "sum"):
            loss = xe.linear_cross_entropy(ee, cc, t, bias=b, reduction=reduction)
            assert loss.item() == 0.0
            ge, gc = torch.autograd.grad(loss, (ee, cc))
            assert ge.shape == ee.shape and gc.abs().max() == 0 and (ge.numel() == 0 or ge.abs().max() == 0)
        assert xe.linear_cross_entropy(ee, cc, t, reduction="none").shape == (n,)


def test_extreme_logits_are_finite():
    e, c, b, t = make(dtype=torch.float32)
    e = e * 1e4
    for kw in (dict(), dict(z_loss=1e-4, label_smoothing=0.1), dict(loss=FocalLike()), dict(softcap=30.0)):
        el = e.clone().requires_grad_()
        loss = xe.linear_cross_entropy(el, c, t, bias=b, chunk_size=8, **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(el.grad).all()
        ref = xe.cross_entropy(e @ c.T + b, t, **kw)
        close(loss, ref, 1e-5)


def test_return_stats():
    e, c, b, t = make()
    loss, stats = xe.linear_cross_entropy(e, c, t, bias=b, return_stats=True, chunk_size=8, softcap=3.0)
    z = 3.0 * torch.tanh((e @ c.T + b) / 3.0)
    close(stats.lse, torch.logsumexp(z, -1), 1e-6)
    assert stats.lse.dtype == torch.float32
    assert torch.equal(stats.argmax, z.argmax(-1))
    close(loss, xe.cross_entropy(e @ c.T + b, t, softcap=3.0), 1e-12)
    for name in ("focal", "whole_row", "sumsq"):
        _, s = xe.linear_cross_entropy(e, c, t, bias=b, return_stats=True, reduction="none", **LOSSES[name])
        close(s.lse, torch.logsumexp(e @ c.T + b, -1), 1e-6)
    g = torch.Generator().manual_seed(3)
    e3, t3 = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 50, (2, 5), generator=g)
    _, s = xe.linear_cross_entropy(e3, c, t3, shift=True, return_stats=True)
    assert s.lse.shape == (2, 4) and s.argmax.shape == (2, 4)
    assert torch.equal(s.argmax, (e3[:, :-1] @ c.T).argmax(-1))


def test_extra_rows_follow_the_shift_and_the_skipped_rows():
    class ScaledByExtra(Loss):
        def statistics(self, rows):
            return (LSE, TARGET)

        def row_loss(self, s, rows):
            return (s[LSE] - s[TARGET]) * rows.extra["scale"]

    g = torch.Generator().manual_seed(9)
    e = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    c = torch.randn(30, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 30, (2, 7), generator=g)
    t[0, 3] = -100
    scale = torch.rand(2, 7, generator=g, dtype=torch.float64)
    got = xe.linear_cross_entropy(e, c, t, loss=ScaledByExtra(), shift=True, reduction="none", extra={"scale": scale}, chunk_size=3)
    ref = F.cross_entropy((e[:, :-1] @ c.T).reshape(-1, 30), t[:, 1:].reshape(-1), reduction="none").reshape(2, 6)
    close(got, ref * scale[:, 1:], 1e-12)


# -- memory: no [N, V] tensor, no extra work in backward -----------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the size of every tensor an op allocates (views and in-place results share an input's
    storage and are not counted; nor are tensors of the ``skip`` shapes)."""

    def __init__(self, skip=()):
        super().__init__()
        self.skip = {tuple(s) for s in skip}
        self.largest = 0
        self.ops = []
        self.created = set()  # (dtype, numel) of every tensor counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(func)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs if a.numel()}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.skip:
                if t.numel() and t.untyped_storage().data_ptr() not in seen:
                    self.largest = max(self.largest, t.numel())
                    self.created.add((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("name", ["ce", "label_smoothing", "focal", "sumsq", "sum_p_pow", "whole_row", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_logit_matrix_is_ever_allocated(name, reduction, dtype):
    n, d, v, chunk = 64, 8, 300, 8
    e, c, b, t = make(n=n, d=d, v=v, dtype=dtype)
    e.requires_grad_(), c.requires_grad_(), b.requires_grad_()
    with LargestTensor(skip=[c.shape]) as rec:
        loss = xe.linear_cross_entropy(e, c, t, bias=b, chunk_size=chunk, reduction=reduction, **LOSSES[name])
        loss.sum().backward()
    assert rec.largest <= chunk * v, rec.largest
    # the recorder does see a materialised matrix
    with LargestTensor(skip=[c.shape]) as naive:
        F.cross_entropy(e @ c.T + b, t).backward()
    assert naive.largest >= n * v


def test_eager_backward_does_no_matrix_product_and_no_copy():
    e, c, b, t = make(n=40, d=8, v=300, dtype=torch.float32)
    for x in (e, c, b):
        x.requires_grad_()
    loss = xe.linear_cross_entropy(e, c, t, bias=b, chunk_size=8)
    with LargestTensor() as rec:
        loss.backward()
    assert not [f for f in rec.ops if "mm" in str(f)]
    assert rec.largest <= 1  # upstream gradient 1: the precomputed gradients are handed over as they are
    loss = xe.linear_cross_entropy(e, c, t, bias=b, chunk_size=8, reduction="none")
    with LargestTensor() as rec:
        loss.sum().backward()
    assert [f for f in rec.ops if "mm" in str(f)]  # recompute mode


# -- precision, autocast, torch.compile, module ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ce", "z_loss", "focal", "sumsq", "whole_row", "label_smoothing"])
@pytest.mark.parametrize("accum", ["float32", "input"])
def test_half_precision(dtype, name, accum):
    e, c, b, t = make(n=48, d=16, v=80, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (e, c, b)]
    accum_dtype = dtype if accum == "input" else torch.float32
    loss = xe.linear_cross_entropy(*leaves[:2], t, bias=leaves[2], chunk_size=16, accum_dtype=accum_dtype, **LOSSES[name])
    loss.backward()
    assert loss.dtype == torch.float32 and all(x.grad.dtype == dtype for x in leaves)
    ref = [x.float().requires_grad_() for x in (e, c, b)]
    rloss = xe.cross_entropy(ref[0] @ ref[1].T + ref[2], t, **LOSSES[name])
    rloss.backward()
    close(loss.float(), rloss, 2e-2)
    for x, y in zip(leaves, ref):
        close(x.grad.float(), y.grad, 3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ce", "z_loss", "focal", "whole_row", "label_smoothing", "smoothing_temperature_bias"])
@pytest.mark.parametrize("accum", ["float32", "input"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_staged_kernel(monkeypatch, dtype, name, accum, reduction):
    # Half-precision chunks reach the kernel through a float32 staging buffer a few rows at a time.
    # Stage 16 rows of 40-row chunks (blocks of 16, 16, 8), with ignored rows (gathered chunks),
    # class weights and a bias: the result must not depend on the staging.
    e, c, b, t = make(n=100, d=16, v=50, dtype=dtype, ignore=(3, 4, 50, 99))
    weight = torch.linspace(0.5, 2.0, 50)
    accum_dtype = dtype if accum == "input" else torch.float32
    kw = dict(chunk_size=40, accum_dtype=accum_dtype, weight=weight, reduction=reduction, **LOSSES[name])
    # Per-row upstream gradients (recompute mode) make every row's factors differ.
    upstream = torch.rand(100, generator=torch.Generator().manual_seed(5)) if reduction == "none" else None
    calls = []
    make_kernel = chunked.sweep.make_kernel

    def counting_kernel(*args):
        kernel = make_kernel(*args)
        return lambda z, *a: calls.append(z.shape[0]) or kernel(z, *a)

    monkeypatch.setattr(chunked.sweep, "make_kernel", counting_kernel)
    runs = {}
    for stage in (10**9, 16 * 50 * 4):
        calls.clear()
        leaves = [x.clone().requires_grad_() for x in (e, c, b)]
        with chunk_options.tuned(stage_bytes=stage):
            loss = xe.linear_cross_entropy(*leaves[:2], t, bias=leaves[2], **kw)
        # The recompute pass in backward stages as its call did, whatever the tuning is by then.
        loss.backward(None if upstream is None else upstream.to(loss.dtype))
        runs[stage] = (calls.copy(), [loss.float()] + [x.grad.float() for x in leaves])
    staged = [16, 16, 8, 16, 16, 8, 16]
    # Recompute mode: one pass without gradients in the forward, one with them in the backward.
    passes = 1 if reduction == "mean" else 2
    assert runs[10**9][0] == [40, 40, 16] * passes and runs[16 * 50 * 4][0] == staged * passes
    for got, want in zip(runs[16 * 50 * 4][1], runs[10**9][1]):
        close(got, want, 1e-5 if accum == "float32" else 1e-2)
    ref = [x.float().requires_grad_() for x in (e, c, b)]
    rloss = xe.cross_entropy(ref[0] @ ref[1].T + ref[2], t, weight=weight, reduction=reduction, **LOSSES[name])
    rloss.backward(upstream)
    close(runs[16 * 50 * 4][1][0], rloss, 2e-2)
    for x, y in zip(runs[16 * 50 * 4][1][1:], ref):
        close(x, y.grad, 3e-2)


class MatrixProducts(TorchDispatchMode):
    """Records ``(mat1, mat2)`` shapes and strides of every ``mm`` / ``addmm`` / ``addmm_``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[:2] if packet is torch.ops.aten.mm else args[1:3]
            self.calls.append((tuple(a.shape), a.stride(), tuple(b.shape), b.stride()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("accum", [None, torch.bfloat16])
def test_half_precision_weight_gradient_uses_row_major_operands(accum):
    # With half-precision matrix units, the weight gradient's product is 2-3x faster as
    # e_chunk.T @ G (both operands row-major) than as G.T @ e_chunk (a column-major operand).
    # Its inner dimension is the chunk's rows (the others' are D = 12 and V = 50): three chunks here.
    e, c, b, t = make(n=40, d=12, v=50, dtype=torch.bfloat16)
    c.requires_grad_()
    with MatrixProducts() as rec:
        xe.linear_cross_entropy(e, c, t, chunk_size=16, accum_dtype=accum).backward()
    weight_products = [call for call in rec.calls if call[0][1] not in (12, 50)]
    assert len(weight_products) == 3
    for a_shape, a_stride, b_shape, b_stride in weight_products:
        assert a_shape[0] == 12 and a_stride[1] == 1 and b_stride[1] == 1, (a_shape, a_stride, b_shape, b_stride)


class LiveBytes(TorchDispatchMode):
    """Bytes held by the storages that ops allocate while active: the current total and its peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.held = set()

    def _release(self, key, nbytes):
        self.live -= nbytes
        self.held.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.held:
                    self.held.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accum", ["float32", "input"])
def test_half_precision_gradient_is_formed_after_the_chunk_buffers_go(dtype, accum, monkeypatch):
    # The [D, V] accumulator becomes the [V, D] gradient at the end of the pass. Until then the pass
    # holds its chunk buffers; were they still held, that moment would set a higher peak.
    e, c, b, t = make(n=64, d=32, v=4000, dtype=dtype)
    e.requires_grad_(), c.requires_grad_()
    at_conversion = []
    convert = chunked.gradients.transpose_into
    monkeypatch.setattr(chunked.gradients, "transpose_into", lambda *a: (at_conversion.append(rec.peak), convert(*a))[1])
    with LiveBytes() as rec:
        xe.linear_cross_entropy(e, c, t, chunk_size=32, accum_dtype=dtype if accum == "input" else None).backward()
    assert len(at_conversion) == 1
    assert rec.peak == at_conversion[0], (rec.peak, at_conversion[0])
    # The recorder sees the pass: at least the accumulator and one chunk of logits.
    acc_bytes = 32 * 4000 * (dtype.itemsize if accum == "input" else 4)
    assert rec.peak >= acc_bytes + 32 * 4000 * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transpose_into(dtype):
    acc = torch.randn(7, 1000, dtype=torch.float32)
    got = chunked.gradients.transpose_into(acc, dtype, 2 * 7 * 300)  # blocks of 300 columns and a tail
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, acc.T.to(dtype))


@pytest.mark.parametrize("name", ["ce", "label_smoothing"])
def test_accum_dtype_input_needs_no_float32_weight_buffer(name):
    # V above the 4096-row blocks in which c is upcast for its column sums (a bounded temporary).
    e, c, b, t = make(n=40, d=4, v=5000, dtype=torch.bfloat16)
    e.requires_grad_(), c.requires_grad_()
    grads = {}
    for accum in (None, torch.bfloat16):
        c.grad = None
        with LargestTensor() as rec:
            xe.linear_cross_entropy(e, c, t, chunk_size=5, accum_dtype=accum, **LOSSES[name]).backward()
        seen = (torch.float32, c.numel()) in rec.created
        assert seen == (accum is None)  # the default accumulates grad_c in float32
        grads[accum] = c.grad.float()
    # Eight chunks: a few roundings to bfloat16 apart.
    close(grads[torch.bfloat16], grads[None], 2e-2)


def test_accum_dtype_choices():
    e, c, b, t = make(n=12, d=8, v=30, dtype=torch.float32)
    e.requires_grad_()
    base = torch.autograd.grad(xe.linear_cross_entropy(e, c, t, chunk_size=5), e)[0]
    same = torch.autograd.grad(xe.linear_cross_entropy(e, c, t, chunk_size=5, accum_dtype=torch.float32), e)[0]
    assert torch.equal(base, same)
    for bad in (torch.bfloat16, torch.float64):
        with pytest.raises(ValueError, match="accum_dtype"):
            xe.linear_cross_entropy(e, c, t, accum_dtype=bad)
    crit = xe.nn.LinearCrossEntropy(accum_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accum_dtype"):
        crit(e, c, t)


def test_autocast_matches_naive_autocast():
    e, c, b, t = make(n=40, d=16, v=64, dtype=torch.float32)
    got, ref = [], []
    for out, fn in ((got, "linear"), (ref, "naive")):
        leaves = [x.clone().requires_grad_() for x in (e, c, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fn == "linear":
                loss = xe.linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], chunk_size=16)
            else:
                loss = F.cross_entropy(F.linear(leaves[0], leaves[1], leaves[2]), t)
        loss.backward()
        out.append((loss, [x.grad for x in leaves]))
    (l1, g1), (l2, g2) = got[0], ref[0]
    assert l1.dtype == l2.dtype == torch.float32
    close(l1, l2, 1e-2)
    for x, y in zip(g1, g2):
        assert x.dtype == torch.float32
        close(x, y, 3e-2)


def test_inside_torch_compile():
    torch._dynamo.reset()
    e, c, _, t = make(n=24, d=8, v=30, dtype=torch.float32, bias=False)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 30, bias=False)
            self.crit = xe.nn.LinearCrossEntropy(z_loss=1e-3, chunk_size=5)

        def forward(self, x, y):
            return self.crit(torch.tanh(self.proj(x)), self.lm_head.weight, y)

    torch.manual_seed(0)
    model = Head()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(e, t)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    h = torch.tanh(model.proj(e))
    ref = xe.cross_entropy(h @ model.lm_head.weight.T, t, z_loss=1e-3)
    ref.backward()
    close(loss, ref, 1e-5)
    for g, p in zip(grads, model.parameters()):
        close(g, p.grad, 1e-5)


def test_module():
    e, c, b, t = make()
    crit = xe.nn.LinearCrossEntropy(loss="ce", label_smoothing=0.1, reduction="sum", chunk_size=4)
    close(crit(e, c, t, b), xe.cross_entropy(e @ c.T + b, t, label_smoothing=0.1, reduction="sum"), 1e-12)
    assert "shift=False" in repr(crit)
    crit = xe.nn.LinearCrossEntropy(return_stats=True)
    loss, stats = crit(e, c, t)
    assert stats.lse.shape == t.shape


# -- errors -------------------------------------------------------------------------------------------


def test_errors():
    e, c, b, t = make()
    with pytest.raises(ValueError, match="valid backends: 'auto', 'torch'"):
        xe.linear_cross_entropy(e, c, t, backend="triton-ish")
    with pytest.raises(ValueError, match="valid backends"):
        xe.nn.LinearCrossEntropy(backend="nope")
    with pytest.raises(ValueError, match="features"):
        xe.linear_cross_entropy(e, c[:, :3], t)
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        xe.linear_cross_entropy(e, c[None], t)
    with pytest.raises(ValueError, match="target must have shape"):
        xe.linear_cross_entropy(e, c, t[:-1])
    with pytest.raises(TypeError, match="class indices"):
        xe.linear_cross_entropy(e, c, t.double())
    with pytest.raises(ValueError, match="outside the valid class range"):
        xe.linear_cross_entropy(e, c, torch.where(t == 5, 50, t).index_fill(0, torch.tensor([0]), 50))
    with pytest.raises(ValueError, match="bias must have shape"):
        xe.linear_cross_entropy(e, c, t, bias=b[:-1])
    with pytest.raises(TypeError, match="share one dtype"):
        xe.linear_cross_entropy(e.float(), c, t)
    with pytest.raises(ValueError, match="chunk_size"):
        xe.linear_cross_entropy(e, c, t, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        xe.linear_cross_entropy(e, c, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xe.linear_cross_entropy(e, c, t, loss=FocalLike(), label_smoothing=0.1)
    with pytest.raises(ValueError, match="mode"):
        xe.LinearCrossEntropyOptions(mode="fast")
    with pytest.raises(ValueError, match="backend"):
        xe.linear_cross_entropy(e, c, t, backend="cuda-magic")


def test_default_chunk_size():
    size = chunk_options.default_chunk_size
    assert size(32768, 1024) == 512 and size(131072, 1024) == 368
    assert size(256000, 1024) == 192
    assert size(1000, 1024) == 2048 and size(131072, 1024, torch.bfloat16) == 512
    assert size(10, 8) == chunk_options.MAX_CHUNK
    assert size(10**8, 8) == chunk_options.MIN_CHUNK
    # Half precision summed in float32: longer chunks (each costs a pass over the V x D accumulator),
    # within half the accumulator's bytes; a half-precision accumulator, or none, keeps the rule above.
    assert size(131072, 1024, torch.bfloat16, torch.float32) == chunk_options.HALF_ACCUM_ROWS
    assert size(131072, 1024, torch.bfloat16, torch.bfloat16) == 512
    assert size(128256, 4096, torch.float16, torch.float32) == chunk_options.HALF_ACCUM_ROWS
    assert size(131072, 256, torch.bfloat16, torch.float32) == 752  # capped by MAX_BYTES, not by D
    assert size(32768, 1024, torch.float32, torch.float32) == 512
    for v, d, dt in [(50257, 768, torch.float32), (151936, 4096, torch.bfloat16), (262144, 2048, torch.float16)]:
        rows = size(v, d, dt)
        assert rows % 16 == 0 and rows * v * dt.itemsize <= chunk_options.MAX_BYTES


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ((0,), ValueError, "num_classes must be >= 1, got 0"),
        ((10, -3), ValueError, "hidden must be >= 0, got -3"),
        ((10.0,), TypeError, "num_classes must be an int"),
        ((10, True), TypeError, "hidden must be an int"),
        ((10, 8, torch.int64), TypeError, "dtype must be a floating torch.dtype"),
        ((10, 8, torch.float32, "float32"), TypeError, "accum_dtype must be None or a floating torch.dtype"),
    ],
)
def test_default_chunk_size_refuses_what_is_not_a_size(arguments, error, message):
    """Found as: ``default_chunk_size(0)`` and ``default_chunk_size(10, -3)`` returned 8192."""
    with pytest.raises(error, match=f"default_chunk_size: {message}"):
        xe.default_chunk_size(*arguments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["ce", "temperature_bias", "label_smoothing"])
def test_confidently_wrong_rows(dtype, name):
    """Rows whose target probability underflows get lse from their most probable column instead."""
    e, c, b, t = make(dtype=dtype, ignore=())
    e = e.clone()
    e[::3] *= 60.0  # logit gaps of hundreds: p_target underflows on many of these rows
    logits = e @ c.T + b
    assert (logits.gather(1, t[:, None]).squeeze(1) - logits.amax(1) < -150).sum() >= 3
    assert_agree(e, c, b, t, 1e-5 if dtype == torch.float32 else 1e-10, chunk_size=5, reduction="none", **LOSSES[name])
    _, stats = xe.linear_cross_entropy(e, c, t, bias=b, return_stats=True)
    close(stats.lse.double(), torch.logsumexp(logits.double(), -1), 1e-6)


def _registry_loss(name, v):
    if name in ("forward_correction", "backward_correction"):
        g = torch.Generator().manual_seed(4)
        T = torch.eye(v, dtype=torch.float64) * 0.7 + torch.rand(v, v, generator=g, dtype=torch.float64) * 0.3 / v
        return xe.losses.get(name, T=T / T.sum(1, keepdim=True))
    if name == "aldr_kl":
        return xe.losses.get(name, num_samples=64)
    return xe.losses.get(name)


@pytest.mark.parametrize("name", xe.losses.available())
def test_every_registered_loss(name):
    """Every loss of the registry, streamable or whole-row, agrees with the dense path."""
    e, c, b, t = make()
    extra = {"sample_ids": torch.arange(t.shape[0])} if name == "aldr_kl" else None
    results = []
    for path in ("linear", "dense"):
        le, lc, lb = (x.clone().requires_grad_() for x in (e, c, b))
        loss_obj = _registry_loss(name, c.shape[0])  # a fresh object per path: some losses keep state
        if path == "linear":
            loss = xe.linear_cross_entropy(le, lc, t, bias=lb, loss=loss_obj, chunk_size=8, extra=extra)
        else:
            loss = xe.cross_entropy(le @ lc.T + lb, t, loss=loss_obj, extra=extra)
        results.append((loss.detach(), torch.autograd.grad(loss, (le, lc, lb))))
    (l1, g1), (l2, g2) = results
    close(l1, l2, 1e-10)
    for x, y in zip(g1, g2):
        close(x, y, 1e-10)


@pytest.mark.parametrize("name", ["ce", "label_smoothing", "piecewise", "temperature_bias", "smoothing_bias_temperature"])
@chunk_options.tuned(fused_softmax=False)
def test_unfused_softmax_route(name):
    """The route taken on devices without an in-place softmax (exp in place, normalisers folded)."""
    e, c, b, t = make()
    for reduction in ("mean", "none"):
        assert_agree(e, c, b, t, 1e-10, reduction=reduction, chunk_size=6, **LOSSES[name])
    _, stats = xe.linear_cross_entropy(e, c, t, bias=b, return_stats=True)
    close(stats.lse.double(), torch.logsumexp(e @ c.T + b, -1), 1e-6)


@pytest.mark.parametrize("v", [1, 7, 100003])
def test_in_place_softmax_is_exact(v):
    from crossent._engine.softmax import softmax_

    z = torch.randn(5, v) * 10
    ref = torch.softmax(z, 1)
    assert softmax_(z) is None
    assert torch.equal(z, ref)
