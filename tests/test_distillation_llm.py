"""What distilling a language model needs of ``crossent.linear_distillation``: head biases, each head's
logit scale and soft cap, ``sample_weight``, ``normalizer`` and per-token losses.

The reference is written from the formula on materialised logits in float64 with plain autograd,
``z = cap tanh(s (e c^T + b) / cap)`` for each head and the divergences of ``test_distillation``;
the stock heads (transformers' Gemma 2 soft cap, Cohere's ``logit_scale``) and TRL's GKD loss
(``GKDTrainer.generalized_jsd_loss``) are checked as references of their own.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distillation import HPARAMS, heads, reference

import crossent as xe
from crossent._distillation.divergences import DIVERGENCES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

V = 40


def head_logits(e, c, bias=None, scale=1.0, softcap=None):
    """The formula of a head's logits, in float64."""
    z = e.double() @ c.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference_loss(e_s, c_s, e_t, c_t, target=None, *, bias_student=None, bias_teacher=None, logit_scale_student=1.0,
                   logit_scale_teacher=1.0, softcap_student=None, softcap_teacher=None, **kw):  # fmt: skip
    """The loss of the two heads' logits (:func:`head_logits`): :func:`reference_of_logits`."""
    zs = head_logits(e_s, c_s, bias_student, logit_scale_student, softcap_student)
    zt = head_logits(e_t, c_t, bias_teacher, logit_scale_teacher, softcap_teacher)
    return reference_of_logits(zs, zt, target, **kw)


def reference_of_logits(zs, zt, target=None, *, sample_weight=None, normalizer=None, reduction="mean", shift=False,
                        ignore_index=-100, **kw):  # fmt: skip
    """``sum_i w_i loss_i`` over the counted rows, divided by their number (or ``normalizer``)."""
    per_row = reference(zs, zt.detach(), target, reduction="none", shift=shift, ignore_index=ignore_index, **kw)
    if sample_weight is not None:
        per_row = per_row * (sample_weight[..., 1:] if shift else sample_weight).double()
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if normalizer is None:
        if target is None:
            normalizer = per_row.numel()
        else:
            counted = target[..., 1:] if shift else target
            normalizer = max(int((counted != ignore_index).sum()), 1)
    return per_row.sum() / float(normalizer)


def weights(b=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, generator=g, dtype=torch.float64) * 2


def biases(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


#: Each option set of the new arguments (``target``: pass the labels; ``w``: a sample weight).
OPTIONS = {
    "biases": {"biases": True, "target": True},
    "cap_scale": {"softcap_student": 3.0, "softcap_teacher": 2.5, "logit_scale_student": 1.7,
                  "logit_scale_teacher": 0.6, "temperature": 1.5},  # fmt: skip
    "all_heads_ce": {"biases": True, "softcap_student": 4.0, "logit_scale_teacher": 1.3, "ce_weight": 0.4,
                     "target": True},
    "weights_normalizer": {"w": True, "normalizer": 11.5, "target": True},
    "weights_none_shift": {"w": True, "reduction": "none", "shift": True, "biases": True, "softcap_teacher": 3.0},
    "weights_sum_cap": {"w": True, "reduction": "sum", "softcap_student": 2.0, "target": True},
}


def case(option: str, dtype=torch.float32):
    """``(args, kwargs)`` of ``linear_distillation`` for an option set, the student's leaves requiring grad."""
    e_s, c_s, e_t, c_t, target = heads(dtype=dtype)
    kw = dict(OPTIONS[option])
    if kw.pop("target", False):
        kw["target"] = target
    if kw.pop("biases", False):
        b_s, b_t = biases()
        kw["bias_student"], kw["bias_teacher"] = b_s.to(dtype).requires_grad_(), b_t.to(dtype)
    if kw.pop("w", False):
        kw["sample_weight"] = weights().to(dtype)
    e_s.requires_grad_(), c_s.requires_grad_()
    return (e_s, c_s, e_t, c_t), kw


def student_leaves(args, kw):
    return [t for t in (args[0], args[1], kw.get("bias_student")) if t is not None]


def grads(loss, leaves):
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype) if loss.dim() else None
    return torch.autograd.grad(loss, leaves, upstream)


