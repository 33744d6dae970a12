"""``crossent scaling fit`` on temporary CSV files: the fit, its forecast and intervals, and one-line errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from crossent.scaling import ChinchillaFit
from crossent_harness import cli


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def power_law_csv(tmp_path):
    """Runs of a law L = 0.6 + (300 / params) ** 0.35, with 0.5% noise and a column the fit ignores."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "runs.csv"
    lines = ["name,params,loss"]
    for i, n in enumerate([1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6]):
        loss = (0.6 + (300 / n) ** 0.35) * math.exp(0.005 * torch.randn((), generator=g).item())
        lines.append(f"run{i},{n:g},{loss:.6f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_prints_the_law_and_a_forecast_with_its_interval(capsys, power_law_csv):
    rc, out, err = run_cli(capsys, "scaling", "fit", power_law_csv, "--x", "params", "--y", "loss",
                           "--forecast", "1e7,1e8", "--bootstrap", "20")
    assert rc == 0, err
    assert f"loss against params: 7 rows of {power_law_csv}" in out
    assert "L(x) = L_inf + (x0 / x)^alpha" in out and "95% percentile bootstrap intervals" in out
    alpha = float(re.search(r"\n  alpha +([0-9.]+) ", out).group(1))
    assert alpha == pytest.approx(0.35, abs=0.05)
    row = re.search(r"\n *1e\+07 +([0-9.]+) +\[([0-9.]+), ([0-9.]+)\]", out)
    forecast, low, high = map(float, row.groups())
    truth = 0.6 + (300 / 1e7) ** 0.35
    assert forecast == pytest.approx(truth, rel=0.02) and low <= truth <= high
    assert "1e+08" in out


def test_two_columns_and_compute_optimal(capsys, tmp_path):
    law = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    path = tmp_path / "grid.csv"
    sizes = [(n, d) for n in (1e7, 1e8, 1e9, 1e10) for d in (1e9, 1e10, 1e11, 1e12)]
    rows = [f"{n:g},{d:g},{float(law.predict(n, d)):.8f}" for n, d in sizes]
    path.write_text("N,D,loss\n" + "\n".join(rows) + "\n")
    rc, out, err = run_cli(capsys, "scaling", "fit", path, "--x", "N", "--x2", "D", "--y", "loss", "--bootstrap", "0",
                           "--forecast", "7e10:1.4e12", "--compute", "5.76e23")
    assert rc == 0, err
    assert "L(N, D) = E + A / N^alpha + B / D^beta" in out and "interval" not in out
    assert re.search(r"\n  params_exponent +0\.451", out)
    forecast = float(re.search(r"\n *7e\+10 +1\.4e\+12 +([0-9.]+)", out).group(1))
    assert forecast == pytest.approx(float(law.predict(7e10, 1.4e12)), rel=1e-3)
    opt = law.compute_optimal(5.76e23)
    n_opt = float(re.search(r"\n *5\.76e\+23 +([0-9.e+]+) ", out).group(1))
    assert n_opt == pytest.approx(float(opt.params), rel=0.01)


def test_plot_is_written(capsys, power_law_csv, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fit.png"
    rc, out, err = run_cli(capsys, "scaling", "fit", power_law_csv, "--x", "params", "--y", "loss",
                           "--forecast", "1e7", "--bootstrap", "5", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


@pytest.mark.parametrize("content, options, message", [
    ("params,loss\n1,2\n", ["--x", "size"], "no column 'size'; the columns are params, loss"),
    ("params,loss\n1e3,1.0\n1e4,oops\n", [], "line 3: loss is not a number: 'oops'"),
    ("params,loss\n1e3,1.0\n0,0.9\n", [], "line 3: params must be finite and > 0"),
    ("params,loss\n1e3,1.0\n1e4,0.9\n", [], "a fit of 3 parameters needs at least 3 points, got 2"),
    ("params,loss\n1e3,1.0\n", ["--forecast", "1e6:1e7"], "--forecast: expected numbers such as 1e9"),
    ("params,loss\n1e3,1.0\n", ["--forecast", "-1"], "--forecast: sizes must be finite and > 0"),
    ("params,loss\n1e3,1.0\n", ["--compute", "1e20"], "--compute: the compute-optimal allocation needs two sizes"),
    ("params,loss\n1e3,1.0\n", ["--confidence", "1.5"], "--confidence: must be in (0, 1)"),
])
def test_mistakes_end_with_one_line(capsys, tmp_path, content, options, message):
    path = tmp_path / "runs.csv"
    path.write_text(content)
    argv = ["scaling", "fit", path, "--x", "params", "--y", "loss", *options]
    if "--x" in options:
        argv = ["scaling", "fit", path, "--y", "loss", *options]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("crossent scaling fit: error: ") and message in err and err.count("\n") == 1, err


def test_missing_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "scaling", "fit", tmp_path / "none.csv", "--x", "a", "--y", "b")
    assert rc == 2 and "cannot read" in err and "none.csv" in err


def test_dry_run_reads_nothing(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "scaling", "fit", tmp_path / "none.csv", "--x", "N", "--x2", "D", "--y", "loss",
                           "--forecast", "1e9:2e10", "--compute", "1e21", "--dry-run")
    assert rc == 0, err
    assert out.startswith(f"fit loss = E + A / N^alpha + B / D^beta against N = N, D = D from {tmp_path / 'none.csv'}")
    assert "200 bootstrap resamples, seed 0, 95%" in out and "compute-optimal N and D at C = 1e21" in out


@pytest.mark.parametrize("argv", [["scaling", "--help"], ["scaling", "fit", "--help"]], ids=" ".join)
def test_help_is_plain_text_of_at_most_100_columns(capsys, monkeypatch, argv):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        cli.main(argv)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert not re.search(r"``|:[a-z]+:`|`", out)
    if "fit" in argv:
        assert "(default: 200)" in " ".join(out.split())
