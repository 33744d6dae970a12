"""``torch.compile(fullgraph=True)`` on both entry points: no graph break, eager's values and gradients.

* ``cross_entropy`` is traced through its formula (ordinary autograd ops): CE, label smoothing, z-loss,
  focal and a whole-row loss (``nfl``) on the ``aot_eager`` and ``inductor`` CPU backends, in one
  compiled function each (one compilation); every registered loss and option on the ``eager``
  backend (Dynamo's full-graph capture, the part that breaks graphs), with a stateful loss, alone and
  inside APL, whose state moves once per call, as in eager mode.
* ``linear_cross_entropy`` runs its row-chunked engine as one custom operator: the same five losses,
  ``reduction="none"``, ``return_stats``, ``shift`` and the recompute mode, on both backends; values
  and gradients equal eager mode's exactly (the same engine runs).
* Checks that read the target become device asserts: an out-of-range target fails when the graph runs.
* Hyperparameter schedules: float hyperparameters that change every call (``z_loss``,
  ``label_smoothing``, ``softcap``, a loss weight, a temperature, and the hyperparameters of losses
  built in the compiled code) compile at most twice for any number of values (once with
  ``dynamic=True``), and a bad value still raises.

Tolerances: values and gradients of ``cross_entropy`` 1e-6 relative (float32; the compiled formula
may order its sums differently), ``linear_cross_entropy`` exact. Shapes are tiny: the cost is the
compilation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

import crossent as xe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

g = torch.Generator().manual_seed(0)
X = torch.randn(6, 5, generator=g)
Y = torch.tensor([0, 4, 2, -100, 1, 3])
E, C, B = torch.randn(6, 4, generator=g), torch.randn(7, 4, generator=g), torch.randn(7, generator=g)
T7 = torch.tensor([0, 6, 2, -100, 5, 3])
FOCAL = xe.losses.get("focal", gamma=2.0)
REQUIRED = {
    "ce": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "focal": {"loss": FOCAL},
    "whole_row": {"loss": "nfl"},
}


def close(a, b, rtol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()))


def grads_of(outs, inputs):
    """Each output's gradients with respect to ``inputs`` (one backward per output)."""
    return [torch.autograd.grad(o.sum(), inputs, retain_graph=True) for o in outs]


def compare(fn, inputs, backend, rtol):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    outs, ref = compiled(*leaves), fn(*eager_leaves)
    for name, o, r, go, gr in zip(REQUIRED, outs, ref, grads_of(outs, leaves), grads_of(ref, eager_leaves)):
        if rtol:
            close(o, r, rtol)
        else:
            assert torch.equal(o, r), name
        for a, b in zip(go, gr):
            if rtol:
                close(a, b, rtol)
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cross_entropy_fullgraph(backend):
    def losses(x):
        return [xe.cross_entropy(x, Y, **kw) for kw in REQUIRED.values()]

    compare(losses, [X], backend, rtol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_linear_cross_entropy_fullgraph(backend):
    def losses(e, c, b):
        return [xe.linear_cross_entropy(e, c, T7, bias=b, chunk_size=4, **kw) for kw in REQUIRED.values()]

    compare(losses, [E, C, B], backend, rtol=0)


def test_linear_cross_entropy_options_under_compile():
    recompute = xe.LinearCrossEntropyOptions(mode="recompute", chunk_size=2)
    w = torch.rand(7, generator=g) - 0.3
    seq = torch.tensor([[0, 6, 2], [-100, 5, 3]])
    calls = [
        lambda e, c: xe.linear_cross_entropy(e, c, T7, reduction="none", weight=w),
        lambda e, c: xe.linear_cross_entropy(e, c, T7, reduction="sum", options=recompute, softcap=3.0)[None],
        lambda e, c: xe.linear_cross_entropy(e.reshape(2, 3, 4), c, seq, shift=True, reduction="none").reshape(-1),
    ]

    def outputs(e, c):
        out = [call(e, c) for call in calls]
        loss, stats = xe.linear_cross_entropy(e, c, T7, return_stats=True, label_smoothing=0.1)
        return out + [loss[None], stats.lse, stats.argmax.double()]

    torch._dynamo.reset()
    compiled = torch.compile(outputs, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (E, C)]
    eager = [t.clone().requires_grad_() for t in (E, C)]
    got, ref = compiled(*leaves), outputs(*eager)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    for ga, gb in zip(grads_of(got[:4], leaves), grads_of(ref[:4], eager)):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)