def as_float64(x):
    """A floating tensor as a float64 leaf (requiring grad where ``x`` does); anything else as it is."""
    if not (torch.is_tensor(x) and x.is_floating_point()):
        return x
    return x.detach().double().requires_grad_(x.requires_grad)


def check_against_reference(args, kw, *, rtol, atol, grad_atol=None, chunk_size=5):
    """Loss and student gradients against the float64 reference of the same (rounded) inputs.

    ``grad_atol``: the gradients' absolute tolerance as a fraction of each one's largest entry (``atol``
    without it).
    """
    got = xe.linear_distillation(*args, chunk_size=chunk_size, **kw)
    leaves = student_leaves(args, kw)
    ref_args = [as_float64(t) for t in args]
    ref_kw = {k: as_float64(v) for k, v in kw.items()}
    expected = reference_loss(*ref_args, **ref_kw)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    for leaf, g, r in zip(leaves, grads(got, leaves), grads(expected, student_leaves(ref_args, ref_kw))):
        assert g.dtype == leaf.dtype  # gradients come in the inputs' dtypes
        tol = atol if grad_atol is None else grad_atol * r.abs().max().item()
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=tol)
    return got


# -- the new options against the formula, every divergence ---------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float32_equals_the_float64_reference(divergence, option):
    args, kw = case(option)
    kw.update(HPARAMS[divergence], divergence=divergence)
    check_against_reference(args, kw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "reverse_kl"])
def test_bfloat16_equals_the_float64_reference_of_its_inputs(divergence):
    # bfloat16 products round each logit to 8 bits (relative 4e-3), which the float64 reference of the
    # same bfloat16 inputs does not; gradients come back rounded to bfloat16. Measured: loss 3e-4
    # relative, gradients 6e-3 of their largest entry.
    args, kw = case("all_heads_ce", torch.bfloat16)
    kw.update(HPARAMS[divergence], divergence=divergence)
    got = check_against_reference(args, kw, rtol=1e-3, atol=1e-3, grad_atol=1.5e-2)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_distillation_takes_sample_weight_and_normalizer(divergence):
    e_s, c_s, e_t, c_t, target = heads()
    w = weights().float()
    zs = (e_s @ c_s.T).requires_grad_()
    kw = dict(HPARAMS[divergence], divergence=divergence, shift=True)
    for reduction, normalizer in (("mean", 7.0), ("mean", None), ("sum", None), ("none", None)):
        got = xe.distillation(zs, e_t @ c_t.T, target, sample_weight=w, normalizer=normalizer, reduction=reduction,
                              **kw)  # fmt: skip
        z64 = zs.detach().double().requires_grad_()
        expected = reference_of_logits(z64, (e_t @ c_t.T).double(), target, sample_weight=w, normalizer=normalizer,
                                       reduction=reduction, **kw)  # fmt: skip
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads(got, [zs])[0].double(), grads(expected, [z64])[0], rtol=1e-5, atol=1e-6)
        fused = xe.linear_distillation(e_s, c_s, e_t, c_t, target, sample_weight=w, normalizer=normalizer,
                                       reduction=reduction, **kw)  # fmt: skip
        torch.testing.assert_close(fused, got, rtol=1e-5, atol=1e-6)


def test_sample_weight_that_requires_grad_gets_its_gradient():
    args, kw = case("weights_normalizer")
    kw["sample_weight"].requires_grad_()
    got = xe.linear_distillation(*args, divergence="jsd", chunk_size=4, **kw)
    w64 = kw["sample_weight"].detach().double().requires_grad_()
    ref_args = [t.detach().double() for t in args]
    expected = reference_loss(*ref_args, **{**kw, "sample_weight": w64}, divergence="jsd")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got, kw["sample_weight"])
    (r,) = torch.autograd.grad(expected, w64)
    torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


def test_the_teacher_gets_no_gradient():
    args, kw = case("biases")
    e_t, c_t, b_t = args[2].requires_grad_(), args[3].requires_grad_(), kw["bias_teacher"].requires_grad_()
    loss = xe.linear_distillation(*args, divergence="jsd", softcap_teacher=2.0, **kw)
    assert torch.autograd.grad(loss, [e_t, c_t, b_t, args[0]], allow_unused=True)[:3] == (None, None, None)


