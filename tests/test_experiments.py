"""The experiment harness itself: metrics against hand computations, corruption, calibration, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _datasets import write_fashion_mnist, write_vowel
from crossent.calibration import TemperatureScaling
from crossent_harness.experiments import datasets, metrics, report, subsets, views
from crossent_harness.experiments.methods import Context, Method, class_balanced_weight, parse_list
from crossent_harness.experiments.models import MNIST1DConv, build_model
from crossent_harness.experiments.train import Prepared, TrainConfig, predict, train


def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


# -- metrics ----------------------------------------------------------------------------------------
def test_ece_hand_case_15_bins():
    # confidences 0.95, 0.95, 0.95, 0.65, 0.65, 0.30 (three bins); correctness 1,1,0 / 1,0 / 1
    p = [[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.65, 0.35, 0.0], [0.65, 0.35, 0.0], [0.3, 0.3, 0.4]]
    y = torch.tensor([0, 0, 1, 0, 2, 2])
    z = logits_of([[max(v, 1e-300) for v in row] for row in p])
    expected = (3 * abs(2 / 3 - 0.95) + 2 * abs(0.5 - 0.65) + 1 * abs(1.0 - 0.4)) / 6
    assert metrics.ece(z, y, n_bins=15) == pytest.approx(expected, abs=1e-12)
    bins = metrics.reliability_bins(z, y, n_bins=15)
    assert sum(bins["count"]) == 6
    # 0.95 in (14/15, 1], 0.65 in (9/15, 10/15], 0.4 in (5/15, 6/15]
    assert bins["count"][14] == 3 and bins["count"][9] == 2 and bins["count"][5] == 1
    assert bins["accuracy"][14] == pytest.approx(2 / 3)
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None  # an empty bin has no mean


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.6 with 5 bins belongs to (0.4, 0.6], not (0.6, 0.8]
    z = logits_of([[0.6, 0.4]])
    bins = metrics.reliability_bins(z, torch.tensor([0]), n_bins=5)
    assert bins["count"] == [0, 0, 1, 0, 0]
    z1 = torch.tensor([[100.0, -100.0]])  # confidence 1.0 -> last bin
    assert metrics.reliability_bins(z1, torch.tensor([0]), n_bins=5)["count"][-1] == 1


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_of_overconfidence_is_the_gap():
    z = logits_of([[0.75, 0.25]] * 4)
    assert metrics.ece(z, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(z, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5, abs=1e-12)


def test_balanced_accuracy_hand_case_and_sklearn():
    z = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    # recalls: class 0: 3/3, class 1: 1/2, class 2: 1/1
    assert metrics.balanced_accuracy(z, y) == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics.accuracy(z, y) == pytest.approx(5 / 6)
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 7, generator=g)
    y = torch.randint(0, 7, (500,), generator=g)
    assert metrics.balanced_accuracy(z, y) == pytest.approx(sk.balanced_accuracy_score(y, z.argmax(-1)), abs=1e-12)


def test_balanced_accuracy_ignores_classes_absent_from_labels():
    z = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert metrics.balanced_accuracy(z, torch.tensor([0, 0])) == pytest.approx(0.5)


def test_nll_hand_case():
    z = logits_of([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    assert metrics.nll(z, torch.tensor([0, 2])) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2, abs=1e-12)


# -- subsets -----------------------------------------------------------------------------------------
def test_long_tail_profile():
    counts = subsets.long_tail_counts(10, 6000, 100)
    assert counts == [int(6000 * 100 ** (-i / 9) + 1e-9) for i in range(10)]
    assert counts[0] == 6000 and counts[-1] == 60
    y = torch.arange(5).repeat_interleave(torch.tensor([120, 100, 130, 100, 110]))
    keep = subsets.long_tail_indices(y, 5, 10.0, seed=0)
    got = torch.bincount(y[keep], minlength=5).tolist()
    assert got == [int(100 * 10 ** (-i / 4) + 1e-9) for i in range(5)] == [100, 56, 31, 17, 10]
    with pytest.raises(ValueError, match="imbalance"):
        subsets.long_tail_counts(3, 10, 0.5)
    for ratio in (float("inf"), float("nan")):  # inf keeps the head class alone
        with pytest.raises(ValueError, match="finite number >= 1"):
            subsets.long_tail_counts(3, 10, ratio)


def test_stratified_subsample_keeps_shares():
    y = torch.arange(4).repeat_interleave(torch.tensor([400, 300, 200, 100]))
    keep = subsets.stratified_subsample(y, 100, seed=0)
    assert torch.bincount(y[keep]).tolist() == [40, 30, 20, 10]


# -- temperature scaling -------------------------------------------------------------------------------
@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(t_true):
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(40_000, 6, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / t_true, -1), 1, generator=g).squeeze(1)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature == pytest.approx(t_true, rel=0.05)
    assert torch.equal(ts(z).argmax(-1), z.argmax(-1))
    assert metrics.nll(ts(z), y) <= metrics.nll(z, y)


def test_temperature_scaling_bad_input():
    with pytest.raises(ValueError, match="logits"):
        TemperatureScaling().fit(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        TemperatureScaling().fit(torch.randn(4, 3), torch.zeros(4))


@pytest.mark.parametrize("kind, shape", [("image", (5, 1, 4, 6)), ("signal", (5, 8)), ("tabular", (5, 3))])
def test_calibration_views_keep_the_shape_and_are_reproducible(kind, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    made = views.transformed(x, kind, seed=3)
    assert len(made) == views.COUNT and all(v.shape == x.shape and v.dtype == x.dtype for v in made)
    assert all(not torch.equal(v, x) for v in made)
    assert all(torch.equal(a, b) for a, b in zip(made, views.transformed(x, kind, seed=3)))
    if kind == "image":
        assert torch.equal(made[0], x.flip(-1)) and torch.equal(made[1][..., 2:], x[..., :-2])
    with pytest.raises(ValueError, match="kind must be"):
        views.transformed(x, "video", seed=0)


# -- methods ------------------------------------------------------------------------------------------
def test_method_specs():
    ms = parse_list("ce, gce:q=0.7,sce:alpha=0.1,beta=1, cb:beta=0.99:loss=ce")
    assert [m.label for m in ms] == ["ce", "gce:q=0.7", "sce:alpha=0.1:beta=1", "cb:beta=0.99:loss=ce"]
    assert ms[2].hparams == {"alpha": 0.1, "beta": 1}
    assert Method.parse("ce:label_smoothing=0.1").hparams == {"label_smoothing": 0.1}
    with pytest.raises(ValueError, match="unknown loss"):
        Method.parse("no_such_loss").check()
    with pytest.raises(ValueError, match="twice"):
        parse_list("ce,ce")
    with pytest.raises(ValueError, match="key=value"):
        Method.parse("ce:0.1")


def test_class_balanced_weight_formula():
    counts = torch.tensor([100, 10, 1])
    w = class_balanced_weight(counts, 0.9)
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**n) for n in (100, 10, 1)], dtype=torch.float64)
    assert torch.allclose(w.double(), raw * 3 / raw.sum(), atol=1e-6)
    assert w.sum().item() == pytest.approx(3.0)


def test_logit_adjustment_methods():
    import crossent as xe

    counts = torch.tensor([60, 30, 10])
    ctx = Context(counts, 3)
    log_prior = torch.log(counts.double() / 100).float()
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    la = Method.parse("la:tau=2").prepare(ctx)
    ref = torch.nn.functional.cross_entropy(z + 2 * log_prior, y)
    assert xe.cross_entropy(z, y, loss=la.loss).item() == pytest.approx(ref.item(), abs=1e-5)
    post = Method.parse("la_posthoc").prepare(ctx)
    assert torch.allclose(post.adjust(z), z - log_prior, atol=1e-6)
    cb = Method.parse("cb:beta=0.9").prepare(ctx)
    per_row = torch.nn.functional.cross_entropy(z, y, reduction="none")
    w = class_balanced_weight(counts, 0.9)
    assert cb.weight is None
    assert cb.reduce(per_row, target=y).item() == pytest.approx((w[y] * per_row).mean().item(), rel=1e-6)


# -- models and training --------------------------------------------------------------------------------
def test_models_shapes():
    assert MNIST1DConv(40, 10).head.in_features == 125
    assert build_model("cnn", (40,), 10)(torch.randn(3, 40)).shape == (3, 10)
    assert build_model("cnn", (1, 28, 28), 10)(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert build_model("mlp", (64,), 5, hidden=(8, 8))(torch.randn(2, 64)).shape == (2, 5)
    lin = build_model("linear", (4,), 3)
    assert sum(p.numel() for p in lin.parameters()) == 15
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (4,), 3)


def test_residual_mlp_matches_the_mnist1d_reference_form():
    torch.manual_seed(0)
    m = build_model("mlp", (40,), 10, hidden=(100, 100), residual=True)
    x = torch.randn(3, 40)
    l1, l2 = m.hidden
    h = l1(x).relu()
    h = h + l2(h).relu()
    assert torch.allclose(m(x), m.head(h))
    plain = build_model("mlp", (40,), 10, hidden=(100, 100))
    assert plain.skip == [False, False] and m.skip == [False, True]


def test_training_learns_digits_quickly():
    data = datasets.load("digits")
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10, hidden=(32,))
    cfg = TrainConfig(epochs=3, batch_size=64, eval_every=10)
    hist = train(model, data.x_train, data.y_train, Prepared("ce"), cfg, seed=0, eval_data=(data.x_test, data.y_test))
    assert len(hist) == cfg.total_steps(len(data.y_train)) // 10
    assert metrics.accuracy(predict(model, data.x_test), data.y_test) > 0.85


def test_cyclic_sampler_and_step_schedule():
    cfg = TrainConfig(steps=7, batch_size=3, sampler="cyclic")
    assert cfg.total_steps(100) == 7
    from crossent_harness.experiments.train import _lr_at

    sched = TrainConfig(lr=1.0, schedule="step", milestones=(2, 4), epochs=6)
    assert [round(_lr_at(sched, e), 6) for e in range(6)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cos = TrainConfig(lr=1.0, schedule="cosine", min_lr=0.1, epochs=4)
    assert _lr_at(cos, 0) == 1.0 and _lr_at(cos, 2) == pytest.approx(0.55)


# -- datasets -------------------------------------------------------------------------------------------
def test_fashion_mnist_idx_reader(tmp_path, monkeypatch):
    imgs = write_fashion_mnist(tmp_path)
    monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(tmp_path))
    d = datasets.load("fashion-mnist")
    assert d.x_train.shape == (6, 1, 28, 28) and d.kind == "image"
    assert d.y_test.tolist() == [5, 6]
    assert torch.allclose(d.x_train[3, 0], torch.tensor(imgs[3], dtype=torch.float32) / 255)


def test_vowel_from_mlbench_files(tmp_path, monkeypatch):
    write_vowel(tmp_path)
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(tmp_path))
    d = datasets.load("vowel")
    assert d.x_train.shape == (8 * 11, 9) and d.x_test.shape == (7 * 11, 9) and d.num_classes == 11
    assert d.pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)] and d.class_names[0] == "v00"
    assert torch.allclose(d.x_train.mean(0), torch.zeros(9), atol=1e-5)  # standardised on the training speakers


def test_missing_sources_explain_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(tmp_path))
    with pytest.raises(datasets.MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        datasets.load("fashion-mnist")
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(tmp_path))
    for name in ("letter", "vowel", "shuttle"):
        with pytest.raises(datasets.MissingDataError, match="r-cran-mlbench"):
            datasets.load(name)
    datasets._mnist1d_arrays.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "mnist1d.data", None)
    with pytest.raises(datasets.MissingDataError, match="pip install mnist1d"):
        datasets.load("mnist1d")
    datasets._mnist1d_arrays.cache_clear()
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("cifar10")


def test_a_data_variable_is_the_only_place_looked_in(tmp_path, monkeypatch):
    monkeypatch.delenv("CROSSENT_FASHION_MNIST", raising=False)
    monkeypatch.delenv("CROSSENT_MLBENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert datasets.cache_dir() == tmp_path / "cache" / "crossent"
    assert datasets.fashion_mnist_dirs() == [Path("/usr/share/datasets/fashion-mnist")]
    assert datasets.mlbench_dirs() == [Path("/usr/lib/R/site-library/mlbench/data"),
                                       tmp_path / "cache/crossent/mlbench/usr/lib/R/site-library/mlbench/data"]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rule: a relative path is ignored
    assert datasets.cache_dir() == Path.home() / ".cache" / "crossent"
    # a folder named explicitly is searched alone: without the files there, no installed copy stands in
    monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(tmp_path / "mine"))
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(tmp_path / "mine"))
    assert datasets.fashion_mnist_dirs() == datasets.mlbench_dirs() == [tmp_path / "mine"]
    with pytest.raises(datasets.MissingDataError, match=r"not found in \S*mine \(from CROSSENT_FASHION_MNIST\)"):
        datasets.load("fashion-mnist")
    with pytest.raises(datasets.MissingDataError, match=r"Vowel\.rda not found in \S*mine \(from CROSSENT_MLBENCH_DIR"):
        datasets.load("vowel")


@pytest.mark.parametrize("name", datasets.available())
def test_profiles_describe_the_loaded_datasets(name, tmp_path, monkeypatch):
    if name == "fashion-mnist":
        write_fashion_mnist(tmp_path)
        monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(tmp_path))
    if name == "vowel":
        write_vowel(tmp_path)
        monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(tmp_path))
    try:
        d = datasets.load(name)
    except datasets.MissingDataError:
        pytest.skip(f"{name} is not installed here (make data installs it)")
    assert datasets.profile(name) == (d.kind, d.input_shape, d.num_classes)


def test_letter_when_installed():
    try:
        d = datasets.load("letter")
    except datasets.MissingDataError:
        pytest.skip("mlbench's Letter is not installed here (make data installs it)")
    assert d.x_train.shape == (16000, 16) and d.x_test.shape == (4000, 16) and d.num_classes == 26
    assert d.class_names[1] == "B" and (1, 3) in d.pairs


# -- report ---------------------------------------------------------------------------------------------
def test_aggregate_mean_and_sample_std():
    runs = [{"method": "ce", "rate": 0.4, "noise": "ldr-uniform", "acc": a, "bacc": a, "nll": 1.0, "ece": 0.1}
            for a in (0.5, 0.7, 0.9)]
    (row,) = report.aggregate(runs)
    assert row["acc"][0] == pytest.approx(0.7) and row["acc"][1] == pytest.approx(0.2)
    table = report.markdown_table([row])
    assert "| `ce` | ldr-uniform 0.4 | 70.00 ± 20.00 |" in table


def test_results_json_is_strict_json(tmp_path):
    # `crossent compare --imbalance inf` once wrote `"imbalance": Infinity`, and every empty reliability
    # bin NaN: JSON has neither, and strict parsers refuse the file
    run = {"method": "ce", "rate": 0.0, "noise": "none", "seed": 0, "acc": 0.5, "bacc": 0.5, "nll": float("inf"),
           "ece": 0.1, "reliability": {"count": [0, 2], "accuracy": [float("nan"), 0.5]}}
    paths = report.write({"dataset": "d", "config": {"imbalance": float("inf")}, "runs": [run]}, tmp_path)

    def refuse(constant):
        raise ValueError(constant)

    saved = json.loads(paths["json"].read_text(), parse_constant=refuse)
    assert saved["config"]["imbalance"] is None and saved["runs"][0]["nll"] is None
    assert saved["runs"][0]["reliability"]["accuracy"] == [None, 0.5] and saved["runs"][0]["acc"] == 0.5


def test_train_config_refuses_non_finite_settings():
    for field in ("lr", "weight_decay", "min_lr", "clip"):
        for value in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match=f"{field.replace('_', '-')} must be a finite number"):
                TrainConfig(**{field: value}).check()


# -- strategies that need other parts of the library ------------------------------------------------------
def test_forward_correction_estimated_and_oracle(tmp_path):
    from crossent import losses

    if "forward_correction" not in losses.available():
        with pytest.raises(ValueError, match="forward_correction"):
            Method.parse("forward_correction").check()
        return
    from crossent_harness.experiments.compare import CompareConfig, run

    cfg = CompareConfig(
        methods=parse_list("forward_correction,forward_correction:T=oracle"), hidden=(16,), noise="ldr-uniform",
        noise_rates=(0.3,), train_size=400, train=TrainConfig(epochs=2),
    )
    res = run(cfg)
    est, oracle = res["runs"]
    assert est["info"]["T"].startswith("estimated") and 0 <= est["info"]["T_error"] < 2
    assert oracle["info"]["T"] == "oracle"
    assert est["acc"] > 0.3 and oracle["acc"] > 0.3


# -- progress ---------------------------------------------------------------------------------------------
def test_progress_falls_back_to_plain_lines(monkeypatch, capsys):
    import sys

    from crossent_harness.experiments.progress import Progress

    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with Progress(10, "work", bar=True, stream=sys.stdout) as p:
        for _ in range(10):
            p.advance()
        p.log("a line")
    out = capsys.readouterr().out
    assert "work: 10%" in out and "work: 100%" in out and "a line" in out
    with Progress(10, "quiet", bar=False, stream=sys.stdout) as p:
        p.advance(10)
        p.log("only this")
    assert capsys.readouterr().out == "only this\n"


def test_per_sample_losses_get_the_training_set_size():
    from crossent import losses

    if "aldr_kl" not in losses.available():
        pytest.skip("aldr_kl not in this version")
    prepared = Method.parse("aldr_kl").prepare(Context(torch.tensor([5, 5]), 2, num_train=10))
    assert prepared.loss.num_samples == 10
    assert Method.parse("aldr_kl:num_samples=20").prepare(Context(torch.tensor([5, 5]), 2, num_train=10)).loss.num_samples == 20


def test_clean_rows_are_called_clean():
    runs = [{"method": "ce", "rate": r, "noise": "ldr-uniform", "acc": 0.9, "bacc": 0.9, "nll": 0.3, "ece": 0.05}
            for r in (0.0, 0.4)]
    table = report.markdown_table(report.aggregate(runs))
    assert "| `ce` | clean | 90.00 |" in table and "| `ce` | ldr-uniform 0.4 | 90.00 |" in table
