"""Protocol presets and what they need: the reference's data layout, network, initialisation and batch order."""

from __future__ import annotations

import math

import pytest
import torch

from crossent_harness.experiments import datasets, layout, plots, protocols
from crossent_harness.experiments.models import build_model
from crossent_harness.experiments.train import Prepared, TrainConfig, train


def toy(n_train=8, n_test=4, kind="tabular") -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 3, generator=g) * 5 + 2
    y = torch.arange(n_train + n_test) % 2
    return datasets.Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 2, kind)


# -- presets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(protocols.PROTOCOLS))
def test_every_preset_names_its_source_and_trains(name):
    proto = protocols.get(name)
    assert proto.source and proto.summary
    if name != "quick":
        assert proto.deviations, "a published setup must list how running it here still differs"
    TrainConfig(**{k: v for k, v in proto.train.items() if k != "milestones"}).check()


def test_ldr_preset_is_the_reference_setup():
    ldr = protocols.get("ldr")
    assert ldr.model == {"model": "mlp", "hidden": (16, 16, 16), "activation": "tanh", "init": "xavier"}
    assert ldr.train["optimizer"] == "sgd" and ldr.train["momentum"] == 0.9 and ldr.train["weight_decay"] == 5e-3
    assert ldr.train["batch_size"] == 64 and ldr.train["epochs"] == 100 and ldr.train["milestones"] == (0.5, 0.75)
    assert ldr.train["sampler"] == "ordered"  # the reference's data loader does not shuffle
    assert ldr.data_for("letter") == {"scaling": "minmax", "split": "random:2000"}
    assert ldr.data_for("vowel") == {"scaling": "minmax"}
    wide = protocols.get("ldr-wide")
    assert wide.model["hidden"] == (100, 100) and wide.train == ldr.train and wide.data == ldr.data
    assert "wider" in wide.deviations[0]
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.get("ldr2")


# -- layout ---------------------------------------------------------------------------------------------
def test_random_split_draws_test_rows_from_all_rows_with_a_fixed_seed():
    d = toy()
    a, b = layout.resplit(d, 5), layout.resplit(d, 5)
    assert len(a.y_test) == 5 and len(a.y_train) == 7 and torch.equal(a.x_test, b.x_test)
    rows = {tuple(r.tolist()) for r in torch.cat([d.x_train, d.x_test])}
    assert {tuple(r.tolist()) for r in torch.cat([a.x_train, a.x_test])} == rows
    with pytest.raises(ValueError, match="fewer test rows"):
        layout.resplit(d, 12)
    assert layout.parse_split("default") is None and layout.parse_split("random:2000") == 2000
    for bad in ("random", "random:0", "first:10"):
        with pytest.raises(ValueError, match="random:N"):
            layout.parse_split(bad)


def test_minmax_scaling_maps_the_training_range_to_minus_one_one():
    d = layout.rescale(toy(), "minmax")
    assert torch.allclose(d.x_train.min(0).values, torch.full((3,), -1.0))
    assert torch.allclose(d.x_train.max(0).values, torch.full((3,), 1.0))
    assert d.scaling == "minmax"
    # the loader's standardisation before it makes no difference (both are per-feature affine maps)
    std = layout.rescale(toy(), "standard")
    assert torch.allclose(layout.rescale(std, "minmax").x_test, d.x_test, atol=1e-5)
    with pytest.raises(ValueError, match="tabular"):
        layout.rescale(toy(kind="image"), "minmax")


def test_a_new_split_refits_the_datasets_own_scaling():
    d = layout.apply(toy(), "random:4")  # toy data say "standard": refit on the new training rows
    assert torch.allclose(d.x_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.x_train.std(0), torch.ones(3), atol=1e-5)


def test_letter_under_the_ldr_layout_when_installed():
    try:
        d = layout.apply(datasets.load("letter"), "random:2000", "minmax")
    except datasets.MissingDataError:
        pytest.skip("mlbench's Letter is not installed here (make data installs it)")
    assert d.x_train.shape == (18000, 16) and d.x_test.shape == (2000, 16)
    assert d.x_train.min() == -1 and d.x_train.max() == 1


# -- network and batches ----------------------------------------------------------------------------------
def test_xavier_initialisation():
    torch.manual_seed(0)
    m = build_model("mlp", (16,), 26, hidden=(16, 16, 16), activation="tanh", init="xavier")
    for layer in [*m.hidden, m.head]:
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    with pytest.raises(ValueError, match="unknown init"):
        build_model("mlp", (4,), 2, init="he")


def test_ordered_sampler_walks_the_rows_in_order_every_epoch():
    seen = []

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 2)

        def forward(self, x):
            if self.training:
                seen.append(x[:, 0].long().tolist())
            return self.lin(x)

    x = torch.arange(5.0).unsqueeze(1)
    y = torch.tensor([0, 1, 0, 1, 0])
    train(Record(), x, y, Prepared("ce"), TrainConfig(optimizer="sgd", batch_size=2, epochs=2, sampler="ordered"))
    assert seen == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]]


# -- plots ------------------------------------------------------------------------------------------------
def test_pooled_reliability_bins_weight_by_count():
    a = {"edges": [0, 0.5, 1], "count": [2, 0], "accuracy": [0.5, float("nan")], "confidence": [0.3, float("nan")]}
    b = {"edges": [0, 0.5, 1], "count": [2, 4], "accuracy": [1.0, 0.75], "confidence": [0.4, 0.8]}
    pooled = plots.pooled_bins([a, b])
    assert pooled["count"] == [4, 4]
    assert pooled["accuracy"] == pytest.approx([0.75, 0.75]) and pooled["confidence"] == pytest.approx([0.35, 0.8])


def test_labels_for_readers():
    assert plots.rate_label(0) == "clean" and plots.rate_label(0.4) == "0.4"
    assert plots.seeds_text([42, 43, 44]) == "3 seeds (42-44)" and plots.seeds_text([0]) == "1 seed (0)"
    assert plots.seeds_text([]) == "no seeds" and plots.seeds_text([0, 2]) == "2 seeds (0, 2)"
    styles = [tuple(plots.style(i).values()) for i in range(10)]
    assert len(set(styles)) == 10 and len({s[1:] for s in styles}) > 4  # markers and dashes differ too
