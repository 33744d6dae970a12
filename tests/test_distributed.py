"""Vocabulary-parallel losses against the single-process dense result, on one, two and three gloo processes.

Every multi-process case of a world size runs in one launch (``_gloo.run_cases``: forked processes,
short collective and launch timeouts, so a hang fails fast); each test reads its case's outcome.

* Layouts: two ranks hold 4 and 7 of 11 classes; three ranks hold 4, 0 and 6 of 10 classes, the first
  rank the *last* classes (uneven, not divisible by the world size, a rank with no classes, rank order
  unlike class order). Targets fall on every rank's classes; some are ignored.
* Tolerances: float32 inputs within 1e-5 of the dense float32 result (``crossent.cross_entropy`` of
  ``e @ c.T + bias``, one process), float64 within 1e-10 of plain autograd on the formulas
  (``reference_streaming``), bfloat16 within 2e-2 of float32.
* Shard checks: a layout that does not tile the vocabulary, ranks that pass different rows, and a rank
  whose arguments are rejected make every rank raise (and the group stays usable afterwards).
* Ranks that disagree: rank 1 passes another value of one option at a time (``DISAGREEMENTS``: each
  option the ranks must share, on both engines and a DTensor head), or an argument that it alone
  rejects (``REJECTIONS``); every rank raises, naming the option and the ranks, each a case of the same
  launch (a hang or an abort in gloo fails the case within the collectives' timeout).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
import reference_streaming as R
from _gloo import check, run_cases
from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# -- the materialised engine (logits held by each rank) ---------------------------------------------

# 9 classes: two ranks hold 3 and 6; three ranks hold the last 4, none, the first 5.
MATERIALISED = {1: [(0, 9)], 2: [(0, 3), (3, 9)], 3: [(5, 9), (5, 5), (0, 5)]}


def loss_cases():
    return [
        dict(loss="ce"),
        dict(loss="ce", label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
        dict(loss="ce", weight=torch.linspace(0.2, 2.0, 9, dtype=torch.float64), ignore_index=4, reduction="sum"),
        dict(loss=xe.losses.get("focal", gamma=2.0), reduction="none"),
        dict(loss=xe.losses.get("ngce", q=0.7)),
        dict(loss=xe.losses.get("squentropy")),
        dict(loss=xe.losses.get("ldr_kl", lam=0.5, margin=0.1)),
        dict(loss=xe.losses.get("nce") + 2.0 * xe.losses.get("rce")),
        # Circle loss expects cosine logits: both paths see tanh of the same logits.
        dict(loss=xe.losses.get("circle", m=0.25, gamma=8.0), cosine=True),
    ]


def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    logits[0] = 1e4 * torch.sign(logits[0])
    target = torch.randint(0, 9, (6,), generator=g)
    target[1] = 4
    return logits, target


def check_materialised(rank: int, world: int):
    """Float64, 1e-10: each rank's loss and the dense gradient of its own columns."""
    logits, target = data()
    lo, hi = MATERIALISED[world][rank]
    for kw in loss_cases():
        squash = torch.tanh if kw.pop("cosine", False) else (lambda t: t)
        x = logits.clone().requires_grad_()
        ref = xe.cross_entropy(squash(x), target, **kw)
        upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        (ref_grad,) = torch.autograd.grad(ref, x, upstream)
        shard = x.detach()[:, lo:hi].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(squash(shard), target, vocab_start=lo, **kw)
        (grad,) = torch.autograd.grad(out, shard, upstream)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad[:, lo:hi], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"NormalizedFocal.*'vocab-parallel' engine"):
        vocab_parallel_cross_entropy(logits[:, lo:hi], target, vocab_start=lo, loss="nfl")


def test_single_process_equals_dense():
    check_materialised(0, 1)


def test_errors():
    logits, target = data()
    with pytest.raises(ValueError, match=r"rank 0's classes \[2, 11\) fall outside \[0, 9\)"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=2)
    with pytest.raises(ValueError, match="class-index targets"):
        vocab_parallel_cross_entropy(logits, torch.softmax(logits, -1), vocab_start=0)
    with pytest.raises(ValueError, match="target value 9 at position 0"):
        vocab_parallel_cross_entropy(logits, torch.full((6,), 9), vocab_start=0, vocab_size=9)
    with pytest.raises(TypeError, match="vocab_start must be an int, got NoneType"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=None)
    with pytest.raises(TypeError, match="vocab_start must be an int, got float 0.0"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=0.0)
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=0)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "linear"])
def test_a_partial_shard_without_a_process_group_is_refused(fused):
    """Without init_process_group a process must hold every class: no loss over the shard alone."""
    logits, target = data()
    e, c = torch.randn(6, 4), torch.randn(9, 4)

    def call(lo, hi, **kw):
        if fused:
            return vocab_parallel_linear_cross_entropy(e, c[lo:hi], target, vocab_start=lo, **kw)
        return vocab_parallel_cross_entropy(logits[:, lo:hi], target, vocab_start=lo, **kw)

    with pytest.raises(ValueError, match=r"classes \[3, 9\) are held by no rank.*No process group is initialised"):
        call(0, 3, vocab_size=9)
    with pytest.raises(ValueError, match=r"rank 0's classes \[3, 9\) fall outside \[0, 6\)\. No process group.*init_process_group"):
        call(3, 9)  # vocab_size omitted: 6 classes, and [3, 9) does not fit in them
    call(0, 9, vocab_size=9)


