"""The Triton backend of linear_cross_entropy against the dense path, on every streamable loss and option.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, NumPy on CPU tensors),
so the shapes are small and odd: N=37 rows, D=24 features, V=301 classes, none a multiple of any tile
(interpreter tiles: 32 rows, 128 classes, 16 features; two vocabulary splits per row block; several
grad_c slabs for half precision). On a CUDA machine the same tests run the compiled kernels.

Reference: ``crossent.cross_entropy`` on ``e @ c.T + bias`` formed in float64 from the same inputs,
with plain autograd. Tolerances: float32 1e-5 relative to the largest entry of the reference (loss and
each gradient). bfloat16/float16 inputs are compared with the float64 reference of the same rounded
inputs: the loss within one rounding to the dtype (2^-8 relative for bfloat16, 2^-11 for float16: the
logits are float32 sums of exact products, so only the returned value is rounded), the gradients
within five (2e-2, 2.5e-3: ``dL/dz`` is rounded to the input dtype for the two gradient products, and
the gradients are returned in that dtype); measured, the gradients' error is 2 to 3 roundings.
"""

from __future__ import annotations

import pytest
import torch
from test_linear_cross_entropy import PowerMix  # a loss that reads sum_p_pow

import crossent as xe
from crossent._engine import backend as backend_mod
from crossent._engine.options import LinearCrossEntropyOptions
from crossent._engine.plan import Plan
from crossent._engine.triton.program import unsupported
from crossent._rows import index_rows
from crossent.losses import Loss
from crossent.stats import LSE, P_DOT_Z, TARGET
from crossent.transforms import ClassBias, Temperature

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _kernels():
    """The launch module, or ``None`` if its kernels were built for another device (see conftest.py)."""
    from crossent._engine.triton import launch

    return launch if launch.INTERPRETED != CUDA else None


LAUNCH = _kernels()
pytestmark = pytest.mark.skipif(
    LAUNCH is None, reason="the triton kernels were built for another device (TRITON_INTERPRET)"
)

N, D, V = 37, 24, 301
HALF_TOL = {torch.bfloat16: (2.0**-8, 2e-2), torch.float16: (2.0**-11, 2.5e-3)}  # (loss, gradients)


