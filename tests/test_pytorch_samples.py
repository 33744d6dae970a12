"""crossent against PyTorch's own test material for its cross-entropy ops and modules.

The samples and error inputs are drawn from the installed ``torch.testing._internal`` (the OpInfos of
``nn.functional.cross_entropy`` and ``nn.functional.linear_cross_entropy`` with its chunked variants,
the ModuleInfos of ``nn.CrossEntropyLoss`` and ``nn.LinearCrossEntropyLoss``), with a fixed seed, and
every sample runs through crossent and through PyTorch: values and the gradients of every input that
requires one. Every OpInfo sample runs; of the module samples a fixed, deterministic subset runs
(every ``k``-th: ``LINEAR_MODULE_STRIDE``, ``MODULE_STRIDE``), and PyTorch's chunked OpInfo variants
run in float32 and bfloat16 only, which keeps this module to about ten seconds of CPU time.

Tolerances: float64 1e-10 and float32 1e-5 relative to the larger of the value and the largest entry
of the compared tensor; float16 / bfloat16 inputs are compared with PyTorch run in float32 on the same
(upcast) inputs, within two units of the half dtype's spacing (crossent accumulates in float32 and
rounds once; PyTorch's own half kernels round more often). The only other allowances are the
differences the README names: a mean over zero counted rows is 0.0 (PyTorch: NaN), and
``linear_cross_entropy`` takes class indices and a ``[V, D]`` classifier, so PyTorch's probability
targets and K-dimensional ``linear_weight`` samples must raise a named error instead. PyTorch's
``LinearCrossEntropyOptions`` (its chunking) is dropped: crossent chooses its own chunks.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import crossent as xe

pytest.importorskip("expecttest")  # torch.testing._internal needs it
opinfo = pytest.importorskip("torch.testing._internal.common_methods_invocations")
moduleinfo = pytest.importorskip("torch.testing._internal.common_modules")

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
#: Every how many samples run: LinearCrossEntropyLoss has about 860 per dtype, CrossEntropyLoss 105,
#: and the three variants of linear_cross_entropy's OpInfo share most samples (PyTorch's chunking
#: options, which crossent drops, are what tells them apart).
LINEAR_MODULE_STRIDE = 10
MODULE_STRIDE = {torch.float64: 3, torch.float32: 1, torch.float16: 3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _op(name: str, variant: str = ""):
    return next(o for o in opinfo.op_db if o.name == name and o.variant_test_name == variant)


def _module(name: str):
    return next(m for m in moduleinfo.module_db if m.module_cls.__name__ == name)


def _seeded(fn):
    torch.manual_seed(0)
    random.seed(0)
    return list(fn())


def close(actual, expected, dtype, what=""):
    """``actual`` (crossent, in ``dtype``) against ``expected`` (PyTorch, float32 for half inputs)."""
    assert actual.shape == expected.shape, what
    rtol = RTOL[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(1.0, e[torch.isfinite(e)].abs().max().item()) if e.numel() and torch.isfinite(e).any() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def upstream(out):
    """A fixed upstream gradient: 1 for a scalar, a deterministic pattern otherwise."""
    if not out.dim():
        return torch.ones_like(out)
    return (torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape) % 5 - 1.5).to(out.dtype)


def value_and_grads(fn, tensors: dict, grad_names, **kwargs):
    """``fn(**tensors, **kwargs)`` and the gradients of the named tensors (fresh leaves)."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
              for k, v in tensors.items()}  # fmt: skip
    out = fn(**leaves, **kwargs)
    wanted = [leaves[k] for k in grad_names]
    grads = torch.autograd.grad(out, wanted, upstream(out)) if wanted else ()
    return out, dict(zip(grad_names, grads))


def upcast(t):
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t


def zero_counted(target, ignore_index, weight):
    """PyTorch's mean is 0/0 (NaN): crossent returns 0.0 there (README)."""
    if target.is_floating_point():
        return target.numel() == 0
    counted = target != ignore_index
    if weight is not None:
        counted = counted & (weight[target.clamp(0, weight.numel() - 1)] != 0)
    return not counted.any()