def test_linear_single_process_equals_linear_cross_entropy():
    """One process holds every class: the fused engine equals linear_cross_entropy (values, stats, gradients)."""
    e, c, b, target = linear_data(torch.float64)
    kw = dict(loss="focal", weight=torch.linspace(0.5, 1.5, V2, dtype=torch.float64), shift=True, chunk_size=7)
    leaves = [t.clone().requires_grad_() for t in (e, c, b)]
    got, stats = vocab_parallel_linear_cross_entropy(leaves[0], leaves[1], target, bias_shard=leaves[2], vocab_start=0,
                                                     return_stats=True, reduction="none", **kw)  # fmt: skip
    ref_leaves = [t.clone().requires_grad_() for t in (e, c, b)]
    want, want_stats = xe.linear_cross_entropy(*ref_leaves[:2], target, bias=ref_leaves[2], return_stats=True,
                                               reduction="none", **kw)  # fmt: skip
    upstream = torch.rand(got.shape, dtype=got.dtype)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.lse, want_stats.lse)
    assert torch.equal(stats.argmax, want_stats.argmax)
    for x, y in zip(leaves, ref_leaves):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


# -- the fused engine (e and a block of the classifier's rows) --------------------------------------

V2, V3 = 11, 10
# (vocab_start, classes) per rank
LINEAR = {2: [(0, 4), (4, 7)], 3: [(6, 4), (6, 0), (0, 6)]}
VOCAB = {2: V2, 3: V3}
ROWS, D = (2, 13), 8


def linear_data(dtype=torch.float32, vocab=V2):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(*ROWS, D, generator=g, dtype=torch.float64)
    c = torch.randn(vocab, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3
    target = torch.randint(0, vocab, ROWS, generator=g)
    target[0, :vocab] = torch.arange(vocab)  # every class, hence every rank, holds targets
    target[1, ::4] = -100
    return e.to(dtype), c.to(dtype), b.to(dtype), target


FUSED_LOSSES = {
    "ce": dict(),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.0),
    "focal": dict(loss=xe.losses.get("focal", gamma=2.0)),
    "gce": dict(loss=xe.losses.get("gce", q=0.7)),
    "nce+rce": dict(loss=xe.losses.get("nce") + xe.losses.get("rce")),
    "squentropy": dict(loss=xe.losses.get("squentropy")),
}


def _close(got, want, tol):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def fused_against_dense(rank: int, world: int, kw: dict, reduction: str, dtype=torch.float32, **call):
    """Loss and the gradients of e (whole), of this rank's rows of c and of its bias against the dense engine."""
    vocab = VOCAB[world]
    start, n = LINEAR[world][rank]
    e, c, b, target = linear_data(dtype, vocab)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 2e-2)
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    E, C, B = (t.detach().to(ref_dtype).requires_grad_() for t in (e, c, b))
    weight = call.pop("weight", None)
    ref = xe.cross_entropy((E @ C.T + B).reshape(-1, vocab), target.reshape(-1), reduction=reduction, weight=weight, **kw)
    ref = ref.reshape(ROWS) if reduction == "none" else ref
    upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    ref.backward(upstream)
    leaves = [e.clone().requires_grad_(), c[start : start + n].clone().requires_grad_(), b[start : start + n].clone().requires_grad_()]
    out = vocab_parallel_linear_cross_entropy(
        leaves[0], leaves[1], target, vocab_start=start, bias_shard=leaves[2], reduction=reduction, weight=weight, **kw, **call
    )
    # The loss is float32 for half-precision inputs, as from linear_cross_entropy.
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == ref.shape
    out.backward(upstream.to(out.dtype))
    _close(out.to(ref_dtype), ref.detach(), tol)
    for got, want in zip(leaves, (E.grad, C.grad[start : start + n], B.grad[start : start + n])):
        _close(got.grad.to(ref_dtype), want, tol)