# -- rows: ignored, all ignored, gradient accumulation ---------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "jsd", "akl"])
def test_every_row_ignored(divergence):
    args, kw = case("all_heads_ce")
    kw["target"] = torch.full_like(kw["target"], -100)
    kw["sample_weight"] = weights().float()
    kw.update(HPARAMS[divergence], divergence=divergence)
    for reduction, normalizer in (("mean", None), ("mean", 3.0), ("sum", None), ("none", None)):
        loss = xe.linear_distillation(*args, reduction=reduction, normalizer=normalizer, **kw)
        assert torch.equal(loss, torch.zeros_like(loss))
        for g in grads(loss, student_leaves(args, kw)):
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer_makes_micro_batches_sum_to_the_whole_batch(divergence, as_tensor):
    """Gradient accumulation: two micro-batches divided by the step's counted tokens give the loss and the
    gradients of one batch of both (their counts differ, so a per-micro-batch mean would not)."""
    args, kw = case("all_heads_ce")
    kw.update(HPARAMS[divergence], divergence=divergence, shift=True)
    target = kw.pop("target")
    target[0, 3:6] = -100
    e_s, c_s, e_t, c_t = args
    b_s, b_t = kw.pop("bias_student"), kw.pop("bias_teacher")
    leaves = [e_s, c_s, b_s]
    whole = xe.linear_distillation(e_s, c_s, e_t, c_t, target, bias_student=b_s, bias_teacher=b_t, **kw)
    expected = grads(whole, leaves)
    counted = (target[:, 1:] != -100).sum()
    normalizer = counted if as_tensor else int(counted)
    total, accumulated = 0.0, [torch.zeros_like(t) for t in leaves]
    for rows in (slice(0, 1), slice(1, 2)):
        micro = xe.linear_distillation(e_s[rows], c_s, e_t[rows], c_t, target[rows], bias_student=b_s,
                                       bias_teacher=b_t, normalizer=normalizer, **kw)  # fmt: skip
        total = total + micro.detach()
        for acc, g in zip(accumulated, torch.autograd.grad(micro, leaves)):
            acc += g
    torch.testing.assert_close(total, whole.detach(), rtol=1e-5, atol=1e-7)
    for g, e in zip(accumulated, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


# -- stock heads: transformers' Gemma 2 and Cohere ------------------------------------------------------


def tiny(family: str, hidden: int, seed: int, **head):
    """A tiny random causal LM of ``family`` (``"gemma2"`` or ``"cohere"``), float32, eval mode."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)  # fmt: skip
    if family == "gemma2":
        config = transformers.Gemma2Config(**sizes, attn_logit_softcapping=None, **head)
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.CohereConfig(**sizes, **head)
        cls = transformers.CohereForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # logits of several units, so that the cap and the scale matter
        model.lm_head.weight.mul_(40.0)
    return model


def head_options(model, side: str) -> dict:
    """The head's post-processing, read off the model's config as a trainer would."""
    config = model.config
    return {
        f"softcap_{side}": getattr(config, "final_logit_softcapping", None),
        f"logit_scale_{side}": getattr(config, "logit_scale", 1.0),
    }


@pytest.mark.parametrize("pair", [("gemma2", "gemma2"), ("cohere", "gemma2")])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_stock_heads_are_reproduced(pair, divergence):
    """Loss and every student parameter's gradient equal the divergence on the stock models' own logits."""
    head = {"final_logit_softcapping": 4.0} if pair[0] == "gemma2" else {"logit_scale": 0.3}
    student = tiny(pair[0], 16, 0, **head)
    teacher = tiny(pair[1], 24, 1, final_logit_softcapping=6.0)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    kw = dict(divergence=divergence, beta=0.4, temperature=1.3, shift=True)

    out = student(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(input_ids=ids, output_hidden_states=True)
    params = [p for p in student.parameters() if p.requires_grad]
    expected = xe.distillation(out.logits, out_t.logits, labels, **kw)
    expected_grads = torch.autograd.grad(expected, params, retain_graph=True)

    options = {**head_options(student, "student"), **head_options(teacher, "teacher")}
    got = xe.linear_distillation(out.hidden_states[-1], student.lm_head.weight, out_t.hidden_states[-1],
                                 teacher.lm_head.weight, labels, chunk_size=4, **options, **kw)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(torch.autograd.grad(got, params), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # and the logits the two options stand for are the stock model's (the cap matters at these logits)
    z = head_logits(out.hidden_states[-1], student.lm_head.weight, None, options["logit_scale_student"],
                    options["softcap_student"])  # fmt: skip
    torch.testing.assert_close(z.float(), out.logits, rtol=1e-6, atol=1e-5)
    assert out.logits.abs().max() > 2.0


# -- TRL's GKD loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_equals_trl_gkd_generalized_jsd_loss(beta, temperature):
    """``linear_distillation(divergence="jsd")`` is TRL's GKD loss (its causal shift and label mask, its
    ``num_items_in_batch``), values and the student's gradients, without the logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself
        gkd = pytest.importorskip("trl.experimental.gkd")
    jsd = gkd.GKDTrainer.generalized_jsd_loss
    e_s, c_s, e_t, c_t, labels = heads()
    e_s.requires_grad_(), c_s.requires_grad_()
    kw = dict(divergence="jsd", beta=beta, temperature=temperature, shift=True)
    for num_items in (None, 23):
        # GKDTrainer.compute_loss: logits[:, :-1] against labels[:, 1:]
        expected = jsd((e_s @ c_s.T)[:, :-1], (e_t @ c_t.T)[:, :-1], labels[:, 1:], beta=beta,
                       temperature=temperature, num_items_in_batch=num_items)  # fmt: skip
        got = xe.linear_distillation(e_s, c_s, e_t, c_t, labels, normalizer=num_items, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        for g, e in zip(torch.autograd.grad(got, (e_s, c_s)), torch.autograd.grad(expected, (e_s, c_s))):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def docs_recipe() -> dict:
    """The namespace of docs/distillation.md's GKD recipe (the ``python`` block defining ``FusedGKDTrainer``)."""
    text = (Path(__file__).parents[1] / "docs" / "distillation.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class FusedGKDTrainer" in b]
    namespace = {"__name__": "docs_gkd_recipe"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself
        exec(compile(block, "distillation.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_docs_gkd_recipe_equals_gkd_trainers_compute_loss(beta):
    """The recipe's ``compute_loss`` and TRL's, on the same tiny Gemma 2 student and teacher (soft-capped
    heads), padded prompts and completions: equal losses and student gradients."""
    pytest.importorskip("trl")
    recipe = docs_recipe()
    trainer = recipe["GKDTrainer"]
    student = tiny("gemma2", 16, 0, final_logit_softcapping=4.0)
    teacher = tiny("gemma2", 24, 1, final_logit_softcapping=6.0)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0  # padding
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    inputs = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    # What compute_loss reads of the trainer (a whole GKDTrainer needs datasets and arguments).
    fake = SimpleNamespace(teacher_model=teacher, beta=beta, generalized_jsd_loss=trainer.generalized_jsd_loss,
                           accelerator=SimpleNamespace(unwrap_model=lambda model: model))  # fmt: skip
    params = [p for p in student.parameters() if p.requires_grad]
    for num_items in (None, torch.tensor(13)):
        expected = trainer.compute_loss(fake, student, inputs, num_items_in_batch=num_items)
        got = recipe["FusedGKDTrainer"].compute_loss(fake, student, inputs, num_items_in_batch=num_items)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for g, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_head_options_and_per_call_tensors_raise_named_errors():
    e_s, c_s, e_t, c_t, target = heads()
    b = torch.zeros(V)
    bad = [
        ({"bias_student": torch.zeros(V - 1)}, ValueError, r"bias_student must have shape \[40\]"),
        ({"bias_teacher": torch.zeros(V, 1)}, ValueError, r"bias_teacher must have shape \[40\]"),
        ({"bias_student": b.double()}, TypeError, "bias_student must have c_student's dtype"),
        ({"bias_teacher": torch.zeros(V, dtype=torch.long)}, TypeError, "bias_teacher must be floating point"),
        ({"bias_student": [0.0] * V}, TypeError, "bias_student must be a tensor"),
        ({"softcap_student": -1.0}, ValueError, "softcap_student must be > 0"),
        ({"softcap_teacher": 0.0}, ValueError, "softcap_teacher must be > 0"),
        ({"logit_scale_student": 0.0}, ValueError, "logit_scale_student must be > 0"),
        ({"logit_scale_teacher": float("nan")}, ValueError, "logit_scale_teacher must be finite"),
        ({"logit_scale_teacher": "2"}, TypeError, "logit_scale_teacher must be a real number"),
        ({"sample_weight": torch.ones(2, 8)}, ValueError, r"sample_weight must have the rows' shape \(2, 9\)"),
        ({"sample_weight": torch.ones(2, 9, dtype=torch.long)}, TypeError, "sample_weight must be floating point"),
        ({"normalizer": 4, "reduction": "sum"}, ValueError, "normalizer replaces the divisor of reduction='mean'"),
        ({"normalizer": 0}, ValueError, "normalizer must be > 0"),
        ({"normalizer": torch.ones(2)}, ValueError, "normalizer must be a number or a one-element tensor"),
        ({"normalizer": torch.ones((), requires_grad=True)}, ValueError, "must not require grad"),
    ]
    for kw, error, message in bad:
        with pytest.raises(error, match=message):
            xe.linear_distillation(e_s, c_s, e_t, c_t, target, **kw)
    with pytest.raises(ValueError, match=r"sample_weight must have the rows' shape"):
        xe.distillation(e_s @ c_s.T, e_t @ c_t.T, sample_weight=torch.ones(9))


def test_module_forms_take_the_head_options_at_construction_and_the_tensors_at_call():
    args, kw = case("all_heads_ce")
    w = weights().float()
    crit = xe.nn.LinearDistillationLoss(divergence="jsd", beta=0.3, softcap_student=4.0, logit_scale_teacher=1.3,
                                        ce_weight=0.4)  # fmt: skip
    got = crit(*args, kw["target"], bias_student=kw["bias_student"], bias_teacher=kw["bias_teacher"],
               sample_weight=w, normalizer=9)  # fmt: skip
    expected = xe.linear_distillation(*args, divergence="jsd", beta=0.3, sample_weight=w, normalizer=9, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="softcap_teacher must be > 0"):
        xe.nn.LinearDistillationLoss(softcap_teacher=-2.0)
    for per_call in ("bias_student", "sample_weight", "normalizer"):
        with pytest.raises(TypeError, match=f"unexpected keyword argument {per_call!r}"):
            xe.nn.LinearDistillationLoss(**{per_call: None})
    dense = xe.nn.DistillationLoss(divergence="kl")
    zs, zt, target = args[0] @ args[1].T, args[2] @ args[3].T, kw["target"]
    expected = xe.distillation(zs, zt, target, sample_weight=w, normalizer=9)
    torch.testing.assert_close(dense(zs, zt, target, sample_weight=w, normalizer=9), expected, rtol=0, atol=0)


def test_head_transforms_keep_the_fused_pair_kernel():
    """A soft cap and a scale apply to the student's chunk inside the pair kernel (no generic fallback)."""
    from crossent._distillation.arguments import build_loss
    from crossent._distillation.heads import head_transforms
    from crossent._engine.chunked.pair import PairKernel
    from crossent._engine.plan import Plan
    from crossent._rows import index_rows

    rows = index_rows(torch.zeros(3, dtype=torch.long), V, -100, None, {})
    for divergence in ("kl", "reverse_kl", "ttm", "wttm"):
        loss = build_loss(divergence, temperature=2.0, beta=0.5, gamma=0.5, mu=0.5, ce_weight=0.3, has_target=True)
        assert PairKernel.supports(Plan(loss, rows, head_transforms("student", 1.7, 3.0)))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_bfloat16_teacher_with_bias_and_cap_beside_a_float32_student(divergence):
    # The teacher's logits are formed in bfloat16 (rounded to 8 bits), then capped in float32; the
    # reference takes the same bfloat16 inputs in float64. Measured: loss 3e-5 relative, gradients 1e-3
    # of their largest entry.
    args, kw = case("all_heads_ce")
    e_t, c_t = args[2].bfloat16(), args[3].bfloat16()
    kw["bias_teacher"] = kw["bias_teacher"].bfloat16()
    kw.update(softcap_teacher=3.0, divergence=divergence, beta=0.3)
    check_against_reference((args[0], args[1], e_t, c_t), kw, rtol=2e-3, atol=2e-3)
