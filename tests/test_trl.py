"""crossent.integrations.transformers inside TRL's trainers, against TRL's stock runs.

A tiny random Llama, a word-level tokenizer and datasets built in memory; a few steps on the CPU in
float32. SFTTrainer patched with ``apply(trainer, ...)`` trains the crossent loss: with ``loss="ce"`` its
per-step losses, entropy and token accuracy are the stock run's; with focal loss each step's loss is
crossent's on that batch, computed apart from the trainer, and the first step's entropy and accuracy
(same weights) are the stock ones. DPO and GRPO run as stock under the default loss and are refused with
another; GKD is refused. A patch that TRL's fused head (or Liger's) replaced is refused at the first step.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import crossent as xe
import crossent.integrations.transformers as xt

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]

V = 64
FOCAL = xe.losses.get("focal", gamma=2.0)


def tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def words(generator, low, high):
    n = int(torch.randint(low, high, (), generator=generator))
    return " ".join(f"t{i}" for i in torch.randint(3, V, (n,), generator=generator).tolist())


def config(cls, tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return cls(**{**args, **overrides})


def logged(trainer, *keys):
    return [tuple(h[k] for k in keys) for h in trainer.state.log_history if "loss" in h]


# -- SFT -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_data():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 12, (12,), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]})


def sft(tmp_path, data, tokenizer, loss=None, **options):
    trainer = trl.SFTTrainer(
        model=tiny_model(), args=config(trl.SFTConfig, tmp_path), train_dataset=data, processing_class=tokenizer
    )
    if loss is not None:
        assert xt.apply(trainer, loss=loss, **options) is trainer
        assert xt.is_patched(trainer.model)
    return trainer


@pytest.fixture(scope="module")
def sft_stock(tmp_path_factory, sft_data, tokenizer):
    trainer = sft(tmp_path_factory.mktemp("stock"), sft_data, tokenizer)
    trainer.train()
    return logged(trainer, "loss", "entropy", "mean_token_accuracy")


def test_sft_ce_matches_stock(tmp_path, sft_data, tokenizer, sft_stock):
    trainer = sft(tmp_path, sft_data, tokenizer, "ce")
    trainer.train()
    got = logged(trainer, "loss", "entropy", "mean_token_accuracy")
    assert len(got) == len(sft_stock) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(sft_stock), rtol=1e-5, atol=1e-5)


def record_losses(trainer, loss):
    """Wrap ``trainer.compute_loss``: the losses it returns, and crossent's ``loss`` of the same batch with
    the same weights, computed apart from the trainer from the hidden states."""
    expected, returned = [], []
    compute_loss = trainer.compute_loss

    def checked(model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))[0]
            expected.append(xe.linear_cross_entropy(
                hidden, model.lm_head.weight, inputs["labels"], shift=True, loss=loss, normalizer=num_items_in_batch
            ))  # fmt: skip
        value = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        returned.append(value.detach())
        return value

    trainer.compute_loss = checked
    return expected, returned


def test_sft_focal_trains_the_crossent_loss(tmp_path, sft_data, tokenizer, sft_stock):
    trainer = sft(tmp_path, sft_data, tokenizer, FOCAL)
    expected, returned = record_losses(trainer, FOCAL)
    trainer.train()
    assert len(returned) == 3
    torch.testing.assert_close(torch.stack(returned), torch.stack(expected), rtol=1e-5, atol=1e-6)
    got = logged(trainer, "loss", "entropy", "mean_token_accuracy")
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.stack(returned), rtol=1e-5, atol=1e-6)
    # The first step runs the initial weights: TRL's own statistics of that batch, from crossent's pass.
    torch.testing.assert_close(torch.tensor(got[0][1:]), torch.tensor(sft_stock[0][1:]), rtol=1e-5, atol=1e-6)


def test_one_switch_for_transformers_trainer(tmp_path, sft_data, tokenizer):
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = config(transformers.TrainingArguments, tmp_path, max_steps=2)
    trainer = transformers.Trainer(model=tiny_model(), args=args, train_dataset=sft_data, data_collator=collator)
    xt.apply(trainer, loss=FOCAL)
    expected, returned = record_losses(trainer, FOCAL)
    trainer.train()
    assert len(returned) == 2
    torch.testing.assert_close(torch.stack(returned), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_sft_label_smoothing_factor_taken_over(tmp_path, sft_data, tokenizer):
    args = config(trl.SFTConfig, tmp_path, label_smoothing_factor=0.1, max_steps=1)
    trainer = trl.SFTTrainer(model=tiny_model(), args=args, train_dataset=sft_data, processing_class=tokenizer)
    xt.apply(trainer)
    assert trainer.label_smoother is None
    assert xt.is_patched(trainer.model)
    expected, returned = record_losses(trainer, xe.losses.CrossEntropy(label_smoothing=0.1))
    trainer.train()
    assert len(returned) == 1
    torch.testing.assert_close(returned[0], expected[0], rtol=1e-5, atol=1e-6)


def test_sft_refusals(tmp_path, sft_data, tokenizer):
    args = config(trl.SFTConfig, tmp_path, loss_type="dft")
    trainer = trl.SFTTrainer(model=tiny_model(), args=args, train_dataset=sft_data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss_type='dft'.*Use loss_type='nll'"):
        xt.apply(trainer, loss=FOCAL)
    xt.apply(trainer)  # the default loss: per-token losses are log-probabilities, DFT reads them as such


def test_model_patched_before_sft_is_refused_at_first_step(tmp_path, sft_data, tokenizer):
    model = xt.apply(tiny_model(), loss=FOCAL)
    trainer = trl.SFTTrainer(model=model, args=config(trl.SFTConfig, tmp_path), train_dataset=sft_data,
                             processing_class=tokenizer)  # fmt: skip
    with pytest.raises(xt.UnsupportedModel, match=r"add_fused_lm_head.*apply\(trainer, loss=\.\.\.\)"):
        trainer.train()
    # Patching the trainer then serves TRL's fused head.
    xt.apply(trainer, loss=FOCAL)
    trainer.train()


def test_one_switch_refuses_liger_fused_cross_entropy(tmp_path, sft_data):
    pytest.importorskip("liger_kernel")
    args = config(transformers.TrainingArguments, tmp_path, use_liger_kernel=True)
    trainer = transformers.Trainer(model=tiny_model(), args=args, train_dataset=sft_data)
    with pytest.raises(ValueError, match="fused_linear_cross_entropy': False"):
        xt.apply(trainer, loss=FOCAL)


# -- DPO, GRPO, GKD: their own objectives ----------------------------------------------------------------------


def dpo(tmp_path, tokenizer, model=None):
    g = torch.Generator().manual_seed(2)
    data = datasets.Dataset.from_dict(
        {key: [words(g, 2, 6) for _ in range(8)] for key in ("prompt", "chosen", "rejected")}
    )
    return trl.DPOTrainer(
        model=model or tiny_model(), ref_model=tiny_model(), args=config(trl.DPOConfig, tmp_path, max_steps=2),
        train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip


def grpo(tmp_path, tokenizer, model=None):
    g = torch.Generator().manual_seed(3)
    data = datasets.Dataset.from_dict({"prompt": [words(g, 2, 6) for _ in range(8)]})

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = config(
        trl.GRPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=3,
    )  # fmt: skip
    return trl.GRPOTrainer(
        model=model or tiny_model(), reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer
    )


@pytest.mark.parametrize("build", [dpo, grpo], ids=["dpo", "grpo"])
def test_preference_and_rl_trainers(tmp_path, tokenizer, build):
    stock = build(tmp_path, tokenizer)
    stock.train()
    # The default loss is the cross-entropy their fused head computes: the patch lets it run, as stock.
    trainer = xt.apply(build(tmp_path, tokenizer), loss="ce")
    trainer.train()
    assert len(logged(stock, "loss")) == 2
    torch.testing.assert_close(torch.tensor(logged(trainer, "loss")), torch.tensor(logged(stock, "loss")))
    name = type(trainer).__name__
    with pytest.raises(ValueError, match=rf"{name} computes its own objective.*docs/rl.md.*docs/distillation.md"):
        xt.apply(build(tmp_path, tokenizer), loss=FOCAL)
    # A model patched before the trainer was built: refused at the first step, naming the trainer.
    trainer = build(tmp_path, tokenizer, xt.apply(tiny_model(), loss=FOCAL))
    with pytest.raises(xt.UnsupportedModel, match=rf"add_fused_lm_head.*{name} computes its own objective"):
        trainer.train()


def test_gkd_refused(tmp_path, tokenizer):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    g = torch.Generator().manual_seed(4)
    data = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": words(g, 2, 5)}, {"role": "assistant", "content": words(g, 2, 5)}]
        for _ in range(8)
    ]})  # fmt: skip

    def build(model):
        args = config(GKDConfig, tmp_path, max_steps=1, lmbda=0.0, max_new_tokens=2)
        return GKDTrainer(model=model, teacher_model=tiny_model(), args=args, train_dataset=data,
                          processing_class=tokenizer)  # fmt: skip

    with pytest.raises(ValueError, match=r"GKDTrainer computes its own objective.*docs/distillation.md"):
        xt.apply(build(tiny_model()), loss=FOCAL)
    with pytest.raises(ValueError, match=r"GKDTrainer computes its own objective.*without labels"):
        build(xt.apply(tiny_model(), loss=FOCAL)).train()