def fused_loss_matrix(rank: int, world: int):
    """Every required loss, every reduction, several chunks (5 rows each) and one."""
    for kw in FUSED_LOSSES.values():
        for reduction in ("mean", "sum", "none"):
            fused_against_dense(rank, world, kw, reduction, chunk_size=5)
    fused_against_dense(rank, world, {}, "mean")
    fused_against_dense(rank, world, {}, "mean", options=xe.LinearCrossEntropyOptions(chunk_size=5, mode="recompute"))
    weight = torch.linspace(0.2, 2.0, VOCAB[world])
    fused_against_dense(rank, world, {}, "mean", weight=weight, chunk_size=5)
    fused_against_dense(rank, world, FUSED_LOSSES["focal"], "none", weight=weight, chunk_size=5)


def fused_against_formulas(rank: int, world: int):
    """Float64 against plain autograd on the formulas (reference_streaming), independent of crossent's engines."""
    vocab = VOCAB[world]
    start, n = LINEAR[world][rank]
    e, c, b, target = linear_data(torch.float64, vocab)
    cases = [("ce", {}, "ce"), ("focal", {"gamma": 2.0}, "focal"), ("gce", {"q": 0.7}, "gce"),
             ("squentropy", {}, "squentropy"), ("apl", {"active": "nce", "passive": "rce"}, "apl")]  # fmt: skip
    for name, hp, ref_name in cases:
        for reduction in ("mean", "none"):
            E, C, B = (t.clone().requires_grad_() for t in (e, c, b))
            z = (E @ C.T + B).reshape(-1, vocab)
            ref = R.reference(ref_name, hp, z, target.reshape(-1), reduction=reduction)
            ref = ref.reshape(ROWS) if reduction == "none" else ref
            upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
            ref.backward(upstream)
            leaves = [e.clone().requires_grad_(), c[start : start + n].clone().requires_grad_(),
                      b[start : start + n].clone().requires_grad_()]  # fmt: skip
            out = vocab_parallel_linear_cross_entropy(leaves[0], leaves[1], target, vocab_start=start, bias_shard=leaves[2],
                                                      loss=xe.losses.get(name, **hp), reduction=reduction, chunk_size=6)  # fmt: skip
            out.backward(upstream)
            _close(out, ref.detach(), 1e-10)
            for got, want in zip(leaves, (E.grad, C.grad[start : start + n], B.grad[start : start + n])):
                _close(got.grad, want, 1e-10)


def fused_stats_and_shift(rank: int, world: int):
    """return_stats (merged lse, global argmax) and the causal shift, against linear_cross_entropy."""
    vocab = VOCAB[world]
    start, n = LINEAR[world][rank]
    e, c, b, target = linear_data(torch.float32, vocab)
    e[0, 3] = 0.0  # a row of tied logits: argmax is the first class, wherever it lives
    for shift, reduction in ((False, "none"), (True, "mean")):
        kw = dict(shift=shift, reduction=reduction, return_stats=True, z_loss=1e-3)
        want, want_stats = xe.linear_cross_entropy(e, c, target, **kw)
        got, stats = vocab_parallel_linear_cross_entropy(e, c[start : start + n], target, vocab_start=start, chunk_size=4, **kw)
        _close(got, want, 1e-5)
        _close(stats.lse, want_stats.lse, 1e-5)
        assert torch.equal(stats.argmax, want_stats.argmax)
        assert stats.argmax[0, 3] == 0
    with torch.no_grad():
        got = vocab_parallel_linear_cross_entropy(e, c[start : start + n], target, vocab_start=start, chunk_size=4)
    _close(got, xe.linear_cross_entropy(e, c, target), 1e-5)
    # Every row ignored: no chunk, no all-gather on any rank; zero loss and gradients.
    leaves = [e.clone().requires_grad_(), c[start : start + n].clone().requires_grad_()]
    got = vocab_parallel_linear_cross_entropy(*leaves, torch.full(ROWS, -100), vocab_start=start)
    got.backward()
    assert got.item() == 0.0 and all(not x.grad.any() for x in leaves)


def fused_half_precision(rank: int, world: int):
    """bfloat16 (float32 accumulation) against the float32 dense result; the chunks pair up on every rank."""
    for reduction in ("mean", "none"):
        fused_against_dense(rank, world, {}, reduction, dtype=torch.bfloat16)
        fused_against_dense(rank, world, {}, reduction, dtype=torch.bfloat16, chunk_size=5)


# -- shard checks -----------------------------------------------------------------------------------


