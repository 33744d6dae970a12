"""crossent.integrations.transformers against the stock transformers models it patches.

Every family is a tiny randomly initialised model from a small config (no downloads), built once. The
patched model's loss and every parameter's gradient must match the stock model's within 1e-5 relative
to the largest entry (float32), for padded labels, ``num_items_in_batch`` and ``shift_labels``, with the
family's soft-capping or logit scaling active (the head's weight is scaled up so that logits reach
several units). Other checks: gradient accumulation, ``logits`` is ``None`` given labels (in eval mode
too, as ``from_pretrained`` returns it), no ``[B, T, V]`` tensor is allocated, non-CE losses, copies and
reloads, the Trainer's label smoothing, PEFT, refusals by name, a short training run on real
text, and two gloo processes: DDP, and a tensor-parallel head (a DTensor weight split by vocabulary).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import sysconfig
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import crossent as xe
import crossent.integrations.transformers as xt
from crossent.integrations import _families

V, D = 96, 32
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)
GPT2 = dict(
    vocab_size=V, n_embd=D, n_layer=1, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)

#: name -> (config class, model class, config arguments beyond COMMON)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **MOE)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, head_dim=8, **MOE),
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=2.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def config_of(name: str, **overrides):
    config_cls, _, extra = FAMILIES[name]
    args = dict(extra) if name == "gpt2" else {**COMMON, **extra}
    return getattr(transformers, config_cls)(**{**args, **overrides})


@functools.cache
def tiny(name: str):
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[name][1])(config_of(name)).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # logits of several units: soft caps and scales matter
    return model.train()


def batch(seed=0, b=2, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def run(model, **kwargs):
    """Loss, output and every parameter's gradient of one training forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(actual, expected, rel=1e-5):
    scale = max(expected.detach().abs().max().item(), 1e-12)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def same_gradients(got: dict, want: dict, rel=1e-5):
    assert got.keys() == want.keys()
    for name, expected in want.items():
        try:
            close(got[name], expected, rel)
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None


# -- every family against stock ---------------------------------------------------------------------------


def cases():
    ids, labels = batch()
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    shift[1, 0] = -100
    return {
        "padded labels": dict(input_ids=ids, labels=labels),
        "num_items_in_batch": dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(23)),
        "shift_labels": dict(input_ids=ids, labels=labels, shift_labels=shift),
    }


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_stock(name):
    model = tiny(name)
    assert model.config.model_type in _families.FAMILIES
    for case, kwargs in cases().items():
        stock, stock_grads = run(model, **kwargs)
        assert stock.logits.shape == (2, 10, V)
        with xt.patched(model):
            out, grads = run(model, **kwargs)
        assert out.logits is None, case
        assert out.loss.dtype == torch.float32
        close(out.loss, stock.loss)
        same_gradients(grads, stock_grads)
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__


def test_post_processing_is_read_from_the_config():
    assert str(_families.logit_map("gemma2", tiny("gemma2").config, "m")) == "2 * tanh(z / 2)"
    assert str(_families.logit_map("granite", tiny("granite").config, "m")) == "0.25 * z"
    assert str(_families.logit_map("cohere", tiny("cohere").config, "m")) == "0.5 * z"
    assert str(_families.logit_map("llama", tiny("llama").config, "m")) == "z"


def test_gradient_accumulation_equals_one_large_batch():
    """Four micro-batches, each normalised by the count over all of them (transformers' Trainer), summed."""
    model = tiny("gemma2")
    ids, labels = batch(seed=1, b=8, t=9)
    labels[2:5, 5:] = -100
    stock, want = run(model, input_ids=ids, labels=labels)
    count = (labels[:, 1:] != -100).sum()
    with xt.patched(model):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in torch.arange(8).chunk(4):
            out = model(input_ids=ids[part], labels=labels[part], num_items_in_batch=count)
            out.loss.backward()
            total += out.loss.item()
    close(torch.tensor(total), stock.loss)
    same_gradients({n: p.grad for n, p in model.named_parameters()}, want)


