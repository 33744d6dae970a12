"""Every Python block of docs/weighting.md runs, and each ``print(...)  # -> value`` prints that value."""

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "weighting.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_an_example_per_strategy():
    text = "\n".join(BLOCKS)
    for name in ("ClassBalanced", "LogitAdjustment", "LossReweighting", "DoReMi", "ForwardCorrection",
                 "backward_correction", "estimate_transition_matrix", "RENT", "DirichletWeightSampling",
                 "MixCEWeights", "BiasLossWeights", "bias_loss_weights"):
        assert name in text, name


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs(index):
    code = BLOCKS[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"weighting.md block {index}", "exec"), {})
    printed = [line for line in out.getvalue().splitlines() if line]
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    assert len(printed) >= len(prints)
    for line, got in zip(prints, printed):
        match = re.search(r"# -> (.+?)(?:  \(.*\))?$", line)
        if match:
            assert got == match.group(1), (line, got)