def _raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def shard_checks(rank: int, world: int):
    """Bad layouts, different rows, a rejected argument on one rank: every rank raises; the group goes on."""
    logits, target = data()
    e, c, _, t = linear_data(torch.float32, VOCAB[world])
    starts = [s for s, _ in MATERIALISED[world]]
    lo, hi = MATERIALISED[world][rank]

    def materialised(lo=lo, hi=hi, **kw):
        kw = {"target": target, "vocab_start": lo, **kw}
        return vocab_parallel_cross_entropy(logits[:, lo:hi], kw.pop("target"), **kw)

    def fused(start=None, n=None, rows=ROWS[1], **kw):
        s, m = LINEAR[world][rank]
        start, n = (s if start is None else start), (m if n is None else n)
        return vocab_parallel_linear_cross_entropy(e[:, :rows], c[start : start + n], t[:, :rows], vocab_start=start, **kw)

    # Every rank starts at 0: classes held twice, classes held by no rank.
    if world == 2:
        _raises(ValueError, r"classes \[0, 3\) are held by ranks 0 and 1; classes \[6, 9\) are held by no rank", lambda: materialised(0, hi - lo))
        _raises(ValueError, r"classes \[3, 4\) are held by no rank \(rank 0 holds \[0, 3\), rank 1 holds \[4, 9\)\)",
                lambda: materialised(4 if rank else 0, 9 if rank else 3, vocab_size=9))  # fmt: skip
        _raises(ValueError, r"classes \[0, 4\) are held by ranks 0 and 1", lambda: fused(start=0, n=4))
    else:
        # The rank without classes is not a gap; the last classes of rank 0 missing are.
        _raises(ValueError, r"classes \[8, 9\) are held by no rank", lambda: materialised(lo, hi - 1 if rank == 0 else hi, vocab_size=9))
        _raises(ValueError, r"classes \[4, 6\) are held by ranks 2 and 1",
                lambda: fused(start=4 if rank == 1 else None, n=2 if rank == 1 else None))  # fmt: skip
    # The ranks disagree on a value they must share.
    _raises(ValueError, r"the same vocab_size \(rank 0: 9 / rank 1: 10", lambda: materialised(vocab_size=9 + rank))
    _raises(ValueError, r"the same target \(its values differ: rank 0 / ranks? 1", lambda: materialised(target=(target + rank) % 9))
    _raises(ValueError, r"target \(rank 0: a tensor of shape \(2, 13\) / rank 1: a tensor of shape \(2, 12\)",
            lambda: fused(rows=13 - rank))  # fmt: skip
    _raises(ValueError, r"ignore_index \(rank 0: -100 / ranks? 1(, 2)?: 3\)", lambda: fused(ignore_index=-100 if rank == 0 else 3))
    # One rank rejects its arguments: it raises its own error, every other rank says which rank failed.
    if rank == 1:
        _raises(TypeError, "vocab_start must be an int, got NoneType", lambda: materialised(lo=None))
        _raises(ValueError, "e has 8 features but c has 7", lambda: vocab_parallel_linear_cross_entropy(
            e, c[4:, :7], t, vocab_start=4))  # fmt: skip
    else:
        _raises(RuntimeError, r"rank 1 of the vocabulary-parallel group rejected its arguments.*TypeError: vocab_start", materialised)
        _raises(RuntimeError, r"rank 1 .*ValueError: e has 8 features but c has 7", fused)
    # Whole-row losses: refused on every rank by name.
    _raises(ValueError, r"NormalizedFocal.*'vocab-parallel' engine", lambda: fused(loss="nfl"))
    # The group is still usable: a correct call on every rank.
    _close(materialised(), xe.cross_entropy(logits, target), 1e-10)
    _close(fused(), xe.linear_cross_entropy(e, c, t), 1e-5)
    assert len(starts) == world


# -- ranks that disagree on the call ----------------------------------------------------------------


def fused_call(rank: int, world: int, dtype=torch.float32, features=D, e_grad=True, bias=False, bias_rows=None, **kw):
    """A fused call of this rank's shard, through backward (where e's gradient is all-reduced)."""
    e, c, b, t = linear_data(dtype, VOCAB[world])
    start, n = LINEAR[world][rank]
    e = e[..., :features].clone().requires_grad_(e_grad)
    c = c[start : start + n, :features].clone().requires_grad_()
    b = b[start : start + (n if bias_rows is None else bias_rows)] if bias else None
    out = vocab_parallel_linear_cross_entropy(e, c, t, vocab_start=start, bias_shard=b, **kw)
    (out[0] if isinstance(out, tuple) else out).sum().backward()


def materialised_call(rank: int, world: int, dtype=torch.float64, **kw):
    logits, target = data()
    lo, hi = MATERIALISED[world][rank]
    shard = logits[:, lo:hi].to(dtype).requires_grad_()
    vocab_parallel_cross_entropy(shard, target, vocab_start=lo, **kw).sum().backward()


