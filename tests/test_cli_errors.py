"""Every command-line mistake ends before any work: exit status 2, one line naming the option, no traceback.

The error cases run through ``cli.main`` in-process (fast) and check that no training started (no
results folder, no progress output); two cases run the real command in a subprocess, as do the pipe
and ``--debug``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crossent_harness import cli

SRC = str(Path(cli.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}

# (arguments, the option named in the message, a phrase of the message)
COMPARE_MISTAKES = [
    (["--losses", "gce:qq=0.7"], "--losses", "unknown hyperparameter 'qq' of gce (it takes: q)"),
    (["--losses", "ce,focal:gama=2"], "--losses", "unknown hyperparameter 'gama' of focal"),
    (["--losses", "ce,cb:beta=2"], "--losses", "beta must be in [0, 1), got 2"),
    (["--losses", "ce,la:tau=abc"], "--losses", "tau must be a number, got 'abc'"),
    (["--losses", "ce,forward_correction:T=foo"], "--losses", "T must be 'oracle'"),
    (["--losses", "ce,nope"], "--losses", "unknown loss 'nope'"),
    (["--losses", "ce,ce"], "--losses", "listed twice"),
    (["--losses", "forward_correction:T=oracle"], "--losses", "needs label noise (--noise)"),
    (["--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs", "must be >= 1"),
    (["--lr", "-1"], "--lr", "must be > 0"),
    (["--lr", "abc"], "--lr", "expected a number, got 'abc'"),
    # numbers that are floats to Python but cannot train: `--imbalance inf` once kept one class and
    # wrote Infinity into results.json
    (["--imbalance", "inf"], "--imbalance", "expected a finite number, got 'inf'"),
    (["--imbalance", "1e999"], "--imbalance", "expected a finite number, got '1e999'"),
    (["--imbalance", "1e9"], "--imbalance", "1e+09 leaves 7 of 10 classes without a training example; the head class keeps 122, so at most 122"),
    (["--lr", "nan"], "--lr", "expected a finite number, got 'nan'"),
    (["--lr", "inf"], "--lr", "expected a finite number"),
    (["--weight-decay", "inf"], "--weight-decay", "expected a finite number"),
    (["--momentum=-inf"], "--momentum", "expected a finite number"),
    (["--clip", "inf"], "--clip", "expected a finite number"),
    (["--schedule", "cosine", "--min-lr", "nan"], "--min-lr", "expected a finite number"),
    (["--calibrate", "--val-fraction", "nan"], "--val-fraction", "expected a finite number"),
    (["--noise", "ldr-uniform", "--noise-rate", "nan"], "--noise-rate", "must be in [0, 1], got nan"),
    (["--seed", "4294967296"], "--seed", "the last seed, 4294967296, is above 4294967295"),
    (["--optimizer", "rmsprop"], "--optimizer", "must be one of adam, sgd"),
    (["--noise-rate", "0.2"], "--noise-rate", "applies only with --noise"),
    (["--noise", "ldr-uniform", "--noise-rate", "1.5"], "--noise-rate", "must be in [0, 1]"),
    (["--noise", "ldr-uniform", "--noise-rate", "0.2,x"], "--noise-rate", "comma-separated"),
    (["--noise", "symmetric"], "--noise", "ambiguous: use apl-symmetric"),
    (["--noise", "gaussian"], "--noise", "unknown noise 'gaussian'"),
    (["--noise", "apl-asymmetric", "--dataset", "vowel"], "--noise", "10-class"),
    (["--dataset", "letter", "--noise", "apl-asymmetric"], "--noise", "not 26 classes"),
    (["--noise", "apl-symmetric", "--imbalance", "100"], "--noise", "use ldr-uniform on imbalanced data"),
    (["--momentum", "0.5"], "--momentum", "adam would ignore it"),
    (["--model", "cnn", "--hidden", "8"], "--hidden", "applies to --model mlp only"),
    (["--model", "linear", "--activation", "tanh"], "--activation", "applies to --model mlp only"),
    (["--model", "resnet"], "--model", "must be one of linear, mlp, cnn"),
    (["--val-fraction", "0.2"], "--val-fraction", "applies only with --calibrate"),
    (["--calibrate", "--val-fraction", "1.5"], "--val-fraction", "must be in (0, 1)"),
    (["--schedule", "step"], "--schedule", "needs --milestones"),
    (["--milestones", "5"], "--milestones", "applies to --schedule step only"),
    (["--schedule", "step", "--milestones", "5,30", "--epochs", "20"], "--milestones", "epoch 30 is not before"),
    (["--min-lr", "0.1"], "--min-lr", "applies to --schedule cosine only"),
    (["--protocol", "mnist1d", "--epochs", "3", "--steps", "5"], "--epochs", "cannot be used together with --steps"),
    (["--protocol", "nope"], "--protocol", "unknown protocol 'nope'"),
    (["--dataset", "cifar10"], "--dataset", "unknown dataset 'cifar10'"),
    (["--dataset", "mnist1d", "--scaling", "minmax"], "--scaling", "applies to tabular datasets"),
    (["--split", "random:x"], "--split", "random:N"),
    (["--imbalance", "0.5"], "--imbalance", "must be a finite number >= 1, got 0.5"),
    (["--train-size", "0"], "--train-size", "must be >= 1"),
    (["--seeds", "0"], "--seeds", "must be >= 1"),
    (["--clip", "-1"], "--clip", "must be > 0"),
    (["--hidden", "8,x"], "--hidden", "comma-separated ints"),
    (["--bogus"], "--bogus", "unrecognized arguments"),
]


@pytest.fixture(autouse=True)
def no_optional_data(tmp_path, monkeypatch):
    """Every case runs as on a machine without the optional datasets: no mistake above needs them."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("CROSSENT_FASHION_MNIST", str(empty))
    monkeypatch.setenv("CROSSENT_MLBENCH_DIR", str(empty))


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, option, phrase", COMPARE_MISTAKES, ids=[" ".join(c[0]) for c in COMPARE_MISTAKES])
def test_compare_mistakes_end_before_any_training(capsys, tmp_path, argv, option, phrase):
    out = tmp_path / "results"
    code, stdout, err = run_main(capsys, "compare", *argv, "--out", str(out), "--quiet")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("crossent compare: error: "), err
    assert option in err and phrase in err, err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


