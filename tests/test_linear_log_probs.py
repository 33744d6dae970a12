"""crossent.linear_log_probs against its formulas, on every engine of the fused linear head.

Reference: plain autograd in float64 on the materialised logits of the same (possibly rounded) inputs,
``z = softcap(e @ c.T + bias) / T``, ``log_softmax(z)`` gathered at the target, the entropy
``-sum p log p`` and ``logsumexp(z)``; ignored rows give 0. The outputs are combined with random
per-token weights (as an RL objective combines them) and the gradients of ``e``, ``c`` and ``bias``
compared. Tolerances, relative to the largest entry of the reference: float64 1e-10; float32 1e-5;
bfloat16 (against the float64 reference of the rounded inputs) 2^-7 for the values (one rounding of
the logits' float32 products is exact, the outputs are float32) and 3e-2 for the gradients (``dL/dz``
is rounded to bfloat16 for the two gradient products), as tests/test_triton.py states them.

The Triton engine runs in Triton's interpreter without a GPU (tests/conftest.py), at small odd shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_linear_cross_entropy import LargestTensor

import crossent as xe

N, D, V = 13, 6, 37
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0**-7, 3e-2)}


def make(dtype=torch.float64, n=N, d=D, v=V, seed=0, scale=1.0, bias=True, ignore=(2, 7), shape=None):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    if shape is not None:
        e, t = e.reshape(*shape, d), t.reshape(shape)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return cast(e), cast(c), cast(b), t


def reference(e, c, b, t, *, temperature=1.0, softcap=None, shift=False, ignore_index=-100):
    """(logp, entropy, lse) in float64 by plain autograd on the whole logits."""
    z = e.double() @ c.double().T + (0 if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if shift:
        z, t = z[..., :-1, :], t[..., 1:]
    logp_all = torch.log_softmax(z, -1)
    counted = t != ignore_index
    logp = logp_all.gather(-1, torch.where(counted, t, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    lse = torch.logsumexp(z, -1)
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(counted, x, zero) for x in (logp, entropy, lse))


def close(actual, expected, rel, what, floor=1e-12):
    """Within ``rel`` of the largest entry of ``expected`` (at least ``floor``)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), what
    scale = max(expected.detach().abs().max().item(), floor) if expected.numel() else 1.0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def check(e, c, b, t, *, weights=(1.0, 0.3, -0.2), engine="torch", seed=1, grad_rel=None, **kw):
    """Values and gradients of ``sum_i (w1_i logp_i + w2_i H_i + w3_i lse_i)`` against the reference;
    ``weights`` scale random per-row weights (0: that output not asked for)."""
    want_entropy, want_lse = bool(weights[1]), bool(weights[2])
    out = xe.linear_log_probs(e, c, t, bias=b, entropy=want_entropy, lse=want_lse, backend=engine, **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in (e, c, b) if x is not None]
    formula = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref = reference(*ref_leaves[:2], ref_leaves[2] if b is not None else None, t, **formula)
    value_rel, dtype_grad_rel = TOL[e.dtype]
    grad_rel = grad_rel or dtype_grad_rel
    assert out.logp.dtype == (torch.float64 if e.dtype == torch.float64 else torch.float32)
    assert (out.entropy is None) != want_entropy and (out.lse is None) != want_lse
    g = torch.Generator().manual_seed(seed)
    mine, theirs = 0.0, 0.0
    for name, w, x, y in zip(("logp", "entropy", "lse"), weights, out, ref):
        if not w:
            continue
        close(x, y, value_rel, name, floor=1.0)  # nats: a near-zero entropy is compared to 1
        r = torch.randn(y.shape, generator=g, dtype=torch.float64) * w
        mine = mine + (r.to(x.dtype) * x).sum()
        theirs = theirs + (r * y).sum()
    leaves = [x for x in (e, c, b) if x is not None]
    grads = torch.autograd.grad(mine, leaves)
    ref_grads = torch.autograd.grad(theirs, ref_leaves)
    for name, gx, gy in zip("ecb", grads, ref_grads):
        assert gx.dtype == e.dtype
        # A gradient that cancels to ~1e-8 from terms of the inputs' size carries the rounding of those
        # terms: it is compared to (a fraction of) that size, not to its own.
        floor = 1e-4 * max(1.0, e.detach().abs().max().item(), c.detach().abs().max().item())
        close(gx, gy, grad_rel, f"grad_{name}", floor=floor)
    return out


def triton_available() -> bool:
    try:
        from crossent._engine.triton import launch
    except Exception:  # noqa: BLE001
        return False
    return launch.INTERPRETED != torch.cuda.is_available()


