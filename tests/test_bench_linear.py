"""The linear benchmark's pieces: the in-process measurement, ratios, tables, and one small end-to-end run."""

from __future__ import annotations

import argparse
import json

import pytest

from crossent_harness.bench import _linear_worker as worker
from crossent_harness.bench import linear as bench


def spec(method, **kw):
    base = dict(method=method, n=64, d=16, v=96, dtype="float32", device="cpu", warmup=1, repeats=2, threads=1, chunk_size=None)
    base.update(kw)
    return base


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_methods_agree_on_the_loss(dtype):
    losses = {}
    for method in ("naive", "torch_lce_512", "crossent_ce", "crossent_z_loss"):
        res = worker.measure(spec(method, dtype=dtype))
        assert len(res["times"]) == 2 and res["median"] > 0 and res["cpu_share"] > 0
        losses[method] = res["loss"]
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert abs(losses["crossent_ce"] - losses["naive"]) <= tol * abs(losses["naive"])
    assert abs(losses["torch_lce_512"] - losses["naive"]) <= tol * abs(losses["naive"])
    if dtype == "float32":  # z_loss = 1e-4 * lse^2 is below bfloat16 resolution at this loss
        assert losses["crossent_z_loss"] > losses["crossent_ce"]
    for name in ("floor", "floor_t"):
        floor = worker.measure(spec(name))
        assert floor["loss"] is None and floor["median"] > 0


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        worker.measure(spec("nope"))


def test_ratios_combine_and_markdown():
    grads = 50
    runs = {
        "floor": [{"times": [1.0, 1.2], "median": 1.2, "peak_live_bytes": 150, "grad_bytes": grads}],
        "floor_t": [{"times": [0.9, 1.0], "median": 1.0, "peak_live_bytes": 150, "grad_bytes": grads}],  # the faster floor
        "naive": [{"times": [3.0], "median": 3.0, "peak_live_bytes": 1050, "grad_bytes": grads, "rss_growth": 2**20},
                  {"times": [2.0], "median": 2.0, "peak_live_bytes": 950, "grad_bytes": grads}],
        "naive_compile": [{"times": [2.5], "median": 2.5, "rss_growth": 0, "grad_bytes": grads,
                           "memory_error": "RuntimeError: no memory events"}],
        "torch_lce_512": [{"times": [1.5, 1.7], "median": 1.7, "peak_live_bytes": 450, "grad_bytes": grads}],
        "crossent_ce": [{"times": [1.1, 1.3], "median": 1.3, "peak_live_bytes": 150, "grad_bytes": grads}],
        "crossent_z_loss": [{"times": [1.4, 1.6], "median": 1.6, "peak_live_bytes": 150, "grad_bytes": grads}],
        "cce_compile": [{"error": "ModuleNotFoundError: No module named 'cut_cross_entropy'"}],
    }
    rows = [bench._combine(m, r) for m, r in runs.items()]
    for r in rows:
        r.update(n=4, d=2, v=8, dtype="float32")
    bench._ratios(rows)
    by = {r["method"]: r for r in rows}
    assert by["naive"]["median"] == 3.0 and by["naive"]["peak_bytes"] == 1000  # median of all rounds, largest peak
    assert by["crossent_ce"]["best_peer"] == "torch_lce_512"
    assert by["crossent_ce"]["x_best_peer"] == pytest.approx(1.3 / 1.7)
    assert by["crossent_ce"]["x_floor"] == pytest.approx(1.3 / 1.0) and by["floor"]["x_floor"] == pytest.approx(1.2)
    assert by["crossent_ce"]["mem_x_naive"] == pytest.approx(0.1)
    assert by["crossent_ce"]["mem_x_best_peer"] == pytest.approx(0.25)
    assert by["crossent_z_loss"]["x_ce"] == pytest.approx(1.6 / 1.3) and "x_ce" not in by["naive"]
    # a method whose memory was not measured gets no memory figure and no ratio, never 0 or a negative one
    assert "peak_bytes" not in by["naive_compile"] and "mem_x_naive" not in by["naive_compile"]
    assert all(r.get(k, 0) >= 0 for r in rows for k in ("peak_bytes", "mem_x_naive", "mem_x_best_peer"))
    assert "error" in by["cce_compile"]
    text = bench.markdown({"results": rows})
    assert "| crossent_ce | 1.300 | 1.100-1.300 | 1.30 | 0.76 | 1.00 |" in text and "skipped" in text
    assert "| naive_compile | 2.500 | 2.500-2.500 | 2.50 | 1.47 | - | - | - | - | 0 |" in text
    assert bench.busy_fraction(0.05) is None or 0.0 <= bench.busy_fraction(0.05) <= 1.0
    assert "Fastest peer: `torch_lce_512`" in text and "the CPU allocator's events" in text
    assert "memory not measured, naive_compile" in bench._table(rows)


