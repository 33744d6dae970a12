"""The public surface: what ``import crossent`` costs and exposes, and docs that agree with the code.

* ``import crossent`` does not import ``torch._dynamo`` (about a second and 150 MiB) or optional extras.
* Every public module has an ``__all__`` whose names resolve; implementation modules are underscored.
* The loss tables of the README and docs list exactly the registry, with the right streamability and,
  in docs/losses.md, the constructor's defaults.
* Every ``python`` code block of the README and docs/ runs, and every ``crossent`` command of their shell
  blocks is one the command accepts.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent as xe

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = [
    "crossent",
    "crossent.contrastive",
    "crossent.policy",
    "crossent.preference",
    "crossent.nn",
    "crossent.sets",
    "crossent.losses",
    "crossent.stats",
    "crossent.transforms",
    "crossent.targets",
    "crossent.weighting",
    "crossent.calibration",
    "crossent.distributed",
    "crossent.adversarial",
    "crossent.scaling",
    "crossent.integrations",
    "crossent.integrations.transformers",
]
#: Public subpackages and modules reachable as attributes; anything else must be underscored.
ALLOWED_SUBMODULES = {m.rsplit(".", 1)[-1] for m in PUBLIC_MODULES}


def _import_in_fresh_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_does_not_pull_in_dynamo_or_extras():
    modules = ", ".join(repr(m) for m in PUBLIC_MODULES)
    code = (
        "import importlib, sys\n"
        f"for m in [{modules}]: importlib.import_module(m)\n"
        "heavy = ['torch._dynamo', 'torch._inductor', 'triton', 'transformers', 'matplotlib', 'sklearn']\n"
        "print(','.join(h for h in heavy if h in sys.modules))"
    )
    assert _import_in_fresh_process(code) == ""


def test_first_backward_does_not_pull_in_sympy():
    # torch.autograd.grad with a tensor grad_outputs imports torch.fx.experimental.symbolic_shapes, and
    # with it SymPy and mpmath: 34 MiB of resident memory added to a process's first step. The engines'
    # backward passes (fused, whole-row, dense, dense under create_graph) take the gradient without one.
    code = (
        "import sys, torch, crossent as xe\n"
        "e, c = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)\n"
        "t = torch.tensor([0, 1, 2, 3, 4, 5, 9, -100])\n"
        "recompute = xe.LinearCrossEntropyOptions(mode='recompute')\n"
        "for loss in ('ce', 'focal', 'nfl'):\n"
        "    xe.linear_cross_entropy(e, c, t, loss=loss).backward()\n"
        "    xe.linear_cross_entropy(e, c, t, loss=loss, options=recompute).backward()\n"
        "    xe.cross_entropy(e @ c.T, t, loss=loss).backward()\n"
        "z = (e @ c.T).detach().requires_grad_()\n"
        "(g,) = torch.autograd.grad(xe.cross_entropy(z, t), z, create_graph=True)\n"
        "g.square().sum().backward()\n"
        "print(','.join(m for m in ('torch.fx.experimental.symbolic_shapes', 'sympy') if m in sys.modules))"
    )
    assert _import_in_fresh_process(code) == ""


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_declare_all(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for item in module.__all__:
        assert hasattr(module, item), f"{name}.__all__ names {item!r}, which does not exist"


@pytest.mark.parametrize("name", ["crossent", "crossent.losses", "crossent.weighting"])
def test_implementation_modules_are_underscored(name):
    module = importlib.import_module(name)
    for attr in dir(module):
        value = getattr(module, attr)
        if inspect.ismodule(value) and value.__name__.startswith("crossent") and not attr.startswith("_"):
            assert attr in ALLOWED_SUBMODULES, f"{name}.{attr} is an implementation module without an underscore"


def test_no_engine_tests_the_type_of_a_loss_statistic_or_transform():
    """Engines read declared structure (Plan.structure), never the classes of the parts."""
    forbidden = re.compile(r"isinstance\([^)]*,\s*\(?\s*(Temperature|ClassBias|Softcap|LogSumExp|TargetLogit|Sum|SoftDot|"
                           r"SumSquares|CrossEntropy|ZLoss|Loss|Statistic|Transform)\b")  # fmt: skip
    for path in (ROOT / "src/crossent/_engine").rglob("*.py"):
        assert not forbidden.search(path.read_text()), path


# -- loss tables -------------------------------------------------------------------------------------------------


def _table_rows(path: Path, heading: str | None = None):
    """``(names, cells)`` per row of the first markdown table (after ``heading``) whose header starts with ``name``."""
    text = path.read_text()
    if heading is not None:
        text = text[text.index(heading) :]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([a-z0-9_]+)`", cells[0])
        rows.append((names, dict(zip(header, cells))))
    return rows


def test_readme_loss_table_is_the_registry():
    rows = _table_rows(ROOT / "README.md", "## Losses")
    listed = [n for names, _ in rows for n in names]
    assert sorted(listed) == xe.losses.available()
    for names, cells in rows:
        for n in names:
            streams = cells["streams"]
            default = _instance(n)
            if streams == "yes" or streams.startswith("yes"):
                assert default.streamable, n
            elif streams == "no":
                assert not default.streamable, n


def _instance(name):
    if name in ("forward_correction", "backward_correction"):
        return xe.losses.get(name, T=torch.eye(3))
    return xe.losses.get(name)


def test_docs_loss_tables_are_the_registry():
    streamed = _table_rows(ROOT / "docs/losses.md")
    whole = _table_rows(ROOT / "docs/losses_whole_row.md")
    listed = [n for names, _ in streamed + whole for n in names]
    weighting = (ROOT / "docs/weighting.md").read_text()
    elsewhere = [n for n in xe.losses.available() if f"`{n}`" in weighting and n not in listed]
    assert sorted(listed + elsewhere) == xe.losses.available()
    for names, _ in whole:
        for n in names:
            assert not _instance(n).streamable, n


def _documented_defaults(cell: str) -> dict:
    out = {}
    for key, value in re.findall(r"`([A-Za-z_]+)=([^`]*)`", cell):
        out[key] = value
    return out


def _same_default(documented: str, actual) -> bool:
    try:
        value = eval(documented, {"log": math.log, "inf": math.inf, "None": None})  # noqa: S307 - doc text we wrote
    except Exception:
        return str(actual) == documented.strip("'\"")
    if isinstance(actual, float) or isinstance(value, float):
        return actual is not None and value is not None and math.isclose(float(value), float(actual), rel_tol=1e-9)
    return value == actual


def test_docs_hyperparameter_defaults_match_the_constructors():
    for names, cells in _table_rows(ROOT / "docs/losses.md"):
        documented = _documented_defaults(cells["hyperparameters (defaults)"])
        for n in names:
            params = inspect.signature(xe.losses.registered()[n]).parameters
            for key, value in documented.items():
                assert key in params, f"docs/losses.md: {n} has no hyperparameter {key}"
                assert _same_default(value, params[key].default), f"docs/losses.md: {n}.{key} = {value}, code: {params[key].default!r}"
            required = [k for k, p in params.items() if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            assert not required, f"{n} requires {required} but docs/losses.md lists defaults only"


# -- code blocks ---------------------------------------------------------------------------------------------------


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_docs_code_blocks_run(path):
    """The ``python`` blocks of one document run in order in one namespace, as a reader would paste them."""
    text = path.read_text()
    namespace = {"__name__": f"docs_{path.stem}"}
    torch.manual_seed(0)
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        line = text[: match.start()].count("\n") + 2
        exec(compile(match.group(1), f"{path.name}:{line}", "exec"), namespace)  # noqa: S102 - our own docs


def _shell_commands(text: str):
    """``(line, argv)`` of every ``crossent`` command in the shell blocks of a Markdown text (continued
    lines joined, comments dropped)."""
    for match in re.finditer(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        first = text[: match.start()].count("\n") + 2
        command, start = "", first
        for i, line in enumerate(match.group(1).splitlines()):
            if not command:
                start = first + i
            command += line.removesuffix("\\") + " "
            if line.endswith("\\"):
                continue
            argv = shlex.split(command.strip().removeprefix("$ "), comments=True)
            command = ""
            if argv[:1] == ["crossent"]:
                yield start, argv[1:]


SHELL_DOCS = [*DOCS, ROOT / "BENCHMARKS.md"]


@pytest.mark.parametrize("path", SHELL_DOCS, ids=[p.name for p in SHELL_DOCS])
def test_docs_crossent_commands_are_accepted(path, tmp_path, monkeypatch, capsys):
    """Every ``crossent`` command of a document's shell blocks passes the command's checks: ``compare`` and
    ``bench`` with ``--dry-run`` (no data loaded, nothing trained), ``losses`` for real. A documented
    command that the command refuses (``--noise symmetric`` once) fails here."""
    from crossent_harness import cli

    monkeypatch.chdir(tmp_path)  # a relative --out lands here, never in the repository
    for line, argv in _shell_commands(path.read_text()):
        command = cli.build_parser().parse_known_args(argv)[0].command
        code = cli.main(argv + ([] if command == "losses" else ["--dry-run"]))
        out, err = capsys.readouterr()
        assert code == 0 and out, f"{path.name}:{line}: crossent {shlex.join(argv)}\n{err}"


def test_the_shell_blocks_hold_the_documented_commands():
    readme = [argv for _, argv in _shell_commands((ROOT / "README.md").read_text())]
    assert ["losses"] in readme and ["bench"] in readme and sum(a[0] == "compare" for a in readme) >= 2
    results = list(_shell_commands((ROOT / "docs/results.md").read_text()))
    assert len(results) >= 10 and all(argv[0] in ("compare", "scaling") for _, argv in results)