def test_every_loss_and_option_traces_in_one_graph():
    """Dynamo's full-graph capture of every registered loss and of each option (the ``eager`` backend
    runs the captured graph as it is; the other backends compile that same graph)."""
    C = 5
    T = torch.tensor([[0.8, 0.1, 0.1, 0.0, 0.0], [0.1, 0.8, 0.1, 0.0, 0.0], [0.0, 0.1, 0.8, 0.1, 0.0],
                      [0.0, 0.0, 0.1, 0.8, 0.1], [0.1, 0.0, 0.0, 0.1, 0.8]])  # fmt: skip
    special = {"forward_correction": {"T": T}, "backward_correction": {"T": T}, "aldr_kl": {"num_samples": 6}}
    objects = {name: xe.losses.get(name, **special.get(name, {})) for name in xe.losses.available()}
    objects["apl_of_aldr_kl"] = xe.losses.APL(active=xe.losses.AdaptiveLDRKL(num_samples=6), passive="rce")
    ids = torch.arange(6)
    q = torch.softmax(torch.randn(6, C, generator=g), -1)
    w = torch.rand(C, generator=g) - 0.3
    x4, y4 = torch.randn(2, C, 3, generator=g), torch.randint(0, C, (2, 3), generator=g)

    def everything(x, x4, objects):
        out = [xe.cross_entropy(x, Y, loss=loss, extra={"sample_ids": ids}) for loss in objects.values()]
        out += [
            xe.cross_entropy(x, Y, w, reduction="none", label_smoothing=0.2, z_loss=1e-3, softcap=4.0),
            xe.cross_entropy(x, Y.clamp(min=0), ignore_index=2, reduction="sum")[None],
            xe.cross_entropy(x, q, w, label_smoothing=0.1)[None],
            xe.cross_entropy(x, q, loss="sigmoid_focal")[None],
            xe.cross_entropy(x4, y4, w, reduction="none").reshape(-1),
        ]
        return [o.reshape(-1) for o in out]

    eager_objects = copy.deepcopy(objects)
    torch._dynamo.reset()
    compiled = torch.compile(everything, backend="eager", fullgraph=True)
    a, a4, b, b4 = (t.clone().requires_grad_() for t in (X, x4, X, x4))
    got, ref = compiled(a, a4, objects), everything(b, b4, eager_objects)
    for o, r in zip(got, ref):
        close(o, r)
    total, ref_total = sum(o.sum() for o in got), sum(r.sum() for r in ref)
    for u, v in zip(torch.autograd.grad(total, (a, a4)), torch.autograd.grad(ref_total, (b, b4))):
        close(u, v, 1e-5)
    # The stateful losses, alone and inside a wrapper, moved once, as in eager mode.
    for name in ("aldr_kl", "apl_of_aldr_kl"):
        lambdas, eager_lambdas = (o[name].state_modules()[0].lambdas for o in (objects, eager_objects))
        close(lambdas, eager_lambdas)
        assert not torch.equal(lambdas, torch.full((6,), 1.0, dtype=torch.float64))


def test_target_checks_are_device_asserts_under_compile():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: xe.cross_entropy(x, y), backend="aot_eager", fullgraph=True)
    compiled(X, Y)
    with pytest.raises(RuntimeError, match=r"target values must be in \[0, 5\)"):
        compiled(X, torch.tensor([0, 4, 2, 9, 1, 3]))


def test_linear_cross_entropy_under_compile_names_what_it_cannot_take():
    torch._dynamo.reset()
    inside = torch.compile(
        lambda e, c: xe.linear_cross_entropy(e, c, T7, loss=xe.losses.get("focal")), backend="eager", fullgraph=True
    )
    with pytest.raises(Exception, match="built inside the compiled code"):
        inside(E, C)
    aldr = xe.losses.get("aldr_kl", num_samples=6)
    stateful = torch.compile(
        lambda e, c: xe.linear_cross_entropy(e, c, T7, loss=aldr, extra={"sample_ids": torch.arange(6)}),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match="keeps state"):
        stateful(E, C)
    wrapped = xe.losses.APL(active=xe.losses.AdaptiveLDRKL(num_samples=6), passive="rce")
    torch._dynamo.reset()
    stateful_inside = torch.compile(
        lambda e, c: xe.linear_cross_entropy(e, c, T7, loss=wrapped, extra={"sample_ids": torch.arange(6)}),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match="keeps state"):
        stateful_inside(E, C)


# -- hyperparameter schedules: no recompilation per value ---------------------------------------------

#: Four steps of a schedule: z_loss, label_smoothing, softcap, a loss weight and a temperature, each new.
SCHEDULE = [
    (1e-3, 0.05, 4.0, 0.5, 1.5),
    (2e-3, 0.1, 5.0, 1.0, 2.0),
    (4e-3, 0.2, 3.0, 1.5, 0.5),
    (8e-3, 0.3, 6.0, 2.0, 1.0),
]
#: Compilations for the whole schedule. By default PyTorch compiles a float argument's first value as a
#: constant and, once it changes, compiles once more with the value symbolic (its "automatic dynamic"
#: policy, as for shapes); ``dynamic=True`` makes it symbolic from the first call.
COMPILES = {None: 2, True: 1}