def test_out_under_a_regular_file_fails_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_main(capsys, "compare", "--out", str(blocker / "sub"), "--quiet")
    assert code == 2 and "--out" in err and "is not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, phrase", [
    (["--threads", "-1", "compare"], "argument --threads: must be >= 1, got -1"),
    (["--threads", "0", "losses"], "argument --threads: must be >= 1, got 0"),
    (["losses", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_global_and_losses_mistakes(capsys, argv, phrase):
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and phrase in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, phrase", [
    (["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    (["--shape", "64", "16", "x", "float32"], "--shape: V must be an integer >= 1"),
    (["--shape", "64", "16", "96", "float64"], "--shape: DTYPE must be one of float32, bfloat16, float16"),
    (["--device", "tpu"], "--device: must be cpu or cuda"),
    (["--timeout", "inf"], "argument --timeout: expected a finite number, got 'inf'"),
    (["--quiet-wait", "nan"], "argument --quiet-wait: expected a finite number, got 'nan'"),
    (["--methods", "nope"], "argument --methods: invalid choice: 'nope'"),
])
def test_bench_mistakes(capsys, argv, phrase):
    code, stdout, err = run_main(capsys, "bench", *argv)
    assert code == 2 and phrase in err and "Traceback" not in err and stdout == "", err


def test_real_command_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crossent_harness", "compare", "--losses", "focal:gama=2", "--out",
                           str(tmp_path / "o")], check=False, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "crossent compare: error: --losses: focal:gama=2: unknown hyperparameter 'gama' of focal (it takes: alpha, gamma)"
    ]


def test_debug_raises_instead_of_printing(tmp_path):
    from crossent_harness.experiments.options import OptionError

    with pytest.raises(cli.UsageError, match="--batch-size"):
        cli.main(["--debug", "compare", "--batch-size", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(cli.UsageError, match="--batch-size"):  # also after the command's own options
        cli.main(["compare", "--batch-size", "0", "--out", str(tmp_path / "o"), "--debug"])
    with pytest.raises(OptionError):  # the same check, called directly, keeps its own type
        from crossent_harness.experiments import options

        options.config_from_args(cli.build_parser().parse_args(["compare", "--batch-size", "0", "--no-plots",
                                                                  "--out", str(tmp_path / "o")]))


def test_losses_into_a_pipe_that_closes_early():
    # `crossent losses | head`: here the reader is gone before the first line is written (the child
    # still imports torch), so every write meets a closed pipe; the command must end quietly
    proc = subprocess.Popen([sys.executable, "-m", "crossent_harness", "losses"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == cli.EXIT_FAILURE
    assert err == "", err  # no BrokenPipeError traceback, no "Exception ignored"


def test_broken_pipe_in_process(monkeypatch, capsys):
    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_losses", closed)
    monkeypatch.setattr(cli, "_quiet_broken_pipe", lambda: None)
    assert cli.main(["losses"]) == cli.EXIT_FAILURE
    assert "Traceback" not in capsys.readouterr().err


def test_compare_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for text in ("(default: digits)", "(default: none)", "(default: quick)", "(default: 1)",
                 "default by protocol: quick 20, mnist1d", "ldr 16,16,16", "(default with --noise: 0.4)",
                 "results/compare-DATASET"):
        assert text in " ".join(out.split()), text


# `` and :role:`x` (reStructuredText) or `x` (its default role and Markdown's code)
MARKUP = re.compile(r"``|:[a-z]+:`|`")


@pytest.mark.parametrize("argv", [["--help"], ["losses", "--help"], ["compare", "--help"], ["bench", "--help"],
                                  ["losses"]], ids=lambda argv: " ".join(argv))
def test_terminal_output_is_plain_text_of_at_most_100_columns(capsys, monkeypatch, argv):
    # found on a wide terminal: the help printed ``x`` and :func:`x` from the docstrings, and
    # `crossent losses` a Markdown table with rows of 400 characters
    monkeypatch.setenv("COLUMNS", "300")
    with contextlib.suppress(SystemExit):
        cli.main(argv)
    out = capsys.readouterr().out
    assert out.count("\n") > 5
    assert not [line for line in out.splitlines() if len(line) > 100], max(out.splitlines(), key=len)
    assert not MARKUP.search(out), out[max(0, MARKUP.search(out).start() - 80):][:160]


def test_losses_follow_a_narrow_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "62")
    assert cli.main(["losses"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60


def test_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in out and "(default: cpu)" in out and "(default: results/bench_linear)" in out
