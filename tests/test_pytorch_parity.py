"""Where crossent once parted from PyTorch, cause by cause, against PyTorch itself.

* Class weights of any sign (PyTorch's own samples draw them from [-9, 9]), on every entry point.
* A class-probability target with ``ignore_index >= 0`` raises PyTorch's error; negative ones pass.
* Zero classes with probability targets give PyTorch's NaN / -0.0 / zeros (and gradients), no crash.
* ``linear_cross_entropy`` with zero hidden features is ``log V`` (the logits are all 0).
* PyTorch's signatures: ``weight`` (and the rest) positional in ``cross_entropy``; the modules
  ``CrossEntropyLoss`` / ``LinearCrossEntropyLoss`` take PyTorch's arguments in PyTorch's order.

Tolerances: float64, 1e-12 relative to the largest entry.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.distributed import vocab_parallel_cross_entropy


def close(a, b):
    scale = b.abs().max().item() if b.numel() and torch.isfinite(b).all() else 1.0
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * max(scale, 1.0), equal_nan=True)


def grads(out, inputs):
    up = torch.ones_like(out) if not out.dim() else torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad(out, inputs, up)


def leaf(t):
    return t.detach().clone().requires_grad_()


g = torch.Generator().manual_seed(0)
X = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
Y = torch.tensor([0, 1, 2, 3, 4, 1, 2])
W_SIGNED = torch.tensor([1.5, -2.0, 0.5, -0.25, 3.0], dtype=torch.float64)


# -- class weights of any sign ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("target", ["indices", "probabilities"])
def test_negative_class_weights_as_pytorch(reduction, label_smoothing, target):
    t = Y if target == "indices" else torch.softmax(torch.randn(7, 5, generator=g, dtype=torch.float64), -1)
    kw = dict(weight=W_SIGNED, reduction=reduction, label_smoothing=label_smoothing)
    a, b = leaf(X), leaf(X)
    ours, ref = xe.cross_entropy(a, t, **kw), F.cross_entropy(b, t, **kw)
    close(ours, ref)
    close(grads(ours, a)[0], grads(ref, b)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_class_weights_on_the_fused_and_vocab_parallel_engines(reduction):
    e, c = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ea, ca, eb, cb = leaf(e), leaf(c), leaf(e), leaf(c)
    ours = xe.linear_cross_entropy(ea, ca, Y, weight=W_SIGNED, reduction=reduction, chunk_size=16)
    ref = F.cross_entropy(eb @ cb.T, Y, weight=W_SIGNED, reduction=reduction)
    close(ours, ref)
    for x, y in zip(grads(ours, (ea, ca)), grads(ref, (eb, cb))):
        close(x, y)
    a, b = leaf(X), leaf(X)
    ours = vocab_parallel_cross_entropy(a, Y, vocab_start=0, weight=W_SIGNED, reduction=reduction)
    ref = F.cross_entropy(b, Y, weight=W_SIGNED, reduction=reduction)
    close(ours, ref)
    close(grads(ours, a)[0], grads(ref, b)[0])


def test_weights_that_cancel_divide_by_zero_as_pytorch():
    w = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    x, y = X[:2, :3], torch.tensor([0, 1])
    assert torch.isinf(F.cross_entropy(x, y, weight=w))
    close(xe.cross_entropy(x, y, weight=w), F.cross_entropy(x, y, weight=w))
    # No counted row with a nonzero weight: the documented 0.0 (PyTorch: 0/0).
    zero = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    assert xe.cross_entropy(x, torch.tensor([0, 0]), weight=zero).item() == 0.0


# -- probability targets and ignore_index ---------------------------------------------------------


def test_probability_target_refuses_a_non_negative_ignore_index():
    q = torch.softmax(torch.randn(4, 3, generator=g), -1)
    x = torch.randn(4, 3, generator=g)
    for ignore_index in (0, 1, 7):
        with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
            F.cross_entropy(x, q, ignore_index=ignore_index)
        with pytest.raises(ValueError, match="ignore_index is not supported for floating point target"):
            xe.cross_entropy(x, q, ignore_index=ignore_index)
        with pytest.raises(ValueError, match="ignore_index is not supported for floating point target"):
            xe.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, q)
    for ignore_index in (-1, -5, -100):  # PyTorch's rule is the sign
        torch.testing.assert_close(xe.cross_entropy(x, q, ignore_index=ignore_index), F.cross_entropy(x, q, ignore_index=ignore_index))


# -- zero classes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 0), (0, 0), (2, 0, 3), (0,)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_zero_classes_with_probabilities_give_pytorchs_answer(shape, reduction, label_smoothing):
    x, q = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    a, qa, b, qb = leaf(x), leaf(q), leaf(x), leaf(q)
    ours, ref = xe.cross_entropy(a, qa, **kw), F.cross_entropy(b, qb, **kw)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(torch.signbit(ours[~torch.isnan(ours)]), torch.signbit(ref[~torch.isnan(ref)]))  # -0.0
    close(ours, ref)
    if ours.numel():
        for u, v in zip(torch.autograd.grad(ours.sum(), (a, qa)), torch.autograd.grad(ref.sum(), (b, qb))):
            assert u.shape == v.shape == shape


def test_zero_classes_with_indices():
    x = torch.randn(3, 0, requires_grad=True)
    with pytest.raises(ValueError, match=r"outside the valid class range \[0, 0\)"):
        xe.cross_entropy(x, torch.tensor([0, -100, -100]))
    out = xe.cross_entropy(x, torch.full((3,), -100), reduction="none")
    assert out.shape == (3,) and torch.all(out == 0)
    assert xe.cross_entropy(x, torch.full((3,), -100)).item() == 0.0


# -- zero hidden features -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_with_zero_hidden_features_is_log_v(reduction):
    e = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 4])
    out = xe.linear_cross_entropy(e, c, y, reduction=reduction)
    close(out, torch.full(out.shape, math.log(5), dtype=torch.float64))
    ge, gc = torch.autograd.grad(out.sum(), (e, c))
    assert ge.shape == (3, 0) and gc.shape == (5, 0)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = xe.linear_cross_entropy(e, c, y, bias=bias, reduction=reduction)
    ref_bias = leaf(bias)
    ref = F.cross_entropy(ref_bias.expand(3, 5), y, reduction=reduction)
    close(out, ref)
    close(torch.autograd.grad(out.sum(), bias)[0], torch.autograd.grad(ref.sum(), ref_bias)[0])


# -- PyTorch's signatures --------------------------------------------------------------------------


def _parameters(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_cross_entropy_has_pytorchs_signature_first():
    ours, theirs = _parameters(xe.cross_entropy), _parameters(F.cross_entropy)
    assert ours[: len(theirs)] == theirs
    kinds = [p.kind for p in inspect.signature(xe.cross_entropy).parameters.values()]
    assert all(k is inspect.Parameter.KEYWORD_ONLY for k in kinds[len(theirs) :])  # crossent's own options


def test_positional_weight_and_legacy_arguments():
    w = torch.rand(5, dtype=torch.float64) + 0.5
    close(xe.cross_entropy(X, Y, w), F.cross_entropy(X, Y, w))
    close(xe.cross_entropy(X, Y, w, None, 2, None, "sum", 0.1), F.cross_entropy(X, Y, w, None, 2, None, "sum", 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation warning for size_average / reduce
        close(xe.cross_entropy(X, Y, size_average=False), F.cross_entropy(X, Y, size_average=False))
        close(xe.cross_entropy(X, Y, reduce=False), F.cross_entropy(X, Y, reduce=False))
    with pytest.raises(TypeError, match=r"loss by keyword|loss=\.\.\."):
        xe.cross_entropy(X, Y, "focal")


def test_cross_entropy_loss_module_has_pytorchs_signature():
    ours, theirs = _parameters(xe.nn.CrossEntropyLoss.__init__), _parameters(torch.nn.CrossEntropyLoss.__init__)
    assert ours[: len(theirs)] == theirs
    assert xe.nn.CrossEntropy is xe.nn.CrossEntropyLoss
    w = torch.rand(5, dtype=torch.float64) + 0.5
    close(xe.nn.CrossEntropyLoss(w, None, 1)(X, Y), torch.nn.CrossEntropyLoss(w, None, 1)(X, Y))
    close(xe.nn.CrossEntropyLoss(w, loss="focal")(X, Y), xe.cross_entropy(X, Y, w, loss="focal"))
    with pytest.raises(TypeError, match="loss by keyword"):
        xe.nn.CrossEntropyLoss("focal")


def test_linear_cross_entropy_loss_module_owns_its_classifier_as_pytorch():
    ours, theirs = _parameters(xe.nn.LinearCrossEntropyLoss.__init__), _parameters(torch.nn.LinearCrossEntropyLoss.__init__)
    # PyTorch's names and defaults, in its order (its required sizes are optional here: the classifier
    # may come at call time instead).
    assert [n for n, _ in ours[: len(theirs)]] == [n for n, _ in theirs]
    assert [d for _, d in ours[3 : len(theirs)]] == [d for _, d in theirs[3:]]
    assert xe.nn.LinearCrossEntropy is xe.nn.LinearCrossEntropyLoss
    w = torch.rand(5, dtype=torch.float64) + 0.5
    kw = dict(bias=True, dtype=torch.float64, weight=w, reduction="sum", ignore_index=2, label_smoothing=0.1)
    theirs_mod = torch.nn.LinearCrossEntropyLoss(3, 5, **kw)
    ours_mod = xe.nn.LinearCrossEntropyLoss(3, 5, **kw)
    ours_mod.linear.load_state_dict(theirs_mod.linear.state_dict())
    e = torch.randn(7, 3, generator=g, dtype=torch.float64)
    a, b = ours_mod(e, Y), theirs_mod(e, Y)
    close(a, b)
    for u, v in zip(grads(a, list(ours_mod.parameters())), grads(b, list(theirs_mod.parameters()))):
        close(u, v)
    assert set(dict(ours_mod.named_parameters())) == {"linear.weight", "linear.bias"}
    # Without sizes the classifier comes at call time (tied or sharded weights).
    crit = xe.nn.LinearCrossEntropyLoss(reduction="sum", ignore_index=2, label_smoothing=0.1, weight=w)
    close(crit(e, theirs_mod.linear.weight, Y, theirs_mod.linear.bias), b)
    close(crit(e, theirs_mod.linear.weight, Y, bias=theirs_mod.linear.bias), b)


def test_linear_cross_entropy_loss_module_errors():
    with pytest.raises(TypeError, match="loss by keyword"):
        xe.nn.LinearCrossEntropyLoss("focal")
    with pytest.raises(TypeError, match="both in_features and num_classes"):
        xe.nn.LinearCrossEntropyLoss(3)
    with pytest.raises(ValueError, match="K-dimensional"):
        xe.nn.LinearCrossEntropyLoss(3, 5, out_features=(2,))
    with pytest.raises(ValueError, match="bias=True needs in_features"):
        xe.nn.LinearCrossEntropyLoss(bias=True)
    # A module that owns its classifier knows the classes: the call's checks of weight run at construction.
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of 5 class weights, got shape"):
        xe.nn.LinearCrossEntropyLoss(3, 5, weight=torch.ones(6))
    with pytest.raises(ValueError, match=r"weight must be finite; weight\[1\] = nan"):
        xe.nn.LinearCrossEntropyLoss(3, 5, weight=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]))
    e, c = torch.randn(7, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match=r"crit\(input, target\)"):
        xe.nn.LinearCrossEntropyLoss(3, 5)(e, c, Y)
    with pytest.raises(TypeError, match=r"crit\(e, c, target, bias=None\)"):
        xe.nn.LinearCrossEntropyLoss()(e, Y)


def test_linear_ignore_index_none_is_pytorchs_default():
    e, c = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y = Y.clone()
    y[2] = -100
    close(xe.linear_cross_entropy(e, c, y, ignore_index=None), F.linear_cross_entropy(e, c, y, ignore_index=None))
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        xe.linear_cross_entropy(e, c, y, bias=torch.zeros(3, dtype=torch.float64))