def dtensor_call(rank: int, world: int, plain_bias: bool = False, **kw):
    """linear_cross_entropy of a ColwiseParallel head's weight (a DTensor split Shard(0), as torch.chunk splits);
    ``plain_bias``: with a plain tensor as its bias, a layout that rank alone gets wrong."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    e, c, _, t = linear_data(torch.float32, VOCAB[world])
    per_rank = -(-VOCAB[world] // world)
    local = c[rank * per_rank : (rank + 1) * per_rank]
    mesh = init_device_mesh("cpu", (world,))
    head = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=c.shape, stride=c.stride())
    if plain_bias:
        kw["bias"] = torch.zeros(local.shape[0])
    xe.linear_cross_entropy(e, head, t, **kw)


def two_entry_points(rank: int, world: int, mixed: bool = False):
    """Rank 0 calls vocab_parallel_cross_entropy and the others the fused entry point (``mixed``), or every
    rank the latter."""
    (materialised_call if mixed and rank == 0 else fused_call)(rank, world)


#: One option at a time on which rank 1 differs from rank 0: the call, rank 0's and rank 1's arguments,
#: and what the error of every rank says after "every rank ... must pass the same".
DISAGREEMENTS = {
    "label_smoothing": (fused_call, {}, dict(label_smoothing=0.1), r"label_smoothing \(rank 0: 0\.0 / rank 1: 0\.1\)"),
    "z_loss": (fused_call, {}, dict(z_loss=1e-2), r"z_loss \(rank 0: 0\.0 / rank 1: 0\.01\)"),
    "softcap": (fused_call, {}, dict(softcap=2.0), r"softcap \(rank 0: None / rank 1: 2\.0\)"),
    "shift": (fused_call, {}, dict(shift=True), r"shift \(rank 0: False / rank 1: True\)"),
    "dtype": (fused_call, {}, dict(dtype=torch.float64), r"dtype .*\(rank 0: torch.float32 / rank 1: torch.float64\)"),
    "D": (fused_call, {}, dict(features=D - 1), rf"D .*\(rank 0: {D} / rank 1: {D - 1}\)"),
    "loss": (fused_call, {}, dict(loss="gce"), r"loss \(rank 0: 'ce' / rank 1: 'gce'\)"),
    "loss_hyperparameter": (fused_call, dict(loss=xe.losses.get("focal", gamma=2.0)), dict(loss=xe.losses.get("focal", gamma=3)),
                            r"loss \(rank 0: Focal\(gamma=2\.0, alpha=None\) / rank 1: Focal\(gamma=3\.0, alpha=None\)\)"),
    "bias": (fused_call, {}, dict(bias=True), r"bias_shard \(given or not\) \(rank 0: False / rank 1: True\)"),
    "weight_values": (fused_call, dict(weight=torch.linspace(0.5, 1.5, V2)), dict(weight=torch.linspace(0.5, 1.6, V2)),
                      r"weight \(the class weights\) \(its values differ: rank 0 / rank 1\)"),
    "weight_given": (fused_call, {}, dict(weight=torch.ones(V2)), r"weight .* \(rank 0: None / rank 1: a tensor of shape \(11,\)\)"),
    "extra_values": (fused_call, dict(extra={"w": torch.zeros(ROWS)}), dict(extra={"w": torch.ones(ROWS)}),
                     r"extra \(its values differ: rank 0 / rank 1\)"),
    "reduction": (fused_call, {}, dict(reduction="sum"), r"reduction \(rank 0: 'mean' / rank 1: 'sum'\)"),
    "return_stats": (fused_call, {}, dict(return_stats=True), r"return_stats \(rank 0: \(\) / rank 1: \('lse', 'argmax'\)\)"),
    "chunk_size": (fused_call, dict(chunk_size=4), dict(chunk_size=5), r"chunk_size \(rank 0: 4 / rank 1: 5\)"),
    "mode": (fused_call, {}, dict(options=xe.LinearCrossEntropyOptions(mode="recompute")), r"mode \(rank 0: 'auto' / rank 1: 'recompute'\)"),
    "e_gradient": (fused_call, {}, dict(e_grad=False),
                   r"inputs that need a gradient \(rank 0: \('e', 'c_shard'\) / rank 1: \('c_shard',\)\)"),
    "entry_point": (two_entry_points, dict(mixed=True), dict(mixed=True),
                    r"entry point \(rank 0: 'vocab_parallel_cross_entropy' / rank 1: 'vocab_parallel_linear_cross_entropy'\)"),
    "materialised_label_smoothing": (materialised_call, {}, dict(label_smoothing=0.1), r"label_smoothing \(rank 0: 0\.0 / rank 1: 0\.1\)"),
    "materialised_dtype": (materialised_call, {}, dict(dtype=torch.float32), r"dtype .*\(rank 0: torch.float64 / rank 1: torch.float32\)"),
    "materialised_softcap": (materialised_call, {}, dict(softcap=2.0), r"softcap \(rank 0: None / rank 1: 2\.0\)"),
    "materialised_weight_values": (materialised_call, dict(weight=torch.linspace(0.5, 1.5, 9)), dict(weight=torch.linspace(0.5, 1.6, 9)),
                                   r"weight \(the class weights\) \(its values differ: rank 0 / rank 1\)"),
    "dtensor_normalizer": (dtensor_call, {}, dict(normalizer=7.0), r"normalizer \(rank 0: None / rank 1: tensor\(7\.0\)\)"),
    "dtensor_label_smoothing": (dtensor_call, {}, dict(label_smoothing=0.1), r"label_smoothing \(rank 0: 0\.0 / rank 1: 0\.1\)"),
}  # fmt: skip

#: One option at a time that rank 1 alone rejects: the call, rank 0's and rank 1's arguments, and rank
#: 1's own error, which every other rank quotes.
REJECTIONS = {
    "loss_refused": (fused_call, {}, dict(loss="nfl"), ValueError, r"NormalizedFocal.*'vocab-parallel' engine"),
    "materialised_loss_refused": (materialised_call, {}, dict(loss="nfl"), ValueError, r"NormalizedFocal.*'vocab-parallel' engine"),
    "bias_length": (fused_call, dict(bias=True), dict(bias=True, bias_rows=6), ValueError, r"bias must have shape \[7\], got \(6,\)"),
    "extra_shape": (fused_call, dict(extra={"w": torch.zeros(ROWS)}), dict(extra={"w": torch.zeros(26)}), ValueError,
                    r"extra\['w'\] must start with the target's shape"),
    "dtensor_sample_weight": (dtensor_call, {}, dict(sample_weight=torch.ones(ROWS)), ValueError,
                              r"sample_weight is not available for a DTensor classifier"),
    "dtensor_normalizer_value": (dtensor_call, dict(normalizer=7.0), dict(normalizer=-1.0), ValueError, r"normalizer must be > 0"),
    "dtensor_layout": (dtensor_call, {}, dict(plain_bias=True), ValueError, r"bias is a plain tensor; it must be laid out like c"),
}  # fmt: skip


def disagreeing(rank: int, world: int, spec: tuple):
    """Rank 1 differs on one option (``spec``: an entry of DISAGREEMENTS): every rank raises the same
    error naming it; the group goes on."""
    call, mine, theirs, message = spec
    every_rank = r"every rank of the vocabulary-parallel group must pass the same .*"
    _raises(ValueError, every_rank + message, lambda: call(rank, world, **(theirs if rank == 1 else mine)))
    call(rank, world)


def rejected(rank: int, world: int, spec: tuple):
    """Rank 1 alone rejects its arguments (``spec``: an entry of REJECTIONS): it raises its own error,
    every other rank quotes it; the group goes on."""
    call, mine, theirs, exc, message = spec
    if rank == 1:
        _raises(exc, message, lambda: call(rank, world, **theirs))
    else:
        quoted = rf"rank 1 of the vocabulary-parallel group rejected its arguments.*{exc.__name__}: .*{message}"
        _raises(RuntimeError, quoted, lambda: call(rank, world, **mine))
    call(rank, world)


def disagreeing_on_one_rank_of_three(rank: int, world: int):
    """Ranks that share a value are named together."""
    _raises(ValueError, r"label_smoothing \(ranks 0, 1: 0\.0 / rank 2: 0\.1\)",
            lambda: fused_call(rank, world, label_smoothing=0.1 if rank == 2 else 0.0))  # fmt: skip
    fused_call(rank, world)


def _disagreement_cases() -> dict:
    """Every disagreement and rejection of two ranks, each a case of the same launch."""
    cases = {f"disagree:{name}": functools.partial(disagreeing, spec=spec) for name, spec in DISAGREEMENTS.items()}
    cases.update({f"reject:{name}": functools.partial(rejected, spec=spec) for name, spec in REJECTIONS.items()})
    return cases


# -- DTensor, DDP and FSDP2 -------------------------------------------------------------------------


def dtensor_head(rank: int, world: int):
    """A ColwiseParallel lm_head: linear_cross_entropy(h, head.weight, ...) dispatches to the vocab-parallel engine."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    for vocab in (VOCAB[world], world + 1):  # uneven; with three ranks and 4 classes, torch.chunk leaves one rank none
        e, _, _, target = linear_data(torch.float32, vocab)
        torch.manual_seed(0)
        head = torch.nn.Linear(D, vocab)
        ref = copy.deepcopy(head)
        parallelize_module(head, mesh, ColwiseParallel())
        assert isinstance(head.weight, DTensor) and head.weight.placements == (Shard(0),)
        h, h_ref = e.clone().requires_grad_(), e.clone().requires_grad_()
        crit = xe.nn.LinearCrossEntropy(label_smoothing=0.1, chunk_size=6)
        loss = crit(h, head.weight, target, head.bias)
        want = crit(h_ref, ref.weight, target, ref.bias)
        assert not isinstance(loss, DTensor)
        loss.backward()
        want.backward()
        _close(loss, want, 1e-5)
        _close(h.grad, h_ref.grad, 1e-5)
        assert isinstance(head.weight.grad, DTensor) and head.weight.grad.placements == (Shard(0),)
        _close(head.weight.grad.full_tensor(), ref.weight.grad, 1e-5)
        _close(head.bias.grad.full_tensor(), ref.bias.grad, 1e-5)
    # normalizer divides the vocabulary-parallel sum; the entropy is not among its statistics.
    plain, count = ref.weight.detach(), torch.tensor(7.0)
    got = xe.linear_cross_entropy(e, head.weight.detach(), target, bias=head.bias.detach(), normalizer=count)
    _close(got, xe.linear_cross_entropy(e, plain, target, bias=ref.bias.detach(), normalizer=count), 1e-6)
    _raises(ValueError, "reports lse and argmax, not the entropy",
            lambda: xe.linear_cross_entropy(e, head.weight, target, return_stats="entropy"))  # fmt: skip
    # Replicated everywhere: the single-process engine on the local copy, every option included.
    w = distribute_tensor(plain, mesh, [Replicate()])
    _close(xe.linear_cross_entropy(e, w, target), xe.linear_cross_entropy(e, plain, target), 1e-6)
    weights = torch.linspace(0.0, 1.0, target.numel()).reshape(target.shape)
    _close(xe.linear_cross_entropy(e, w, target, sample_weight=weights),
           xe.linear_cross_entropy(e, plain, target, sample_weight=weights), 1e-6)  # fmt: skip
    # Layouts it does not handle, named.
    by_columns = distribute_tensor(ref.weight.detach(), mesh, [Shard(1)])
    _raises(ValueError, r"c is a DTensor placed \(Shard\(dim=1\),\).*Shard\(0\)", lambda: xe.linear_cross_entropy(e, by_columns, target))
    rows_split = distribute_tensor(e, mesh, [Shard(0)])
    _raises(ValueError, r"e is a DTensor placed \(Shard\(dim=0\),\).*Replicate\(\)", lambda: xe.linear_cross_entropy(rows_split, head.weight, target))
    _raises(TypeError, "e is a DTensor placed .* but c is a plain tensor", lambda: xe.linear_cross_entropy(rows_split, ref.weight, target))
    _raises(ValueError, "bias is a plain tensor; it must be laid out like c",
            lambda: xe.linear_cross_entropy(e, head.weight, target, bias=ref.bias))  # fmt: skip