def timed(method, times):
    return bench._combine(method, [{"times": list(times), "median": sorted(times)[len(times) // 2]}])


def test_ratios_within_the_noise_are_not_ranked():
    # Found with `make demo` under a little load: z-loss printed 0.70x CE and CE 1.05x PyTorch's chunked
    # path, differences that the spread of the repeats did not support. Synthetic timings here.
    rows = [timed("floor", [0.50, 0.52, 0.55]),
            timed("torch_lce_512", [1.00, 1.04, 1.30]),
            timed("crossent_ce", [0.98, 1.05, 1.25]),  # 1.05 / 1.04: inside the peer's range
            timed("crossent_z_loss", [0.60, 0.74, 1.00]),  # 0.70x CE by the medians, but the ranges overlap
            timed("crossent_focal", [1.40, 1.45, 1.50])]  # slower than CE, outside its range
    for r in rows:
        r.update(n=4, d=2, v=8, dtype="float32")
    bench._ratios(rows)
    by = {r["method"]: r for r in rows}
    assert by["crossent_ce"]["min"] == 0.98 and by["crossent_ce"]["max"] == 1.25
    assert by["crossent_ce"]["noise"] == ["x_best_peer"]  # against itself x_ce is exactly 1, not noise
    assert by["crossent_z_loss"]["noise"] == ["x_best_peer", "x_ce"]
    assert by["crossent_focal"]["noise"] == [] and by["crossent_z_loss"]["x_ce"] == pytest.approx(0.74 / 1.05)
    text = bench.markdown({"results": rows})
    # median, its range, then x floor, x peer, x ce: the ratios inside the noise read ~1.0
    assert "| crossent_ce | 1.050 | 0.980-1.250 | 2.02 | ~1.0 | 1.00 |" in text
    assert "| crossent_z_loss | 0.740 | 0.600-1.000 | 1.42 | ~1.0 | ~1.0 |" in text
    assert "| crossent_focal | 1.450 | 1.400-1.500 | 2.79 | 1.39 | 1.38 |" in text
    assert "~1.0: the two methods' ranges of timings (min-max s) overlap" in text
    table = bench._table(rows)
    line = next(line for line in table.splitlines() if line.startswith("crossent_z_loss"))
    assert line.split()[:6] == ["crossent_z_loss", "0.740", "0.600-1.000", "1.42", "~1.0", "~1.0"]
    assert "within the noise of this measurement" in " ".join(table.split()) and "--repeats 3" not in table
    one = [timed("floor", [0.5]), timed("crossent_ce", [1.0])]
    bench._ratios(one)
    assert "One timing per method measures no spread" in bench._table(one)


def test_no_ratio_against_a_zero_reference():
    rows = [{"method": "naive", "median": 1.0, "peak_bytes": 0}, {"method": "crossent_ce", "median": 1.0, "peak_bytes": 5}]
    bench._ratios(rows)
    assert "mem_x_naive" not in rows[1]


def test_worker_measures_exact_memory():
    n, d, v = 64, 16, 96
    res = {m: worker.measure(spec(m)) for m in ("naive", "crossent_ce", "floor", "torch_lce_512")}
    grads = (n * d + v * d) * 4
    for r in res.values():
        assert r["grad_bytes"] == grads and r["memory_source"] == "cpu allocator" and r["rss_growth"] >= 0
    # the naive path holds at least the logits and their gradient beyond the parameter gradients
    assert res["naive"]["peak_live_bytes"] >= grads + 2 * n * v * 4
    assert grads <= res["crossent_ce"]["peak_live_bytes"] < res["naive"]["peak_live_bytes"]
    assert res["floor"]["peak_live_bytes"] >= n * v * 4 + grads  # z and the two gradient-sized products
    # PyTorch's fused operator computes a chunk of logits inside its kernel: counted too
    assert res["torch_lce_512"]["peak_live_bytes"] >= grads + n * v * 4


def test_allocator_accounting_agrees_with_the_dispatch_recorder():
    # Two independent exact accountings of a computation made of ATen operators only
    import torch

    import crossent as xe
    from crossent_harness.bench.memory import LiveBytes, allocator_peak

    g = torch.Generator().manual_seed(0)
    e = torch.randn(48, 8, generator=g).requires_grad_()
    c = torch.randn(300, 8, generator=g).requires_grad_()
    t = torch.randint(0, 300, (48,), generator=g)

    def step():
        e.grad = c.grad = None
        xe.linear_cross_entropy(e, c, t, chunk_size=16).backward()

    step()
    with LiveBytes() as rec:
        step()
    e.grad = c.grad = None
    assert rec.opaque == set()
    assert abs(allocator_peak(step) - rec.peak) <= 64  # a few wrapped Python scalars at most


def test_check_args():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.check_args(parser.parse_args([]))
    for argv, phrase in ((["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup"),
                         (["--quiet-wait", "-1"], "--quiet-wait"),
                         (["--shape", "1", "2", "0", "float32"], "V must be"), (["--timeout", "0"], "--timeout")):
        with pytest.raises(ValueError, match=phrase):
            bench.check_args(parser.parse_args(argv))


@pytest.mark.slow
def test_run_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shape", "64", "16", "96", "float32", "--methods", "floor", "crossent_focal",
                              "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    result = bench.run(args)
    assert {r["method"] for r in result["results"]} == {"floor", "crossent_focal"}
    assert all("median" in r for r in result["results"]), result["results"]
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert saved["meta"]["threads"] == 1 and len(saved["meta"]["loadavg_start"]) == 3
    assert saved["meta"]["cpu"] and "commit" in saved["meta"]
    assert all(r["min"] <= r["median"] <= r["max"] for r in saved["results"])
    assert (tmp_path / "linear.md").exists() and (tmp_path / "linear.png").stat().st_size > 0
    assert all(r["peak_bytes"] >= 0 and r["rss_growth"] >= 0 for r in result["results"])


def test_loss_against_ce_benchmark_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear_losses.py"
    spec = importlib.util.spec_from_file_location("bench_linear_losses", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--shape", "32", "8", "50", "--repeats", "2"])
    assert set(out["medians"]) == {"ce", "focal", "z_loss", "label_smoothing"}
    assert all(len(ts) == 2 and min(ts) > 0 for ts in out["times"].values())


def test_precision_benchmark_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear_precision.py"
    spec = importlib.util.spec_from_file_location("bench_linear_precision", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tokens", "64", "--vocab", "40", "--hidden", "8", "--chunk-size", "16"])
    row = out[64]
    assert set(row) == {"float32 accumulator", "bfloat16 accumulator", "naive path", "exact, rounded"}
    # Every bfloat16 gradient is at least as far from exact as the exact result rounded once.
    assert all(0 < err[0] < 0.05 for err in row.values())