# -- nn.functional.cross_entropy --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_opinfo_samples(dtype):
    samples = _seeded(lambda: _op("nn.functional.cross_entropy").sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) >= 20
    for i, s in enumerate(samples):
        x, target, kwargs = s.input, s.args[0], dict(s.kwargs)
        names = ["input"] + (["target"] if target.is_floating_point() else [])
        ours, g = value_and_grads(lambda input, target: xe.cross_entropy(input, target, **kwargs),
                                  {"input": x, "target": target}, names)  # fmt: skip
        ref_kwargs = {k: upcast(v) for k, v in kwargs.items()}
        ref, rg = value_and_grads(lambda input, target: F.cross_entropy(input, target, **ref_kwargs),
                                  {"input": upcast(x), "target": upcast(target)}, names)  # fmt: skip
        what = f"sample {i}: {tuple(x.shape)} {kwargs.get('reduction', 'mean')} {sorted(kwargs)}"
        assert ours.dtype == dtype, what
        if kwargs.get("reduction", "mean") == "mean" and zero_counted(target, kwargs.get("ignore_index", -100), kwargs.get("weight")):
            assert ours.item() == 0.0, what
            continue
        close(ours, ref, dtype, what)
        for k in names:
            close(g[k], rg[k], dtype, f"{what} grad {k}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_cross_entropy_loss_module_samples(dtype):
    info = _module("CrossEntropyLoss")
    samples = _seeded(lambda: info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True))
    assert len(samples) >= 100
    for i, s in list(enumerate(samples))[:: MODULE_STRIDE[dtype]]:
        args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
        x, target = s.forward_input.args
        ours_mod = xe.nn.CrossEntropyLoss(*args, **kwargs)
        ref_mod = torch.nn.CrossEntropyLoss(*args, **{k: upcast(v) for k, v in kwargs.items()})
        names = ["input"] + (["target"] if target.is_floating_point() and target.requires_grad else [])
        ours, g = value_and_grads(lambda input, target: ours_mod(input, target), {"input": x, "target": target}, names)
        ref, rg = value_and_grads(lambda input, target: ref_mod(input, target),
                                  {"input": upcast(x), "target": upcast(target)}, names)  # fmt: skip
        what = f"sample {i} ({s.desc})"
        if ours_mod.reduction == "mean" and zero_counted(target, ours_mod.ignore_index, kwargs.get("weight")):
            assert ours.item() == 0.0, what
            continue
        close(ours, ref, dtype, what)
        for k in names:
            close(g[k], rg[k], dtype, f"{what} grad {k}")


# -- nn.functional.linear_cross_entropy -------------------------------------------------------------


def _linear_kwargs(kwargs: dict) -> dict:
    """PyTorch's keyword arguments in crossent's spelling (``linear_bias`` is ``bias``; ``options`` is
    PyTorch's chunking, dropped)."""
    out = {("bias" if k == "linear_bias" else k): v for k, v in kwargs.items() if k != "options"}
    return out


def _named_difference(linear_weight, target) -> bool:
    """Samples outside crossent's linear_cross_entropy by design (README): probabilities, K-dim weights."""
    return target.is_floating_point() or linear_weight.dim() != 2


def _check_linear_sample(x, w, target, kwargs, dtype, what):
    ours_kwargs = _linear_kwargs(kwargs)
    if _named_difference(w, target):
        with pytest.raises((TypeError, ValueError), match=r"integer class indices|\[V, D\]"):
            xe.linear_cross_entropy(x, w, target, **ours_kwargs)
        return 0
    names = ["e", "c"] + (["bias"] if ours_kwargs.get("bias") is not None else [])
    tensors = {"e": x, "c": w, "bias": ours_kwargs.pop("bias", None)}
    ours, g = value_and_grads(lambda e, c, bias: xe.linear_cross_entropy(e, c, target, bias=bias, **ours_kwargs),
                              tensors, names)  # fmt: skip
    ref_kwargs = {k: upcast(v) for k, v in kwargs.items() if k not in ("options", "linear_bias")}
    ref, rg = value_and_grads(
        lambda e, c, bias: F.linear_cross_entropy(e, c, target, linear_bias=bias, **ref_kwargs),
        {k: upcast(v) for k, v in tensors.items()}, names,
    )  # fmt: skip
    assert ours.dtype == (torch.float32 if dtype in HALF else dtype), what  # a float32 loss for half inputs
    ignore = kwargs.get("ignore_index")
    if kwargs.get("reduction", "mean") == "mean" and zero_counted(target, -100 if ignore is None else ignore, kwargs.get("weight")):
        assert ours.item() == 0.0, what
        return 1
    close(ours, ref, dtype, what)
    for k in names:
        close(g[k], rg[k], dtype, f"{what} grad {k}")
    return 1