class TinyLM(torch.nn.Module):
    """A body and a head whose loss is computed in forward, by the functional form or the module."""

    def __init__(self, module_loss: bool):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, D), torch.nn.Tanh())
        self.head = torch.nn.Linear(D, V2)
        self.crit = xe.nn.LinearCrossEntropy(z_loss=1e-2, chunk_size=4) if module_loss else None

    def forward(self, x, y):
        h = self.body(x)
        if self.crit is not None:
            return self.crit(h, self.head.weight, y, self.head.bias)
        return xe.linear_cross_entropy(h, self.head.weight, y, bias=self.head.bias, label_smoothing=0.1, chunk_size=4)


def _train(model, params, batches, lr=0.5):
    opt = torch.optim.SGD(params, lr=lr)
    for x, y in batches:
        opt.zero_grad()
        model(x, y).backward()
        opt.step()


def _batches(world: int, steps: int = 3, rows: int = 6):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(world * rows, 6, generator=g), torch.randint(0, V2, (world * rows,), generator=g)) for _ in range(steps)]


def _local(batches, rank: int, world: int):
    n = batches[0][0].shape[0] // world
    return [(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]) for x, y in batches]


def data_parallel(rank: int, world: int, wrap: str):
    """DDP / FSDP2 on two ranks equals one process on the concatenated batch (equal rows per rank)."""
    batches = _batches(world)
    for module_loss in (False, True):
        torch.manual_seed(0)
        model = TinyLM(module_loss)
        single = copy.deepcopy(model)
        _train(single, single.parameters(), batches)
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            _train(wrapped, wrapped.parameters(), _local(batches, rank, world))
            trained = dict(model.named_parameters())
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.body)
            fully_shard(model)
            _train(model, model.parameters(), _local(batches, rank, world))
            trained = {k: v.full_tensor() for k, v in model.named_parameters()}
        for name, p in single.named_parameters():
            _close(trained[name].detach(), p.detach(), 1e-5)