ENGINES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no Triton"))]
#: Random combinations of the outputs' weights (0: not asked for), options and shapes.
CASES = {
    "logp": dict(weights=(1.0, 0, 0)),
    "all_three": dict(weights=(1.0, 0.5, -0.3)),
    "entropy_only_gradient": dict(weights=(1e-30, 1.0, 0)),
    "lse_and_entropy": dict(weights=(0.7, -1.2, 0.4), bias=False),
    "temperature": dict(weights=(1.0, 0.2, 0.3), temperature=0.6),
    "softcap_temperature": dict(weights=(1.0, 0.4, -0.5), softcap=1.5, temperature=1.7, scale=3.0),
    "shift": dict(weights=(1.0, 0.3, 0.2), shift=True, shape=(13, 1)),
    "shift_batch": dict(weights=(-1.0, 0.3, 0), shift=True, n=12, shape=(3, 4), temperature=2.0),
    "ignore_index": dict(weights=(1.0, 0.3, 0.2), ignore=(0, 5, 6, 12), ignore_index=-100),
}


def _run_case(case, dtype, engine):
    case = dict(case)
    make_kw = {k: case.pop(k) for k in ("bias", "scale", "n", "shape", "ignore") if k in case}
    case.pop("ignore_index", None)
    e, c, b, t = make(dtype, **make_kw)
    if case.get("shift") and t.dim() == 2 and t.shape[-1] == 1:  # one sequence of 13 positions
        e, t = e.detach().reshape(1, 13, D).requires_grad_(), t.reshape(1, 13)
    return check(e, c, b, t, engine=engine, chunk_size=16 if engine == "torch" else None, **case)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_the_formulas(name, engine):
    dtypes = (torch.float64, torch.float32) if engine == "torch" else (torch.float32,)
    for dtype in dtypes:
        _run_case(CASES[name], dtype, engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["all_three", "softcap_temperature", "shift_batch"])
def test_bfloat16(name, engine):
    _run_case(CASES[name], torch.bfloat16, engine)


def test_the_default_chunk_size_and_one_chunk_per_row_agree():
    e, c, b, t = make(torch.float64)
    for chunk_size in (None, 1, 5):
        check(e, c, b, t, chunk_size=chunk_size, temperature=1.3)


def test_every_row_ignored_gives_zeros_and_zero_gradients():
    e, c, b, t = make(torch.float32)
    t = torch.full_like(t, -100)
    out = xe.linear_log_probs(e, c, t, bias=b, entropy=True, lse=True)
    for x in out:
        assert torch.equal(x, torch.zeros(N))
    (out.logp.sum() + out.entropy.sum() + out.lse.sum()).backward()
    for x in (e, c, b):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_custom_ignore_index_and_outputs_not_used():
    e, c, b, t = make(torch.float64, ignore=())
    t[3] = 5
    out = xe.linear_log_probs(e, c, t, bias=b, entropy=True, lse=True, ignore_index=5)
    ref = reference(e, c, b, t, ignore_index=5)
    for x, y in zip(out, ref):
        close(x, y, 1e-10, "value")
        assert x[3] == 0
    # only logp reaches the loss: the entropy and lse get no incoming gradient
    (g_e,) = torch.autograd.grad(out.logp.sum(), [e])
    (r_e,) = torch.autograd.grad(ref[0].sum(), [e])
    close(g_e, r_e, 1e-10, "grad_e")


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_of_ten_thousand_stay_finite(engine):
    e, c, b, t = make(torch.float32, bias=False)
    with torch.no_grad():
        e.mul_(0), c.mul_(0)
        e[:, 0] = torch.tensor([1.0, -1.0] * 6 + [1.0])
        c[:, 0] = torch.linspace(-1e4, 1e4, V)  # logits from -1e4 to 1e4, ties of opposite sign
    # The Triton kernels form the entropy's term p_j (z_j - sum_k p_k z_k) from float32 parts of size 1e4
    # (relative error 2^-24 of each): 1e-3 of the largest gradient; the row-chunked engine keeps 1e-5.
    out = check(e, c, None, t, engine=engine, weights=(1.0, 0.5, 0.25), chunk_size=8 if engine == "torch" else None,
                grad_rel=1e-3 if engine == "triton" else None)  # fmt: skip
    assert all(torch.isfinite(x).all() for x in out)


def test_float64_gradcheck():
    e, c, b, t = make(torch.float64, n=4, d=3, v=5, ignore=(1,))

    def f(e, c, b):
        out = xe.linear_log_probs(e, c, t, bias=b, entropy=True, lse=True, temperature=0.8, softcap=2.0, chunk_size=2)
        return tuple(out)

    assert torch.autograd.gradcheck(f, (e, c, b))


def test_second_derivatives_are_refused_by_name():
    e, c, b, t = make(torch.float64)
    out = xe.linear_log_probs(e, c, t, bias=b)
    with pytest.raises(RuntimeError, match="'linear_log_probs' engine has no second derivatives"):
        torch.autograd.grad(out.logp.sum(), [e], create_graph=True)