LINEAR_OPINFO = [(v, d) for v in ("", "chunked", "chunked_none") for d in DTYPES if v == "" or d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("variant,dtype", LINEAR_OPINFO, ids=str)
def test_linear_cross_entropy_opinfo_samples(variant, dtype):
    op = _op("nn.functional.linear_cross_entropy", variant)
    samples = _seeded(lambda: op.sample_inputs("cpu", dtype, requires_grad=True))
    compared = 0
    for i, s in enumerate(samples):
        w, target = s.args
        compared += _check_linear_sample(s.input, w, target, dict(s.kwargs), dtype, f"{variant} sample {i}")
    assert compared >= 20


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_loss_module_samples(dtype):
    info = _module("LinearCrossEntropyLoss")
    samples = _seeded(lambda: info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True))
    compared = 0
    for i, s in enumerate(samples[::LINEAR_MODULE_STRIDE]):
        args, kwargs = s.constructor_input.args, dict(s.constructor_input.kwargs)
        x, target = s.forward_input.args
        kwargs.pop("options")
        torch.manual_seed(i)
        ref_mod = torch.nn.LinearCrossEntropyLoss(*args, **kwargs)
        if kwargs.get("out_features"):
            with pytest.raises(ValueError, match="K-dimensional"):
                xe.nn.LinearCrossEntropyLoss(*args, **kwargs)
            continue
        ours_mod = xe.nn.LinearCrossEntropyLoss(*args, **kwargs)
        ours_mod.linear.load_state_dict(ref_mod.linear.state_dict())
        what = f"sample {i * LINEAR_MODULE_STRIDE}: {kwargs}"
        if target.is_floating_point():
            with pytest.raises(TypeError, match="integer class indices"):
                ours_mod(x, target)
            continue
        out = ours_mod(x, target)
        ref_mod = ref_mod.to(torch.float32) if dtype in HALF else ref_mod
        ref = ref_mod(upcast(x), target)
        params = list(ours_mod.linear.parameters())
        ref_params = list(ref_mod.linear.parameters())
        g = torch.autograd.grad(out, [x, *params], upstream(out))
        rg = torch.autograd.grad(ref, [x, *ref_params], upstream(ref))
        if ours_mod.reduction == "mean" and zero_counted(target, ours_mod.ignore_index, kwargs.get("weight")):
            assert out.item() == 0.0, what
            continue
        close(out, ref, dtype, what)
        for a, b in zip(g, rg):
            close(a, b, dtype, f"{what} grad")
        compared += 1
    assert compared >= 20


# -- error inputs -------------------------------------------------------------------------------------

#: PyTorch's error (its regex) -> crossent's named error for the same input.
ERRORS = {
    # crossent takes e of any shape [..., D]; what this sample has wrong for crossent is its float target
    "expected input with dimensionality 1 or 2": "integer class indices",
    "expected linear_weight with dimensionality at least 2": r"\[V, D\]",
    "expected equal input and linear_weight last dimensions": "features but c has",
    "ignore_index cannot be specified when target contains probabilities": "integer class indices",
    "K-dimensional loss": r"\[V, D\]",
    "expected linear_bias shape": "integer class indices|bias must have shape",
    "Expected floating point type for target with class probabilities": "floating point type for target|target must have shape",
    "expected target dtype to be Long or Byte": "class-probability target must have the shape of input",
    "Expected input batch_size": "target must have shape|integer class indices",
    "weight tensor should be defined either for all": "class weights",
    "ignore_index is not supported for floating point target": "ignore_index is not supported for floating point target",
    "label_smoothing must be between": "label_smoothing must be in",
    "Expected target size": "class-index target must have shape",
    "expected weight shape to be": r"weight must be a 1-D tensor of 2 class weights",
    "expected label_smoothing to be in range": "label_smoothing must be in",
}


def _crossent_regex(torch_regex: str) -> str:
    return next(v for k, v in ERRORS.items() if torch_regex.startswith(k.replace("(", "[(]").replace(")", "[)]")) or torch_regex.startswith(k))


def test_linear_cross_entropy_error_inputs():
    errors = list(_op("nn.functional.linear_cross_entropy").error_inputs("cpu"))
    assert len(errors) >= 6
    for e in errors:
        s = e.sample_input
        with pytest.raises((ValueError, TypeError), match=_crossent_regex(e.error_regex)):
            xe.linear_cross_entropy(s.input, *s.args, **_linear_kwargs(s.kwargs))


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_module_error_inputs(name):
    info = _module(name)
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True, training=True)
    assert len(errors) >= 5
    cls = getattr(xe.nn, name)
    for e in errors:
        m = e.module_error_input
        regex = _crossent_regex(e.error_regex)
        with pytest.raises((ValueError, TypeError), match=regex):
            module = cls(*m.constructor_input.args, **m.constructor_input.kwargs)
            assert e.error_on != moduleinfo.ModuleErrorEnum.CONSTRUCTION_ERROR, f"no error at construction: {regex}"
            module(*m.forward_input.args, **m.forward_input.kwargs)