def torchrun_example(rank: int, world: int):
    """examples/tensor_parallel_head.py (launched with torchrun) trains like one process."""
    spec = importlib.util.spec_from_file_location("tensor_parallel_head", EXAMPLES / "tensor_parallel_head.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with contextlib.redirect_stdout(io.StringIO()):
        assert example.train(steps=4) < 1e-5


def _cases(world: int) -> dict:
    cases = {
        "materialised": check_materialised,
        "shard_checks": shard_checks,
        "fused_loss_matrix": fused_loss_matrix,
        "fused_against_formulas": fused_against_formulas,
        "fused_stats_and_shift": fused_stats_and_shift,
        "fused_half_precision": fused_half_precision,
        "dtensor_head": dtensor_head,
    }
    if world == 2:
        cases["ddp"] = functools.partial(data_parallel, wrap="ddp")
        cases["fsdp2"] = functools.partial(data_parallel, wrap="fsdp2")
        cases["torchrun_example"] = torchrun_example
    else:
        cases["disagree_on_one_rank_of_three"] = disagreeing_on_one_rank_of_three
    return cases


@functools.cache
def _launch(world: int) -> dict:
    # Imported here, once, so that the forked ranks inherit them instead of importing them each
    # (the first call of an entry point imports torch._dynamo).
    import torch._dynamo
    import torch.distributed.fsdp
    import torch.distributed.tensor.parallel

    cases = {**_cases(world), **(_disagreement_cases() if world == 2 else {})}
    return run_cases(world, cases, timeout=150, gloo_timeout=20)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases(2)))
