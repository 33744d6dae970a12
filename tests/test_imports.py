"""The import graph of ``src/``: no cycles, no arrow from the library to the harness, and no module
taking another's underscored names.

The graph is read statically: ``ast`` over every ``.py`` file under ``src/``, nothing imported. Its
nodes are modules (a package is its ``__init__.py``, named by the package); its edges are every
``import`` and ``from ... import`` statement of a file, wherever it stands: at the top, inside a
function (a lazy import), under ``if TYPE_CHECKING`` or in a ``try``. A lazy import counts: it runs
later, but a cycle through it is still an arrow back up, and it is one call away from an import-time
cycle. Imports spelled as strings (``importlib.import_module``) are not seen. Only modules under
``src/`` are nodes; everything else (torch, the standard library) is left out.

An import statement gives these edges, from the importing module:

* ``import a.b.c`` and ``from a.b.c import name``: to ``a.b.c``; ``from a.b import c`` where ``c`` is
  a submodule: to ``a.b.c``, else (a name that ``a/b/__init__.py`` defines or re-exports) to ``a.b``.
* Importing a module first runs its packages' ``__init__``: ``import a.b.c`` also reaches ``a`` and
  ``a.b``, except the packages that contain the importer, whose ``__init__`` is already running (a
  package importing its own submodules, ``from . import x`` in ``__init__.py``, is the normal way down,
  not an arrow back up).
* So a submodule that reads a name off its own package (``from . import name``, ``name`` not a
  submodule) depends on that ``__init__``: when the ``__init__`` imports the submodule, that is a cycle.
  A submodule imports from the sibling that defines the name.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = "crossent"
#: Every module under ``src/`` outside the ``crossent`` package is the harness (``crossent_harness``:
#: the ``crossent`` command, the benchmarks, the experiments).


def _module_files(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _packages_of(module: str, modules) -> list[str]:
    """The packages that contain ``module``, outermost first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules]