def make(dtype=torch.float32, seed=0, ignore=(3, 20), bias=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(N, D, generator=g)
    c = torch.randn(V, D, generator=g) * (scale / D**0.5)
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        t[i] = -100
    on = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return on(e), on(c), on(b), t.to(DEVICE)


def close(actual, expected, rel, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(expected.detach().abs().max().item(), 1e-12) if expected.numel() else 1.0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def triton_run(e, c, b, t, upstream=None, **kw):
    le, lc, lb = leaves(e, c, b)
    out = xe.linear_cross_entropy(le, lc, t, bias=lb, backend="triton", **kw)
    loss = out[0] if isinstance(out, tuple) else out
    wrt = [x for x in (le, lc, lb) if x is not None]
    grads = torch.autograd.grad(loss, wrt, upstream)
    return out, grads


def dense_run(e, c, b, t, upstream=None, shift=False, **kw):
    """The dense path on float64 logits formed from the same (possibly rounded) inputs."""
    le, lc, lb = leaves(*(None if x is None else x.double() for x in (e, c, b)))
    logits = le @ lc.T + (lb if lb is not None else 0)
    if shift:
        logits, t = logits[..., :-1, :], t[..., 1:]
        upstream = None if upstream is None else upstream
    loss = xe.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(t.shape)
    wrt = [x for x in (le, lc, lb) if x is not None]
    return loss, torch.autograd.grad(loss, wrt, upstream), logits


def agree(e, c, b, t, rel=1e-5, grad_rel=None, upstream=None, **kw):
    out, g1 = triton_run(e, c, b, t, upstream=upstream, **kw)
    kw.pop("return_stats", None)
    ref, g2, logits = dense_run(e, c, b, t, upstream=upstream, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    close(loss, ref, rel, "loss")
    for name, x, y in zip("ecb", g1, g2):
        close(x, y, grad_rel or rel, f"grad_{name}")
    return out, logits


# -- every streamable registry loss ---------------------------------------------------------------------------


def _registry_instance(name, num_classes=V):
    if name in ("forward_correction", "backward_correction"):
        return xe.losses.get(name, T=torch.eye(num_classes))
    return xe.losses.get(name)


STREAMABLE = [n for n in xe.losses.available() if _registry_instance(n).streamable]
WHOLE_ROW = [n for n in xe.losses.available() if not _registry_instance(n).streamable]


@pytest.mark.parametrize("name", STREAMABLE)
def test_every_streamable_registry_loss(name):
    e, c, b, t = make()
    if name == "circle":  # cosine-like logits, as the loss expects
        e, c = e / e.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    agree(e, c, b, t, loss=name)


@pytest.mark.parametrize(
    "name,hparams",
    [("ldr_kl", {"lam": 0.3, "margin": 0.5}), ("ngce", {"q": 0.2}), ("focal", {"gamma": 2.0, "alpha": torch.linspace(0.25, 1.0, V)}),
     ("apl", {"active": "ngce", "passive": "mae", "alpha": 2.0, "beta": 0.5})],
)  # fmt: skip
def test_registry_hyperparameters(name, hparams):
    e, c, b, t = make(seed=1)
    agree(e, c, b, t, loss=xe.losses.get(name, **hparams), reduction="sum")


@pytest.mark.parametrize("name", WHOLE_ROW)
def test_whole_row_losses_are_refused_by_name(name):
    e, c, t = (
        torch.randn(4, 3, device=DEVICE),
        torch.randn(6, 3, device=DEVICE),
        torch.tensor([0, 5, 2, 1], device=DEVICE),
    )
    with pytest.raises(ValueError, match=r"needs whole logit rows.*'triton'"):
        xe.linear_cross_entropy(e, c, t, loss=_registry_instance(name, 6), backend="triton")


# -- options -------------------------------------------------------------------------------------------------------


class Entropic(Loss):
    """CE minus 0.3 times the entropy (``lse - sum_j p_j z_j``): reads ``p_dot_z``."""

    def statistics(self, rows):
        return (LSE, TARGET, P_DOT_Z)

    def row_loss(self, s, rows):
        return s[LSE] - s[TARGET] - 0.3 * (s[LSE] - s[P_DOT_Z])


def _weight():
    return torch.rand(V, generator=torch.Generator().manual_seed(5)).add(0.5).to(DEVICE)


OPTIONS = {
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "weight": dict(weight="w"),
    "label_smoothing": dict(label_smoothing=0.1),
    "smoothing_weight_zloss": dict(label_smoothing=0.2, weight="w", z_loss=1e-2),
    "z_loss_none": dict(z_loss=1e-3, reduction="none"),
    "softcap": dict(softcap=3.0),
    "softcap_smoothing": dict(softcap=2.0, label_smoothing=0.1, reduction="sum"),
    "temperature_class_bias": dict(loss="temperature_bias"),
    "circle_softcap": dict(loss="circle", softcap=0.9),
    "entropy_p_dot_z": dict(loss=Entropic()),
    "sum_p_pow": dict(loss=PowerMix(), reduction="none"),
    "two_column_sums": dict(loss="smoothing_nce"),
    "no_bias": dict(bias=False),
    "all_ignored": dict(ignore=tuple(range(N))),
}


def _resolve(option):
    kw = dict(option)
    if kw.get("weight") == "w":
        kw["weight"] = _weight()
    loss = kw.get("loss")
    if loss == "temperature_bias":
        prior = torch.linspace(-1, 1, V, device=DEVICE)
        kw["loss"] = xe.losses.Transformed(xe.losses.get("focal", gamma=1.0), ClassBias(prior), Temperature(0.7))
    elif loss == "smoothing_nce":
        kw["loss"] = xe.losses.CrossEntropy(label_smoothing=0.1) + xe.losses.get("nce")
    return kw


@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(option):
    kw = _resolve(OPTIONS[option])
    e, c, b, t = make(bias=kw.pop("bias", True), ignore=kw.pop("ignore", (3, 20)))
    upstream = torch.randn(N, device=DEVICE) if kw.get("reduction") == "none" else None
    agree(e, c, b, t, upstream=upstream, **kw)


def test_shift_and_return_stats():
    e, c, b, t = make()
    e3, t3 = e[:36].reshape(4, 9, D), t[:36].reshape(4, 9)
    upstream = torch.randn(4, 8, device=DEVICE)
    (loss, stats), logits = agree(
        e3, c, b, t3, shift=True, reduction="none", upstream=upstream, return_stats=True, z_loss=1e-3
    )
    assert loss.shape == stats.lse.shape == stats.argmax.shape == (4, 8)
    close(stats.lse, torch.logsumexp(logits, -1), 1e-6, "lse")
    assert torch.equal(stats.argmax, logits.argmax(-1))


def test_return_stats_reports_ignored_rows_and_softcap():
    e, c, b, t = make()
    _, stats = xe.linear_cross_entropy(e, c, t, bias=b, softcap=2.0, return_stats=True, backend="triton")
    z = 2.0 * torch.tanh((e.double() @ c.double().T + b.double()) / 2.0)
    close(stats.lse, torch.logsumexp(z, -1), 1e-6, "lse")
    assert torch.equal(stats.argmax, z.argmax(-1))


def test_argmax_takes_the_first_of_ties_across_tiles_and_splits():
    e, c, _, t = make(bias=False)
    c[250] = c[7]  # column 7 (first tile, first split) and 250 (last tile, second split) tie
    e[:5] = c[7] * 10
    _, stats = xe.linear_cross_entropy(e, c, t, return_stats=True, backend="triton")
    assert (stats.argmax[:5] == 7).all()


def test_gradients_of_some_inputs_only():
    e, c, b, t = make()
    for wanted in ("e", "c", "b"):
        le, lc, lb = (x.detach().clone().requires_grad_(name == wanted) for name, x in zip("ecb", (e, c, b)))
        loss = xe.linear_cross_entropy(le, lc, t, bias=lb, backend="triton")
        (g,) = torch.autograd.grad(loss, [x for x in (le, lc, lb) if x.requires_grad])
        _, ref, _ = dense_run(e, c, b, t)
        close(g, ref["ecb".index(wanted)], 1e-5, wanted)


def test_no_grad_and_module():
    e, c, b, t = make()
    with torch.no_grad():
        value = xe.linear_cross_entropy(e, c, t, bias=b, backend="triton")
    ref, _, _ = dense_run(e, c, b, t)
    close(value, ref, 1e-5)
    crit = xe.nn.LinearCrossEntropy(loss="poly1", backend="triton")
    le = e.clone().requires_grad_()
    crit(le, c, t, bias=b).backward()
    ref, (ge, _, _), _ = dense_run(e, c, b, t, loss="poly1")
    close(le.grad, ge, 1e-5)


def test_tile_sizes_do_not_matter():
    """Other tiles, splits and slabs: row tiles of 16, class tiles of 32, 5 splits, 8 features per step."""
    from crossent._engine.options import tuned
    from crossent._engine.triton import config

    if CUDA:
        pytest.skip("interpreter tiles")
    tiny = config.Launch(config.Tiles(16, 32, 8), config.Tiles(16, 32, 8), grad_block_d=8, programs=15, slab_bytes=1)
    e, c, b, t = make(seed=3)
    with tuned(triton_launch=tiny):
        agree(e, c, b, t, loss="squentropy", reduction="sum", return_stats=True)


# -- half precision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,option", [(torch.bfloat16, "weight"), (torch.float16, "softcap_smoothing"), (torch.bfloat16, "none")]
)
def test_half_precision(dtype, option):
    kw = _resolve(OPTIONS[option])
    e, c, b, t = make(dtype=dtype)
    upstream = torch.randn(N, device=DEVICE) if kw.get("reduction") == "none" else None
    (out, grads) = triton_run(e, c, b, t, upstream=upstream, **kw)
    assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    agree(e, c, b, t, *HALF_TOL[dtype], upstream=upstream, **kw)


# -- gradient filter ---------------------------------------------------------------------------------------------


def test_filter_eps():
    """Tiles whose gradient is negligible everywhere are skipped: exact at 0, zero rows of grad_c when large."""
    e, c, _, t = make(bias=False)
    e[:, 0] = e[:, 0].abs() + 3.0
    c[128:256, 0] = -20.0  # the class tile [128, 256): logits below -60 on every row, p < 1e-25
    t = torch.where(t.ge(128) & t.lt(256), 0, t)
    exact = triton_run(e, c, None, t)[1]
    zero = triton_run(e, c, None, t, options=LinearCrossEntropyOptions(backend="triton", filter_eps=0.0))[1]
    for x, y in zip(exact, zero):
        close(x, y, 1e-6)
    _, (ge, gc) = triton_run(e, c, None, t, options=LinearCrossEntropyOptions(backend="triton", filter_eps=1e-6))
    assert gc[128:256].abs().max() == 0 and exact[1][128:256].abs().max() > 0
    close(ge, exact[0], 1e-6)
    close(gc, exact[1], 1e-6)


# -- dispatch and errors -----------------------------------------------------------------------------------------


def _plan(loss="ce"):
    rows = index_rows(torch.tensor([0, 1]), 5, -100, None)
    return Plan(xe.losses.get(loss) if isinstance(loss, str) else loss, rows)


def test_auto_picks_triton_only_on_cuda_for_what_it_computes():
    auto = LinearCrossEntropyOptions()
    choose = backend_mod.choose_backend
    assert choose(auto, "cuda", torch.bfloat16, _plan()) == "triton"
    assert choose(auto, "cuda", torch.float32, _plan("ldr_kl")) == "triton"
    assert choose(auto, "cpu", torch.float32, _plan()) == "torch"
    assert choose(auto, "cuda", torch.float64, _plan()) == "torch"
    assert choose(auto, "cuda", torch.float32, _plan("nfl")) == "torch"  # whole-row
    assert choose(auto.replace(mode="eager"), "cuda", torch.float32, _plan()) == "torch"
    correction = xe.losses.get("forward_correction", T=torch.eye(5), clip=False)
    assert choose(auto, "cuda", torch.float32, _plan(correction)) == "torch"  # a statistic without a form
    assert choose(auto.replace(backend="triton"), "cpu", torch.float32, _plan()) == "triton"


@pytest.mark.parametrize("hparams", [{"lam": 1e-40}, {"lam": 1e-4}, {"lam": 0.3, "margin": 1e300}])
def test_tempered_lse_beyond_float32_takes_the_exact_engine(hparams):
    """LDR-KL at its hinge limit (or a margin beyond float32: +inf in float32) gave NaN in the float32 kernels: refused by
    name, and ``auto`` takes the row-chunked engine, which is exact there."""
    plan = _plan(xe.losses.get("ldr_kl", **hparams))
    assert "tempered lse" in unsupported(plan)
    auto = LinearCrossEntropyOptions()
    assert backend_mod.choose_backend(auto, "cuda", torch.float32, plan) == "torch"
    e, c, _, t = make()
    loss = xe.losses.get("ldr_kl", **hparams)
    with pytest.raises(ValueError, match="temperature"):
        xe.linear_cross_entropy(e, c, t, loss=loss, backend="triton")
    value = xe.linear_cross_entropy(e, c, t, loss=loss)
    assert not value.isnan() and torch.allclose(value, xe.cross_entropy(e @ c.T, t, loss=loss))  # inf where so


def test_errors_say_why():
    e, c, _, t = make()
    correction = xe.losses.get("forward_correction", T=torch.eye(6), clip=False)
    with pytest.raises(ValueError, match="TargetRowLogSumExp.*declares no form"):
        xe.linear_cross_entropy(e[:, :3], c[:6, :3], t.clamp(0, 5), loss=correction, backend="triton")
    with pytest.raises(ValueError, match="mode='eager'"):
        xe.linear_cross_entropy(e, c, t, backend="triton", options=LinearCrossEntropyOptions(mode="eager"))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        xe.linear_cross_entropy(e.double(), c.double(), t, backend="triton")
    with pytest.raises(ValueError, match="filter_eps"):
        LinearCrossEntropyOptions(filter_eps=-1.0)
    twice = xe.losses.Transformed(xe.losses.get("ce"), xe.transforms.Softcap(2.0))
    with pytest.raises(ValueError, match=r"affine -> \[tanh\]"):
        xe.linear_cross_entropy(e, c, t, loss=twice, softcap=3.0, backend="triton")


def test_without_triton_the_backend_says_so(monkeypatch):
    monkeypatch.setattr(backend_mod, "triton_importable", lambda: False)
    e, c, _, t = make()
    with pytest.raises(ImportError, match=r"needs Triton.*crossent\[triton\]"):
        xe.linear_cross_entropy(e, c, t, backend="triton")
    assert backend_mod.choose_backend(LinearCrossEntropyOptions(), "cuda", torch.float32, _plan()) == "torch"


def test_device_check_names_the_device(monkeypatch):
    monkeypatch.setattr(LAUNCH, "INTERPRETED", not LAUNCH.INTERPRETED)
    e, c, _, t = make()
    with pytest.raises(ValueError, match="CUDA tensors|CPU tensors only"):
        xe.linear_cross_entropy(e, c, t, backend="triton")