def test_no_logit_matrix_in_forward_and_backward():
    n, v, chunk = 24, 300, 8
    e, c, b, t = make(torch.float32, n=n, v=v)
    with LargestTensor(skip=[c.shape]) as rec:
        out = xe.linear_log_probs(e, c, t, bias=b, entropy=True, lse=True, chunk_size=chunk, temperature=0.7)
        (out.logp.sum() + 0.1 * out.entropy.sum() - out.lse.mean()).backward()
    assert 0 < rec.largest <= chunk * v, rec.largest
    with LargestTensor(skip=[c.shape]) as naive:  # the recorder does see a materialised matrix
        torch.log_softmax(e @ c.T, -1).sum().backward()
    assert naive.largest >= n * v


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 9),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e3]),
    temperature=st.sampled_from([0.05, 1.0, 3.0]),
    softcap=st.sampled_from([None, 0.5, 20.0]),
    ignored=st.integers(0, 6),
    chunk_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
# one class: every gradient cancels to rounding of the inputs' size
@example(n=2, v=1, scale=30.0, temperature=0.05, softcap=0.5, ignored=1, chunk_size=1, seed=1)
def test_edge_cases(n, v, scale, temperature, softcap, ignored, chunk_size, seed):
    """One class, one row, constant and huge logits, tiny temperatures, ignored rows, any chunking."""
    ignore = tuple(range(min(ignored, n)))
    e, c, b, t = make(torch.float64, n=n, v=v, scale=scale, seed=seed, ignore=ignore)
    check(e, c, b, t, chunk_size=chunk_size, temperature=temperature, softcap=softcap, weights=(1.0, 0.5, 0.5))


def test_argument_errors_name_the_value():
    e, c, b, t = make(torch.float32)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        xe.linear_log_probs(e, c, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        xe.linear_log_probs(e, c, t, temperature=math.inf)
    with pytest.raises(ValueError, match="target must have shape"):
        xe.linear_log_probs(e, c, t[:-1])
    with pytest.raises(ValueError, match="backend"):
        xe.linear_log_probs(e, c, t, backend="nope")


def test_temperature_of_the_loss_entry_points():
    """``temperature=`` divides the capped logits in linear_cross_entropy and cross_entropy."""
    e, c, b, t = make(torch.float64)
    z = e @ c.T + b
    want = torch.nn.functional.cross_entropy(2.0 * torch.tanh(z / 2.0) / 0.7, t)
    close(xe.cross_entropy(z, t, softcap=2.0, temperature=0.7), want, 1e-12, "cross_entropy")
    got = xe.linear_cross_entropy(e, c, t, bias=b, softcap=2.0, temperature=0.7, chunk_size=4)
    close(got, want, 1e-12, "linear_cross_entropy")
    got.backward()
    (ref_e,) = torch.autograd.grad(want, [e])
    close(e.grad, ref_e, 1e-10, "grad_e")
    logp = xe.linear_log_probs(e, c, t, bias=b, softcap=2.0, temperature=0.7).logp
    counted = t != -100
    close(-logp[counted].mean(), want, 1e-12, "mean -logp")


# -- a head split by vocabulary: the vocabulary-parallel engine through a DTensor ---------------------------


def _dtensor_case(rank: int, world: int):
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    e, c, b, t = make(torch.float64, n=12, shape=(2, 6))
    per_rank = -(-V // world)  # torch.chunk's split, as Shard(0) lays out the rows
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    mesh = init_device_mesh("cpu", (world,))
    local_c = c.detach()[rows].clone().requires_grad_()
    local_b = b.detach()[rows].clone().requires_grad_()
    head = DTensor.from_local(local_c, mesh, [Shard(0)], run_check=False, shape=c.shape, stride=c.stride())
    bias = DTensor.from_local(local_b, mesh, [Shard(0)], run_check=False, shape=b.shape, stride=b.stride())
    kw = dict(temperature=0.8, softcap=3.0, shift=True)
    out = xe.linear_log_probs(e, head, t, bias=bias, entropy=True, lse=True, chunk_size=4, **kw)
    ref = reference(e, c, b, t, **kw)
    for name, x, y in zip(("logp", "entropy", "lse"), out, ref):
        close(x, y, 1e-10, name)
    g = torch.Generator().manual_seed(3)
    r = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ref]
    mine = sum((ri * x).sum() for ri, x in zip(r, out))
    theirs = sum((ri * y).sum() for ri, y in zip(r, ref))
    mine.backward()
    ref_e, ref_c, ref_b = torch.autograd.grad(theirs, [e, c, b])
    close(e.grad, ref_e, 1e-10, "grad_e")  # summed over the ranks
    close(local_c.grad, ref_c[rows], 1e-10, "grad_c")
    close(local_b.grad, ref_b[rows], 1e-10, "grad_bias")


def test_a_head_split_by_vocabulary_over_two_gloo_ranks():
    from _gloo import check as check_ranks
    from _gloo import run_cases

    check_ranks(run_cases(2, {"dtensor": _dtensor_case}, timeout=120), "dtensor")