def _source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` statement of ``module`` reads from, its dots resolved."""
    if not node.level:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]  # a package is its own
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(node: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    """The modules under ``src/`` that one import statement of ``module`` names (before parent packages)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    source = _source(node, module, is_package)
    found = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in modules:
            found.add(submodule)
        elif source in modules:
            found.add(source)
    return found


def _imports(root: Path):
    """``(module, is_package, statement)`` for every import statement of every module under ``root``."""
    modules = _module_files(root)
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield module, is_package, node


@functools.lru_cache(maxsize=None)
def import_graph(root: Path = SRC) -> dict[str, frozenset[str]]:
    """Each module under ``root`` and the modules under ``root`` it imports (rules in the docstring)."""
    modules = _module_files(root)
    edges = {module: set() for module in modules}
    for module, is_package, node in _imports(root):
        own = set(_packages_of(module, modules)) | ({module} if is_package else set())
        for target in _imported(node, module, is_package, modules):
            edges[module].add(target)
            edges[module].update(p for p in _packages_of(target, modules) if p not in own)
    return {module: frozenset(targets - {module}) for module, targets in edges.items()}


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _a_cycle(graph, component) -> list[str]:
    """The shortest cycle through the first module of a strongly connected component (breadth first)."""
    members, start = set(component), component[0]
    parent, queue = {start: None}, [start]
    for v in queue:
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not strongly connected")


def import_cycles(root: Path = SRC) -> dict[frozenset[str], str]:
    """Each import cycle under ``root`` (a strongly connected component of more than one module), as
    its modules and one cycle through them spelled out."""
    graph = import_graph(root)
    return {
        frozenset(c): f"{', '.join(c)}: {' -> '.join(_a_cycle(graph, c))}" for c in _strongly_connected(graph)
    }


def private_imports(root: Path = SRC) -> list[str]:
    """``module: from source import _name`` for each underscored name (not a submodule) that a module
    takes from another module under ``root``."""
    modules = _module_files(root)
    found = []
    for module, is_package, node in _imports(root):
        if isinstance(node, ast.ImportFrom):
            source = _source(node, module, is_package)
            for alias in node.names:
                if source in modules and alias.name.startswith("_") and f"{source}.{alias.name}" not in modules:
                    found.append(f"{module}: from {source} import {alias.name}")
    return sorted(found)


def _is_harness(module: str) -> bool:
    return not _within(module, LIBRARY)


def test_no_import_cycles():
    """No module under ``src/`` reaches itself through imports (lazy ones included)."""
    cycles = import_cycles()
    assert not cycles, "import cycles (modules: one cycle):\n" + "\n".join(sorted(cycles.values()))


def test_library_does_not_import_the_harness():
    """The library (``src/crossent``) never imports the harness (the command, benchmarks, experiments)."""
    arrows = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if not _is_harness(module)
        for target in targets
        if _is_harness(target)
    )
    assert not arrows, "library modules import the harness:\n" + "\n".join(arrows)


def test_private_names_stay_in_their_module():
    """No module takes another module's underscored names: what two modules share is public in one of them
    (an entry point's helpers that another entry point needs belong to the call path they share)."""
    found = private_imports()
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_graph_of_this_tree():
    """Relative, absolute, lazy and package-level imports of ``src/`` all become edges."""
    graph = import_graph()
    assert "crossent._validation" in graph["crossent._linear_call"]  # from . import _validation as V
    assert "crossent._engine.plan" in graph["crossent._engine.chunked"]  # from ..plan import Plan
    assert "crossent._engine" in graph["crossent._linear_call"]  # importing _engine.plan runs _engine/__init__
    assert "crossent.distributed" in graph["crossent._linear"]  # a lazy import, inside a function
    assert "crossent.losses" in graph["crossent.nn"]  # a name that a package __init__ re-exports
    assert "crossent._functional" in graph["crossent"]  # a package __init__ importing its submodule...
    assert "crossent" not in graph["crossent._functional"]  # ...which does not import it back


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_rules_on_a_small_tree(tmp_path):
    """Each rule of the module docstring, on a tree made for it: the checks fail where they should."""
    root = _write(tmp_path, {
        "lib/__init__.py": "from . import api\nfrom .api import run\nVERSION = 1\n",
        "lib/api.py": "from ._core import step\n\ndef run():\n    from .tool import main  # lazy\n",
        "lib/_core.py": "from ._inner.deep import thing\nfrom ._helpers import _hidden\n",
        "lib/_helpers.py": "_hidden = 1\n",
        "lib/_inner/__init__.py": "from lib import VERSION  # reads a name off the top package\n",
        "lib/_inner/deep.py": "import lib._helpers\n",
        "lib/tool.py": "from .api import run\n",
        "harness/cli.py": "import lib\n",
    })  # fmt: skip
    graph = import_graph(root)
    assert graph["lib"] == {"lib.api"}  # its own submodule, twice; no edge for VERSION
    assert graph["lib.api"] == {"lib._core", "lib.tool"}  # the lazy import counts
    assert graph["lib._core"] == {"lib._inner.deep", "lib._inner", "lib._helpers"}  # deep runs _inner/__init__
    assert graph["lib._inner.deep"] == {"lib._helpers"}  # lib is its own package: no edge up
    assert graph["lib._inner"] == {"lib"}  # a name of the top package's __init__: an arrow up
    cycles = import_cycles(root)
    assert set(cycles) == {frozenset({"lib", "lib.api", "lib._core", "lib._inner", "lib.tool"})}
    cycle = next(iter(cycles.values())).split(": ")[1].split(" -> ")
    assert cycle[0] == cycle[-1] == "lib" and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
    assert private_imports(root) == ["lib._core: from lib._helpers import _hidden"]
    assert _is_harness("crossent_harness.cli") and _is_harness("crossent_harness.bench.linear")
    assert not _is_harness("crossent") and not _is_harness("crossent.losses._base")
    assert not _is_harness("crossent.benchmarks_of_a_library_module")