def run_schedule(fn, inputs, dynamic, rtol):
    """``fn(*leaves, *step)`` compiled and eager over :data:`SCHEDULE`: values and gradients equal, and
    the number of graphs compiled (a compilation that PyTorch restarts, to specialise a value it cannot
    keep symbolic, counts once)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for step in SCHEDULE:
        leaves = [t.clone().requires_grad_() for t in inputs]
        eager_leaves = [t.clone().requires_grad_() for t in inputs]
        got, ref = compiled(*leaves, *step), fn(*eager_leaves, *step)
        got_grads = torch.autograd.grad(got.sum(), leaves)
        ref_grads = torch.autograd.grad(ref.sum(), eager_leaves)
        for a, b in zip((got, *got_grads), (ref, *ref_grads)):
            if rtol:
                close(a, b, rtol)
            else:
                assert torch.equal(a, b)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dynamic", [None, True])
def test_cross_entropy_hyperparameter_schedule_compiles_once(dynamic):
    """Found as: ``z_loss`` changing between calls of a ``fullgraph=True`` function broke the graph
    (``math.isfinite`` of a traced float in the argument checks)."""

    def losses(x, z_loss, smoothing, cap, w, temperature):
        tempered = xe.losses.Transformed(xe.losses.CrossEntropy(), xe.transforms.Temperature(temperature))
        return torch.stack([
            xe.cross_entropy(x, Y, z_loss=z_loss, label_smoothing=smoothing, softcap=cap),
            xe.cross_entropy(x, Y, loss=xe.losses.get("ce") + w * xe.losses.ZLoss(1e-2)),
            xe.cross_entropy(x, Y, loss=tempered),
        ])  # fmt: skip

    assert run_schedule(losses, [X], dynamic, rtol=1e-6) == COMPILES[dynamic]


@pytest.mark.parametrize("dynamic", [None, True])
def test_linear_cross_entropy_hyperparameter_schedule_compiles_once(dynamic):
    """The fused operator takes the float hyperparameters as a tensor: a float argument of a custom
    operator is a constant of the graph, which recompiled for every value."""
    recompute = xe.LinearCrossEntropyOptions(mode="recompute", chunk_size=4)

    def losses(e, c, z_loss, smoothing, cap, w, temperature):
        kw = dict(z_loss=z_loss, label_smoothing=smoothing, softcap=cap)
        return torch.cat([
            xe.linear_cross_entropy(e, c, T7, chunk_size=4, **kw)[None],
            w * xe.linear_cross_entropy(e, c, T7, reduction="none", options=recompute, **kw),
        ])  # fmt: skip

    assert run_schedule(losses, [E, C], dynamic, rtol=0) == COMPILES[dynamic]


def test_loss_hyperparameters_built_in_the_compiled_code_stay_symbolic():
    """Losses built inside the compiled function from changing floats: statistics keyed by a float
    (``ldr_kl``'s tempered log-sum-exp, ``ngce``'s power sum) and ``math`` functions of one (``tgce``'s
    ``q`` and ``k``, ``comp_sum``'s ``tau`` below 1, ``encouraging``'s ``log_end``) once specialised the
    graph to each value."""

    def losses(x, lam, q, k, tau, log_end):
        built = [
            xe.losses.get("ldr_kl", lam=lam),
            xe.losses.get("ngce", q=q),
            xe.losses.get("tgce", q=q, k=k),
            xe.losses.get("comp_sum", tau=tau),
            xe.losses.get("encouraging", log_end=log_end),
        ]
        return torch.stack([xe.cross_entropy(x, Y, loss=loss) for loss in built])

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(losses, backend="eager", fullgraph=True)
    for step in [(1.0, 0.3, 0.3, 0.3, 0.5), (2.0, 0.5, 0.4, 0.5, 0.6), (3.0, 0.6, 0.5, 0.7, 0.7)]:
        close(compiled(X, *step), losses(X, *step))
    assert counters["stats"]["unique_graphs"] == COMPILES[None]


@pytest.mark.parametrize(
    "call",
    [
        lambda x, e, c, v: xe.cross_entropy(x, Y, z_loss=v),
        lambda x, e, c, v: xe.linear_cross_entropy(e, c, T7, z_loss=v),
    ],
    ids=["cross_entropy", "linear_cross_entropy"],
)
def test_bad_scheduled_value_still_raises_under_compile(call):
    """A value that changes between calls is checked by guards of the compiled graph: an infinite, NaN
    or negative ``z_loss`` raises the eager message (a comparison with ``math.inf`` would have been
    folded away for a traced float, letting ``inf`` through)."""
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="eager", fullgraph=True)
    for value in (1e-3, 2e-3):
        compiled(X, E, C, value)
    bad = ((math.inf, "z_loss must be finite"), (math.nan, "z_loss must be finite"), (-1.0, "z_loss must be >= 0"))
    for value, message in bad:
        with pytest.raises(Exception, match=message):
            compiled(X, E, C, value)
        with pytest.raises(ValueError, match=message):
            call(X, E, C, value)