def test_logits_on_request_and_in_eval():
    model = tiny("cohere")
    ids, labels = batch()
    stock, _ = run(model, input_ids=ids, labels=labels)
    with xt.patched(model):
        out = model(input_ids=ids, labels=labels, return_logits=True)
        close(out.logits, stock.logits, 1e-6)
        close(out.loss, stock.loss)
        model.eval()
        try:
            out = model(input_ids=ids, labels=labels)  # eval mode with labels: still fused
            assert out.logits is None
            close(out.loss, stock.loss)
            out = model(input_ids=ids, labels=labels, return_logits=True)
        finally:
            model.train()
        close(out.logits, stock.logits, 1e-6)
        close(out.loss, stock.loss)
        out = model(input_ids=ids)  # no labels: the stock forward
        assert out.loss is None and out.logits.shape == (2, 10, V)


def test_positional_labels_tuple_output_and_logits_to_keep():
    model = tiny("llama")
    ids, labels = batch()
    stock = model(input_ids=ids, labels=labels)
    last = labels[:, -4:].contiguous()  # targets of the last four positions, already shifted
    keep = model(input_ids=ids, labels=last, shift_labels=last, logits_to_keep=4)
    stock_signature = inspect.signature(model.forward)
    with xt.patched(model):
        assert inspect.signature(model.forward) == stock_signature  # what Trainer reads
        out = model(ids, None, None, None, None, labels)
        close(out.loss, stock.loss)
        assert out.logits is None
        as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
        close(as_tuple[0], stock.loss)
        assert all(x is None or x.shape[-1] != V for x in as_tuple[1:] if isinstance(x, torch.Tensor) or x is None)
        out = model(input_ids=ids, labels=last, shift_labels=last, logits_to_keep=4)
        close(out.loss, keep.loss)
        with pytest.raises(ValueError, match="logits_to_keep, pass shift_labels"):
            model(input_ids=ids, labels=labels, logits_to_keep=4)


@pytest.mark.parametrize(
    "loss, kw", [("focal", {}), ("focal", {"weight": "cw"}), ("mixce", {"z_loss": 1e-3}), ("z_loss", {}),
                 ("ce", {"label_smoothing": 0.1, "weight": "cw"})],
)  # fmt: skip
def test_other_losses_equal_the_loss_of_the_stock_logits(loss, kw):
    """Per-token weights too: each token's loss times its weight, over the counted tokens (or class weights)."""
    model = tiny("gemma2")
    ids, labels = batch()
    if kw.get("weight") == "cw":
        kw = {**kw, "weight": torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.5}
    sample_weight = torch.rand(labels.shape, generator=torch.Generator().manual_seed(6))

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    target = labels[:, 1:].reshape(-1)
    counted = target[target != -100]
    per = xe.cross_entropy(logits[:, :-1].reshape(-1, V), target, loss=loss, reduction="none", **kw)
    divisor = counted.numel() if "weight" not in kw else kw["weight"][counted].sum()
    want_loss = (per * sample_weight[:, 1:].reshape(-1)).sum() / divisor
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with xt.patched(model, loss=loss, **kw):
        out, grads = run(model, input_ids=ids, labels=labels, sample_weight=sample_weight)
        evaluated = model(input_ids=ids, labels=labels, sample_weight=sample_weight, return_logits=True).loss
    close(out.loss, want_loss)
    close(evaluated, want_loss)
    same_gradients(grads, want)


def test_class_patch_reaches_models_created_later():
    cls = transformers.Qwen3ForCausalLM
    original = cls.__dict__["forward"]
    with xt.patched(cls, loss="focal"):
        torch.manual_seed(0)
        model = cls(config_of("qwen3")).train()
        assert xt.is_patched(model)
        ids, labels = batch()
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None
        xt.apply(model, loss="focal")  # an instance patch on top of the class patch: one loss, computed once
        close(model(input_ids=ids, labels=labels).loss, out.loss, 1e-6)
        xt.undo(model)
    assert not xt.is_patched(model) and cls.__dict__["forward"] is original
    logits = model(input_ids=ids).logits
    ref = xe.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), loss="focal")
    close(out.loss, ref)


