"""The ``crossent`` command end to end on tiny configurations (seconds)."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from _datasets import write_vowel
from crossent.losses import Loss
from crossent_harness import cli
from crossent_harness.experiments import catalog, options

ROOT = Path(__file__).resolve().parents[1]


def strict_load(path: Path):
    """``path`` read as strict JSON: ``NaN`` and ``Infinity`` are not JSON, and other parsers refuse them."""

    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_losses_lists_the_registry(capsys):
    rc, out, _ = run_cli(capsys, "losses", "--format", "markdown")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0] == "| name | hyperparameters (defaults) | formula | paper | streams |"
    ce = next(line for line in lines if line.startswith("| `ce` |"))
    assert "| label_smoothing=0.0 |" in ce and "Cross-entropy" in ce and "Szegedy" in ce and ce.endswith("| yes |")
    fc = next(line for line in lines if line.startswith("| `forward_correction` |"))
    assert "T (required), clip=True" in fc
    # the docstrings' reStructuredText becomes Markdown: code spans, no roles
    assert "``" not in out and ":math:" not in out and ":func:" not in out
    rc, text, _ = run_cli(capsys, "losses")  # the terminal's default: an entry per loss
    assert rc == 0 and "\nce  (streams: yes)\n" in text and "hyperparameters: T (required), clip=True" in text
    assert not text.lstrip().startswith("|")
    rc, out, _ = run_cli(capsys, "losses", "--format", "json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["z_loss"]["streams"] == "yes" and "PaLM" in rows["z_loss"]["paper"]
    assert rows["gce"]["hyperparameters"] == [{"name": "q", "default": 0.7}]
    assert {"name": "T", "required": True} in rows["forward_correction"]["hyperparameters"]


def test_formula_and_paper_attributes_win_over_the_docstring():
    class Documented(Loss):
        """First line.

        Reference: Someone,
        2020.

        Notes.
        """

        streamable = False

    class Explicit(Documented):
        formula = "lse - z_y"
        paper = "Me, 2024"

    assert catalog.loss_formula(Documented) == "First line." and catalog.loss_paper(Documented) == "Someone, 2020."
    assert catalog.loss_formula(Explicit) == "lse - z_y" and catalog.loss_paper(Explicit) == "Me, 2024"
    assert catalog.loss_streams(Documented) == "no"


def test_bench_without_the_module_fails_clearly(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "crossent_harness.bench.linear", None)
    monkeypatch.setitem(sys.modules, "crossent_harness.bench", None)
    rc, _, err = run_cli(capsys, "bench")
    assert rc == 2 and "crossent_harness.bench.linear" in err


def test_bench_delegates_to_the_module(capsys, monkeypatch):
    calls = {}
    fake = types.ModuleType("crossent_harness.bench.linear")
    fake.add_arguments = lambda p: p.add_argument("--full", action="store_true")
    fake.run = lambda args: calls.setdefault("args", args) and {}
    package = types.ModuleType("crossent_harness.bench")
    package.linear = fake
    monkeypatch.setitem(sys.modules, "crossent_harness.bench", package)
    monkeypatch.setitem(sys.modules, "crossent_harness.bench.linear", fake)
    rc, _, _ = run_cli(capsys, "bench", "--full")
    assert rc == 0 and calls["args"].full is True


def test_compare_noisy_grid_writes_every_file(capsys, tmp_path):
    out = tmp_path / "res"
    rc, stdout, _ = run_cli(
        capsys, "compare", "--losses", "ce,ce:label_smoothing=0.1", "--noise", "ldr-uniform", "--noise-rate", "0.2,0.5",
        "--seeds", "2", "--epochs", "2", "--hidden", "16", "--train-size", "300", "--calibrate", "--out", str(out),
        "--quiet",
    )
    assert rc == 0
    for name in ("summary.md", "runs.csv", "results.json", "accuracy_vs_noise.png", "reliability_0.2.png",
                 "reliability_0.5.png"):
        assert (out / name).stat().st_size > 0, name
    res = strict_load(out / "results.json")  # empty reliability bins are null, not NaN
    assert len(res["runs"]) == 2 * 2 * 2
    assert any(None in r["reliability"]["accuracy"] for r in res["runs"])
    assert {r["seed"] for r in res["runs"]} == {0, 1}
    # the same corrupted labels are shared by the methods of one (rate, seed)
    by = {}
    for r in res["runs"]:
        by.setdefault((r["rate"], r["seed"]), set()).add(round(r["actual_noise"], 12))
    assert all(len(v) == 1 for v in by.values())
    assert all(0.0 < r["actual_noise"] < r["rate"] for r in res["runs"])
    assert all("ece_ts" in r and r["temperature"] > 0 for r in res["runs"])
    assert all(0 <= r["ece_ca"] <= 1 and 0 <= r["ece_ca_plain"] <= 1 for r in res["runs"])
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 8 and float(rows[0]["acc"]) > 0.3
    assert "| `ce:label_smoothing=0.1` | ldr-uniform 0.5 |" in stdout
    assert "ECE % (TS)" in (out / "summary.md").read_text() and "ECE % (CA)" in (out / "summary.md").read_text()
    # what the figures depend on beyond the command line
    prov = res["provenance"]
    assert prov["torch"] == torch.__version__ and prov["threads"] == 1 and prov["cpu"]
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert f"torch {torch.__version__}" in (out / "summary.md").read_text()


def test_compare_long_tail_strategies(capsys, tmp_path):
    rc, stdout, _ = run_cli(
        capsys, "compare", "--losses", "ce,cb:beta=0.999,la,la_posthoc", "--imbalance", "10", "--epochs", "2",
        "--hidden", "16", "--out", str(tmp_path), "--quiet", "--no-plots",
    )
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["n_train"] < 1258 and len(res["runs"]) == 4
    assert all(r["bacc"] > 0.2 for r in res["runs"])
    assert not list(tmp_path.glob("*.png"))


def test_mnist1d_protocol_records_best_and_final_steps(capsys, tmp_path):
    pytest.importorskip("mnist1d")
    rc, _, _ = run_cli(
        capsys, "compare", "--dataset", "mnist1d", "--protocol", "mnist1d", "--steps", "60", "--eval-every", "20",
        "--out", str(tmp_path), "--quiet", "--losses", "ce",
    )
    assert rc == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["seed"] == 42 and [h["step"] for h in run["history"]] == [20, 40, 60]
    assert run["best_acc"] >= run["acc"] - 1e-12 or run["best_step"] != 60
    assert (tmp_path / "training_curves.png").exists()


def test_compare_reports_bad_input_clearly(capsys, tmp_path, monkeypatch):
    rc, _, err = run_cli(capsys, "compare", "--losses", "ce,nope", "--out", str(tmp_path), "--quiet")
    assert rc == 2 and "unknown loss 'nope'" in err
    # a dataset that is not installed: named after the options' checks, before any training
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(empty))
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(empty))
    for dataset, how in (("fashion-mnist", "apt-get install -y dataset-fashion-mnist"), ("vowel", "r-cran-mlbench")):
        out = tmp_path / dataset
        rc, stdout, err = run_cli(capsys, "compare", "--dataset", dataset, "--out", str(out), "--quiet")
        assert rc == 2 and err.startswith("crossent compare: error: --dataset: ") and how in err, err
        assert stdout == "" and not any(out.iterdir())


def test_compare_on_mlbench_files(capsys, tmp_path, monkeypatch):
    write_vowel(tmp_path)
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(tmp_path))
    rc, _, _ = run_cli(capsys, "compare", "--dataset", "vowel", "--losses", "ce", "--noise", "ldr-class-dependent",
                       "--noise-rate", "0.3", "--epochs", "1", "--hidden", "8", "--no-plots", "--quiet",
                       "--out", str(tmp_path / "out"))
    assert rc == 0
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["method"] == "ce" and run["rate"] == 0.3 and 0 <= run["acc"] <= 1


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "crossent_harness", "losses", "--format", "names"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ce" in proc.stdout.split()
    # the library has no command of its own: it names the one there is instead
    proc = subprocess.run([sys.executable, "-m", "crossent", "losses"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == "" and "python -m crossent_harness" in proc.stderr


def compare_config(tmp_path, *argv):
    args = cli.build_parser().parse_args(["compare", *argv, "--out", str(tmp_path / "out"), "--no-plots"])
    return options.config_from_args(args)[0]


def test_default_losses_are_all_known(tmp_path):
    cfg = compare_config(tmp_path)
    for method in cfg.methods:
        method.check()
    assert cfg.dataset == "digits" and cfg.noise == "none" and cfg.seeds == (0,)


def test_protocol_presets_and_overrides(tmp_path):
    cfg = compare_config(tmp_path, "--protocol", "ldr", "--epochs", "12")
    assert cfg.train.optimizer == "sgd" and cfg.train.weight_decay == 5e-3 and cfg.activation == "tanh"
    assert cfg.train.milestones == (6, 9) and cfg.train.epochs == 12 and cfg.train.sampler == "ordered"
    assert cfg.hidden == (16, 16, 16) and cfg.init == "xavier"
    # split and scaling apply to tabular data: the reference's Letter layout
    cfg = compare_config(tmp_path, "--protocol", "ldr", "--dataset", "letter")
    assert cfg.split == "random:2000" and cfg.scaling == "minmax" and cfg.train.milestones == (50, 75)
    assert compare_config(tmp_path, "--protocol", "ldr-wide").hidden == (100, 100)
    cfg = compare_config(tmp_path, "--protocol", "mnist1d", "--seeds", "2")
    assert cfg.seeds == (42, 43) and cfg.train.steps == 6000 and cfg.train.sampler == "cyclic" and cfg.residual
    assert cfg.split == "default" and cfg.scaling is None
    assert not compare_config(tmp_path, "--protocol", "mnist1d", "--no-residual").residual
    # an explicit length in epochs replaces the preset's steps
    cfg = compare_config(tmp_path, "--protocol", "mnist1d", "--epochs", "3")
    assert cfg.train.steps is None and cfg.train.epochs == 3
    assert compare_config(tmp_path, "--protocol", "apl", "--dataset", "fashion-mnist").model == "cnn"


def test_an_interrupted_grid_keeps_its_finished_runs(capsys, tmp_path, monkeypatch):
    from crossent_harness.experiments import compare

    real = compare._one_run
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "_one_run", second_fails)
    rc, _, err = run_cli(capsys, "compare", "--losses", "ce,sce", "--epochs", "1", "--hidden", "8", "--no-plots",
                         "--quiet", "--out", str(tmp_path))
    assert rc == 130 and "interrupted" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and [r["method"] for r in saved["runs"]] == ["ce"]
    assert "Incomplete: the 1 runs finished so far." in (tmp_path / "summary.md").read_text()


# -- dry runs, and the commands that the repository's scripts run ---------------------------------------------
def test_dry_run_checks_and_stops(capsys, tmp_path, monkeypatch):
    from crossent_harness.experiments import datasets

    monkeypatch.setattr(datasets, "load", lambda name: pytest.fail("a dry run loads no data"))
    out = tmp_path / "never"
    rc, stdout, _ = run_cli(capsys, "compare", "--dataset", "letter", "--protocol", "ldr", "--losses", "ce,sce",
                            "--noise", "ldr-uniform", "--noise-rate", "0.2,0.6", "--seeds", "3", "--out", str(out),
                            "--dry-run")
    text = " ".join(stdout.split())
    assert rc == 0 and "Would train 12 models (2 losses x 2 noise rates x 3 seeds)" in text
    assert "100 epochs each" in text and "that letter is installed" in text and not out.exists()
    rc, _, err = run_cli(capsys, "compare", "--imbalance", "inf", "--dry-run")  # still every check
    assert rc == 2 and "--imbalance" in err
    rc, stdout, _ = run_cli(capsys, "bench", "--full", "--dry-run", "--out", str(out))
    assert rc == 0 and "Would run 37 fresh processes" in " ".join(stdout.split()) and not out.exists()


def _regeneration_commands():
    """The ``crossent compare`` arguments of every experiment of benchmarks/regenerate_results.sh."""
    script = (ROOT / "benchmarks" / "regenerate_results.sh").read_text()
    variables = dict(re.findall(r'^([A-Z_]+)="([^"$]*)"$', script, re.M))
    entries = re.findall(r'^\s*"([\w@-]+)\|([-\d ]+)\|(.*)"$', script, re.M)
    assert len(entries) >= 10, "the EXPERIMENTS of regenerate_results.sh were not found"
    for name, _, args in entries:
        yield name, shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], args))


def test_the_regeneration_script_and_make_demo_run_accepted_commands(capsys, tmp_path, monkeypatch):
    # docs/results.md is regenerated by these commands, and `make demo` runs the Makefile's: a command
    # that the options refuse would surface only after the runs before it
    monkeypatch.chdir(tmp_path)
    commands = [(name, ["compare", *args]) for name, args in _regeneration_commands()]
    makefile = (ROOT / "Makefile").read_text()
    commands += [("Makefile", shlex.split(line)) for line in re.findall(r"/bin/crossent (.*)$", makefile, re.M)]
    assert ("Makefile", ["bench"]) in commands
    for name, argv in commands:
        rc, _, err = run_cli(capsys, *argv, "--dry-run")
        assert rc == 0, f"{name}: crossent {shlex.join(argv)}: {err}"