def test_two_gloo_ranks(case):
    check(_launch(2), case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_disagreement_cases()))
def test_ranks_that_disagree_raise_on_every_rank(case):
    """Rank 1 passes another value of one option, or an argument that it alone rejects: every rank raises,
    naming the option and the ranks, within the collectives' timeout (a hang or an abort fails the case)."""
    check(_launch(2), case)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases(3)))
def test_three_gloo_ranks_one_without_classes(case):
    check(_launch(3), case)


def _claimed_row() -> str:
    """The gathered row of a call's options, as a rank claims them: a loss object, class weights, extras, dtypes."""
    from crossent._engine.shards import Claim, _row

    loss = xe.losses.get("focal", gamma=2.0) + 0.5 * xe.losses.get("gce", q=0.7)
    claim = Claim(0, 4, 11, torch.arange(6), -100, loss=loss, softcap=2.0, weight=torch.linspace(0.5, 1.5, 11),
                  extra={"w": torch.ones(6)}, dtype=torch.bfloat16, gradients=("e",), mode="auto")  # fmt: skip
    return str(_row("vocab_parallel_linear_cross_entropy", claim, "cpu").tolist())


@pytest.mark.slow
def test_the_fingerprints_of_options_do_not_depend_on_the_process():
    """Ranks are separate processes, forked or not: a fingerprint must not change with the process (as
    Python's salted hash of a string, or a repr holding an address, would)."""
    path = os.pathsep.join(str(p) for p in (Path(xe.__file__).parents[1], Path(__file__).parent))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": path}
    code = "import test_distributed as t; print(t._claimed_row())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _claimed_row()


def test_whole_row_and_stateful_losses_are_refused_by_name():
    e, c, _, t = linear_data()
    with pytest.raises(ValueError, match=r"NormalizedFocal.*'vocab-parallel' engine"):
        vocab_parallel_linear_cross_entropy(e, c, t, vocab_start=0, loss="nfl")
    with pytest.raises(ValueError, match=r"AdaptiveLDRKL.*needs whole logit rows.*'vocab-parallel'"):
        vocab_parallel_linear_cross_entropy(e, c, t, vocab_start=0, loss=xe.losses.get("aldr_kl"))


def test_the_triton_backend_is_refused_by_name():
    e, c, _, t = linear_data()
    with pytest.raises(ValueError, match=r"row-chunked engine on every rank; backend='triton'"):
        vocab_parallel_linear_cross_entropy(e, c, t, vocab_start=0, backend="triton")


def test_cross_entropy_of_the_dense_reference_is_pytorchs():
    """The dense float32 reference of the multi-process tests is PyTorch's own cross-entropy."""
    e, c, b, t = linear_data()
    z = e @ c.T + b
    z, t = z.reshape(-1, V2), t.reshape(-1)
    _close(xe.cross_entropy(z, t, label_smoothing=0.1), F.cross_entropy(z, t, label_smoothing=0.1), 1e-6)