def test_bfloat16_model_and_autocast():
    """Half precision: the float32 loss within 2e-2 of stock's, gradients in the same direction."""
    ids, labels = batch()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config_of("llama")).to(torch.bfloat16).train()
    stock, want = run(model, input_ids=ids, labels=labels)
    with xt.patched(model):
        out, grads = run(model, input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32
    close(out.loss, stock.loss, 2e-2)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16
        assert F.cosine_similarity(g.float().flatten(), want[name].float().flatten(), dim=0) > 0.99, name
    model = tiny("gemma2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, _ = run(model, input_ids=ids, labels=labels)
        with xt.patched(model):
            out, _ = run(model, input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32
    close(out.loss, stock.loss, 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, lengths, compilations",
    [("llama", (10, 10, 10), 1), ("gemma2", (10, 10, 10), 1), ("gemma2", (10, 12, 14), 2)],
)
@pytest.mark.parametrize("patch", ["instance", "class"])
def test_a_patched_model_compiles_once_in_one_graph(name, lengths, compilations, patch):
    """docs/transformers.md: a patched model, plain head or soft-capped, compiles once with
    ``fullgraph=True`` (the fused loss is one operator, the transformed loss is built before the graph, the
    post-processing check is an assert of the graph) and trains as eager mode does: several steps with new
    tokens, the loss and every gradient equal eager's; one compilation for one shape, two when the length
    changes (the second with symbolic lengths, as PyTorch compiles a stock model). A patched class
    compiles the same way: a plain head before any eager forward, a soft cap other than the config
    class's default after one."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny(name)
    counter = CompileCounterWithBackend("aot_eager")
    with xt.patched(model if patch == "instance" else type(model), loss="focal"):
        if patch == "class" and name == "gemma2":
            ids, labels = batch()
            model(input_ids=ids, labels=labels)  # builds the loss of this model's soft cap (2, not 30)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend=counter, fullgraph=True)
            for step, length in enumerate(lengths):
                ids, labels = batch(seed=step, t=length)
                got, grads = run(compiled, input_ids=ids, labels=labels)
                want, want_grads = run(model, input_ids=ids, labels=labels)
                close(got.loss, want.loss)
                same_gradients({k.removeprefix("_orig_mod."): g for k, g in grads.items()}, want_grads)
                assert got.logits is None
        finally:
            torch._dynamo.reset()
    assert counter.frame_count == compilations


@pytest.mark.slow
def test_a_patched_class_compiled_first_with_an_unseen_softcap_says_what_to_do():
    """A class patch knows the soft cap of the config class's default; a model with another one, compiled
    before any eager forward, cannot build its loss inside the graph: a clear error, not a wrong loss."""
    import torch._dynamo

    model = tiny("gemma2")
    with xt.patched(type(model)):
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            ids, labels = batch()
            with pytest.raises(Exception, match=r"run one training forward before compiling"):
                compiled(input_ids=ids, labels=labels)
            want = model(input_ids=ids, labels=labels).loss  # one eager forward builds the loss
            close(compiled(input_ids=ids, labels=labels).loss, want)
        finally:
            torch._dynamo.reset()


@pytest.mark.slow
def test_a_forgotten_softcap_is_refused_under_compile(monkeypatch):
    """Compiled before any eager forward, the post-processing check is an assert of the graph."""
    import torch._dynamo

    model = tiny("gemma2")
    monkeypatch.setitem(_families.FAMILIES, "gemma2", ())
    ids, labels = batch()
    with xt.patched(model):
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            with pytest.raises(RuntimeError, match=r"Gemma2ForCausalLM.*differently"):
                compiled(input_ids=ids, labels=labels)
        finally:
            torch._dynamo.reset()


# -- no [B, T, V] tensor ----------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of a tensor created by an op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_logit_tensor_in_a_patched_training_step():
    vocab, b, t = 2048, 2, 32
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config_of("llama", vocab_size=vocab)).train()
    ids = torch.randint(3, vocab, (b, t))
    with LargestTensor() as stock:
        model(input_ids=ids, labels=ids).loss.backward()
    assert stock.largest >= b * t * vocab  # the stock step has its [B, T, V] logits
    with xt.patched(model, chunk_size=16), LargestTensor() as rec:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits is None
    assert rec.largest <= max(16 * vocab, vocab * D), rec.largest  # one chunk of logits, or the weight's shape


# -- models from from_pretrained: eval mode ------------------------------------------------------------


def test_a_from_pretrained_model_in_eval_mode_runs_the_fused_loss(tmp_path):
    """Found as: the README's three lines with a ``from_pretrained`` model (returned in eval mode) formed
    the full ``[B, T, V]`` logits without a word. Given labels, the loss is fused in either mode."""
    vocab, b, t = 2048, 2, 32
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config_of("llama", vocab_size=vocab)).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not model.training
    ids = torch.randint(3, vocab, (b, t))
    stock = model(input_ids=ids, labels=ids)
    stock.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    xt.apply(model, chunk_size=16)  # the README's lines 2 and 3
    with LargestTensor() as rec:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits is None
    assert rec.largest <= max(16 * vocab, vocab * D), rec.largest
    close(out.loss, stock.loss)
    same_gradients({n: p.grad for n, p in model.named_parameters()}, want)
    with torch.no_grad():
        close(model(input_ids=ids, labels=ids).loss, stock.loss)  # evaluation: fused, no logits either
    asked = model(input_ids=ids, labels=ids, return_logits=True)
    close(asked.logits, stock.logits, 1e-6)


# -- copies, pickles, save_pretrained ------------------------------------------------------------------


def test_copies_are_patched_and_a_saved_model_reloads_unpatched(tmp_path):
    """Found as: ``copy.deepcopy`` of a patched model (a reference model, an EMA copy) failed on every
    forward with "is not patched", and ``apply(copy)`` then raised a misleading ``UnsupportedModel``."""
    import copy
    import io

    model = tiny("llama")
    ids, labels = batch()
    with xt.patched(model, loss="focal"):
        want, want_grads = run(model, input_ids=ids, labels=labels)
        model.zero_grad(set_to_none=True)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copies = {"deepcopy": copy.deepcopy(model), "torch.save": torch.load(buffer, weights_only=False)}
        model.save_pretrained(tmp_path)
    for how, twin in copies.items():
        assert xt.is_patched(twin), how
        out, grads = run(twin, input_ids=ids, labels=labels)  # the copy's own parameters
        assert out.logits is None, how
        close(out.loss, want.loss)
        same_gradients(grads, want_grads)
        assert all(p.grad is None for p in model.parameters())
        xt.apply(twin, loss="ce")  # applying again changes the copy's loss only
        close(twin(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
        xt.undo(twin)
        assert not xt.is_patched(twin) and twin(input_ids=ids, labels=labels).logits.shape == (2, 10, V)

    # save_pretrained stores the weights and the config: the reloaded model is the stock one, to patch again.
    reloaded = type(model).from_pretrained(tmp_path).train()
    assert not xt.is_patched(reloaded)
    assert reloaded(input_ids=ids, labels=labels).logits.shape == (2, 10, V)
    xt.apply(reloaded, loss="focal")
    out, grads = run(reloaded, input_ids=ids, labels=labels)
    close(out.loss, want.loss)
    same_gradients(grads, want_grads)


# -- transformers.Trainer ------------------------------------------------------------------------------


def test_the_trainers_label_smoothing_is_taken_over_or_refused(tmp_path):
    """Found as: ``TrainingArguments(label_smoothing_factor=0.1)`` made the Trainer pop the labels, so the
    patched model ran unpatched, formed its ``[B, T, V]`` logits and trained on the Trainer's smoothed CE
    instead of the crossent loss. ``apply(trainer)`` computes that same smoothed loss, fused; a patched
    model under such a Trainer refuses to run rather than swap its loss."""
    import copy

    ids, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    count = (labels[:, 1:] != -100).sum()  # the Trainer's num_items_in_batch for one micro-batch

    def step(model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True
        )
        return transformers.Trainer(model=model, args=args)

    def loss_and_grads(trainer):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=count)
        return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    stock = step(copy.deepcopy(tiny("llama")))
    assert stock.label_smoother is not None
    want, want_grads = loss_and_grads(stock)
    assert want_grads

    patched_model = xt.apply(copy.deepcopy(tiny("llama")))
    with pytest.raises(ValueError, match="num_items_in_batch but no labels.*label_smoothing_factor"):
        loss_and_grads(step(patched_model))

    trainer = xt.apply(step(copy.deepcopy(tiny("llama"))))
    assert trainer.label_smoother is None and xt.is_patched(trainer.model)
    got, grads = loss_and_grads(trainer)
    close(got, want)
    same_gradients(grads, want_grads)
    _, outputs = trainer.compute_loss(trainer.model, dict(inputs), return_outputs=True, num_items_in_batch=count)
    assert outputs.logits is None  # fused: no [B, T, V] logits
    with pytest.raises(ValueError, match="label_smoothing_factor is 0.1"):
        xt.apply(step(copy.deepcopy(tiny("llama"))), label_smoothing=0.2)
    with pytest.raises(ValueError, match="label_smoothing= applies to loss='ce'"):
        xt.apply(step(copy.deepcopy(tiny("llama"))), loss="focal")


# -- PEFT ---------------------------------------------------------------------------------------------------


def test_peft_heads_are_unwrapped():
    peft = pytest.importorskip("peft")
    ids, labels = batch()
    configs = {
        "LoRA on the head": peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False
        ),
        "modules_to_save": peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    for case, config in configs.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(config_of("llama")), config).train()
        stock, want = run(model, input_ids=ids, labels=labels)
        assert want, case
        with xt.patched(model, z_loss=0.0):
            out, grads = run(model, input_ids=ids, labels=labels)
        assert out.logits is None
        close(out.loss, stock.loss)
        same_gradients(grads, want)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config_of("llama")), config).train()
    with xt.patched(model), pytest.raises(xt.UnsupportedModel, match="dropout.*set lora_dropout=0"):
        model(input_ids=ids, labels=labels)


# -- refusals -----------------------------------------------------------------------------------------------


def test_models_without_a_head_and_options_are_refused_by_name():
    """Found as: ``apply(transformers.AutoModel)`` raised ``AttributeError: ... no attribute 'config_class'``,
    and a base model (what ``AutoModel`` loads) was accepted and failed at its first forward."""
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        with pytest.raises(TypeError, match=f"{auto.__name__} is an Auto class.*from_pretrained"):
            xt.apply(auto)
    with pytest.raises(TypeError, match="int is not a transformers model class"):
        xt.apply(int)
    base = transformers.LlamaModel(config_of("llama"))
    with pytest.raises(xt.UnsupportedModel, match="LlamaModel has no language-model head.*AutoModelForCausalLM"):
        xt.apply(base)
    assert not xt.is_patched(base)
    with pytest.raises(TypeError, match=r"unexpected options \['shift'\].*shift_labels"):
        xt.apply(tiny("llama"), shift=True)
    with pytest.raises(TypeError, match=r"\['gamma'\].*loss=crossent.losses.get\('focal', gamma=3.0\)"):
        xt.apply(tiny("llama"), loss="focal", gamma=3.0)
    with pytest.raises(ValueError, match="not patched"):
        xt.undo(tiny("llama"))


def test_apply_refuses_what_the_first_training_forward_would():
    """Found as: ``apply(model, weight=<length V+1>)`` and ``apply(model, loss="aldr_kl")`` were accepted
    and failed at the first training forward, ALDR-KL's message pointing to ``extra=``, which the patched
    forward cannot take."""
    model = tiny("llama")
    nan_weight = torch.ones(V).index_fill(0, torch.tensor([5]), float("nan"))
    wrapped_aldr = xe.losses.APL(active=xe.losses.AdaptiveLDRKL(), passive="rce")
    refused = [
        (dict(weight=torch.ones(V + 1)), ValueError, f"weight must be a 1-D tensor of {V} class weights, got shape"),
        (dict(weight=nan_weight), ValueError, r"weight must be finite; weight\[5\] = nan"),
        (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight must be floating point"),
        (dict(loss=xe.losses.get("forward_correction", T=torch.eye(5))), ValueError, f"T is 5 x 5 .* {V} classes"),
        (dict(loss="nfl", backend="triton"), (ValueError, ImportError), "backend='triton'"),
        (dict(loss="aldr_kl"), ValueError, r"LlamaForCausalLM: .* reads extra\['sample_ids'\] .* forward cannot"),
        (dict(loss=wrapped_aldr), ValueError, r"extra\['sample_ids'\].*output_hidden_states=True"),
    ]
    for options, error, message in refused:
        with pytest.raises(error, match=message):
            xt.apply(model, **options)
        assert not xt.is_patched(model)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: .* extra\['sample_ids'\]"):
        xt.apply(transformers.LlamaForCausalLM, loss="aldr_kl")
    assert not xt.is_patched(transformers.LlamaForCausalLM)
    # A refused apply on a patched model keeps its patch and loss.
    ids, labels = batch()
    with xt.patched(model, loss="focal"):
        with pytest.raises(ValueError, match="class weights"):
            xt.apply(model, weight=torch.ones(V + 1))
        got = model(input_ids=ids, labels=labels).loss
        want = xe.linear_cross_entropy(
            model.model(input_ids=ids).last_hidden_state, model.lm_head.weight, labels, loss="focal", shift=True
        )
        close(got, want)


def test_a_forgotten_softcap_is_refused(monkeypatch):
    """Declared without its soft cap, Gemma 2 would train on the wrong loss: the first forward refuses it."""
    model = tiny("gemma2")
    monkeypatch.setitem(_families.FAMILIES, "gemma2", ())
    ids, labels = batch()
    with xt.patched(model), pytest.raises(xt.UnsupportedModel, match=r"Gemma2ForCausalLM.*differently.*\(z\)"):
        model(input_ids=ids, labels=labels)


def test_heads_that_are_not_reproduced_are_refused():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class CutVocabulary(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)[..., : V - 2]
            loss = None if labels is None else self.loss_function(logits, labels, V - 2, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    class OwnLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    ids, labels = batch()
    labels = labels.clamp_max(V - 3)
    for cls, message in ((CutVocabulary, "shape.*vocabulary was cut"), (OwnLoss, "before its loss_function ran")):
        torch.manual_seed(0)
        model = cls(config_of("llama")).train()
        with xt.patched(model), pytest.raises(xt.UnsupportedModel, match=f"{cls.__name__}.*({message})"):
            model(input_ids=ids, labels=labels)


# -- training on real text ---------------------------------------------------------------------------------


def stdlib_text(num_bytes: int) -> bytes:
    """Real text that every machine has: the standard library's source (DATASETS.md)."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    with open(path, "rb") as f:
        return f.read(num_bytes)


@pytest.mark.parametrize("loss", ["focal"])
def test_a_non_ce_loss_trains_a_tiny_model_on_real_text(loss):
    data = torch.tensor(list(stdlib_text(16384)), dtype=torch.long)
    seq, bsz = 64, 8
    torch.manual_seed(0)
    config = config_of("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = xt.apply(transformers.LlamaForCausalLM(config).train(), loss=loss)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, data.numel() - seq, (bsz,), generator=g)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        out = model(input_ids=ids, labels=ids)
        assert out.logits is None
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


# -- two processes --------------------------------------------------------------------------------------------


def _ddp_and_tensor_parallel_case(rank: int, world: int):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids, labels = batch(seed=2, b=4, t=9)
    labels[0, 4:] = -100  # uneven counts across ranks
    model = getattr(transformers, FAMILIES["granite"][1])(config_of("granite")).train()
    model.load_state_dict(tiny("granite").state_dict())
    stock, want = run(model, input_ids=ids, labels=labels)  # the global batch, one process
    model.zero_grad(set_to_none=True)
    count = (labels[:, 1:] != -100).sum()  # Trainer: summed over ranks (average_tokens_across_devices)
    ddp = DDP(xt.apply(model, loss="ce"))
    mine = slice(2 * rank, 2 * rank + 2)
    out = ddp(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=count)
    assert out.logits is None
    (out.loss * world).backward()  # Trainer scales by the number of processes; DDP averages the gradients
    total = out.loss.detach().clone()
    dist.all_reduce(total)
    close(total, stock.loss)
    same_gradients({n: p.grad for n, p in model.named_parameters()}, want)

    # A tensor-parallel head (its weight a DTensor split by vocabulary rows, the logits gathered):
    # the patched loss runs crossent's vocabulary-parallel engine, the same loss and gradients.
    from torch.distributed.tensor import Replicate, init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    tp = tiny("granite")
    parallelize_module(tp.lm_head, init_device_mesh("cpu", (world,)), ColwiseParallel(output_layouts=Replicate()))
    stock, want = run(tp, input_ids=ids, labels=labels, num_items_in_batch=count)
    with xt.patched(tp):
        out, grads = run(tp, input_ids=ids, labels=labels, num_items_in_batch=count)
    assert out.logits is None and hasattr(grads["lm_head.weight"], "to_local")
    close(out.loss, stock.loss)
    local = lambda g: g.to_local() if hasattr(g, "to_local") else g  # noqa: E731
    same_gradients({n: local(g) for n, g in grads.items()}, {n: local(g) for n, g in want.items()})
    with xt.patched(tp), pytest.raises(ValueError, match="sample_weight is not available for a DTensor"):
        tp(input_ids=ids, labels=labels, sample_weight=torch.ones(labels.shape))


@pytest.mark.slow
def test_two_gloo_processes_ddp_and_a_tensor_parallel_head():
    # Through the suite's gloo runner: each rank reports its outcome, with deadlines, so that a rank's
    # exit-time abort of gloo's threads (seen under load) is not mistaken for a failure of the case.
    from _gloo import check, run_cases

    check(run_cases(2, {"ddp and tp": _ddp_and_tensor_parallel_case}, timeout=300.0, gloo_timeout=120.0), "ddp and tp")


@pytest.mark.slow
def test_trainer_torch_compile_trains_the_patched_model_in_one_graph(tmp_path):
    """Found as: ``Trainer(torch_compile=True)`` recompiled a patched model on every step. The Trainer
    compiles it (through accelerate) once for one shape, without a graph break, and the logged losses
    are the eager patched Trainer's."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    datasets = pytest.importorskip("datasets")
    ids, labels = batch(b=4)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def losses(compile_: bool):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
            logging_steps=1, report_to=[], use_cpu=True, torch_compile=compile_,
            torch_compile_backend="aot_eager" if compile_ else None, dataloader_drop_last=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=copy.deepcopy(tiny("llama")), args=args, train_dataset=data)
        xt.apply(trainer, loss="focal")
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    want = losses(False)
    torch._dynamo.reset()
    counters.clear()
    try:
        got = losses(True)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * abs(w), (got, want)


# -- per-token statistics, hooks on the head, wrappers ----------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_token_stats_equal_those_of_the_stock_logits(name):
    model = tiny(name)
    ids, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()  # post-processed (soft-capped) as the loss sees them
        with xt.patched(model, loss="focal"):
            out = model(input_ids=ids, labels=labels, return_token_stats=True)
    stats = out.token_stats
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    assert out.logits is None and stats.target.shape == stats.mask.shape == (2, 9)
    assert torch.equal(stats.target, target) and torch.equal(stats.mask, mask)
    logp = logits.log_softmax(-1)
    close(stats.lse[mask], logits.logsumexp(-1)[mask])
    close(stats.entropy[mask], -(logp.exp() * logp).sum(-1)[mask])
    assert torch.equal(stats.argmax[mask], logits.argmax(-1)[mask])
    correct = (logits.argmax(-1) == target) & mask
    assert torch.equal(stats.correct, correct)
    close(stats.accuracy, correct.sum() / mask.sum())
    close(stats.z_loss[mask], stats.lse[mask].square())
    with xt.patched(model), pytest.raises(ValueError, match="return_token_stats must be"):
        model(input_ids=ids, labels=labels, return_token_stats="logits")


def test_head_hooks_run_on_the_probe_with_one_warning():
    model = tiny("llama")
    ids, labels = batch()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    try:
        with xt.patched(model):
            with pytest.warns(UserWarning, match=r"forward hooks on the head \(.*<lambda>\).*not logits"):
                model(input_ids=ids, labels=labels)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model(input_ids=ids, labels=labels)  # once per model
                model(input_ids=ids, labels=labels, return_logits=True)
    finally:
        handle.remove()
    assert seen == [(1, 1, V), (1, 1, V), (2, 10, V)]


def test_a_wrapper_over_the_patch_keeps_its_loss_and_a_replacement_is_refused():
    model = copy.deepcopy(tiny("llama"))
    ids, labels = batch()
    focal = xe.losses.get("focal", gamma=2.0)
    xt.apply(model, loss=focal)
    want = model(input_ids=ids, labels=labels).loss
    inner = model.forward
    model.forward = lambda *args, **kwargs: inner(*args, **kwargs)  # as accelerate's mixed-precision forward
    close(model(input_ids=ids, labels=labels).loss, want)
    model.forward = type(model).forward.__get__(model)  # a forward that computes its own loss
    with pytest.raises(xt.UnsupportedModel, match="replaced after crossent's apply"):
        model(input_ids=ids, labels=labels)
    model(input_ids=ids)  # without labels: nothing to refuse
