"""What the harness writes down beside its figures: strict JSON, and where a figure came from.

Every JSON file of the harness (``results.json`` of ``crossent compare``, ``linear.json`` of ``crossent
bench``) is strict JSON, which any parser reads: a value that is not a finite number (an empty
reliability bin, the NLL of a run that diverged) is written as ``null``, never as ``NaN`` or ``Infinity``.

:func:`provenance` records what a figure depends on beyond its command line: the commit of the source
tree, the versions of torch and Python, the CPU with the vector instructions torch's kernels use on
it, and the number of threads.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path


def finite_or_none(value):
    """``value`` with every float that is not finite replaced by ``None``, through dicts, lists and tuples.

    >>> finite_or_none({"nll": float("inf"), "bins": [0.5, float("nan")], "n": 3})
    {'nll': None, 'bins': [0.5, None], 'n': 3}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` that never writes ``NaN`` or ``Infinity``: non-finite floats become ``null``.

    >>> strict_json({"imbalance": float("inf"), "acc": 0.5})
    '{"imbalance": null, "acc": 0.5}'
    """
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_commit() -> dict | None:
    """``{"commit", "dirty"}`` of the git tree that holds the imported ``crossent``; ``None`` outside one
    (an installed wheel, or no ``git``). ``dirty``: tracked files differ from the commit."""
    import crossent

    root = Path(crossent.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], root)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"commit": commit, "dirty": bool(status)}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def provenance(threads: int | None = None) -> dict:
    """What a result depends on beyond its command: source commit, torch, Python, CPU, threads.

    ``cpu_capability`` is the instruction set torch's CPU kernels dispatch to (``AVX2``, ``AVX512``, ...):
    two CPUs with different ones sum in different orders.

    ``threads`` is the number of intra-op threads the runs used (default: torch's current setting).
    """
    import torch

    import crossent

    source = source_commit()
    return {
        "commit": source and source["commit"],
        "dirty": source and source["dirty"],
        "crossent": getattr(crossent, "__version__", None),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
    }


def describe(record: dict | None) -> str:
    """One line for a page: ``commit 1a2b3c4, torch 2.13.0, Intel Xeon ... (AVX512), 1 thread``.

    >>> describe({"commit": "1a2b3c4d5e6f", "dirty": False, "torch": "2.13.0", "cpu": "Xeon",
    ...           "cpu_capability": "AVX512", "threads": 1})
    'commit 1a2b3c4, torch 2.13.0, Xeon (AVX512), 1 thread'
    >>> describe(None)
    'no provenance recorded'
    """
    if not record:
        return "no provenance recorded"
    commit = record.get("commit")
    parts = [f"commit {commit[:7]}" + (" with local changes" if record.get("dirty") else "") if commit
             else "outside a git tree"]
    cpu = record.get("cpu") or "unknown CPU"
    if record.get("cpu_capability"):
        cpu += f" ({record['cpu_capability']})"
    parts += [f"torch {record['torch']}", cpu]
    threads = record.get("threads")
    if threads is not None:
        parts.append(f"{threads} thread{'s' * (threads != 1)}")
    return ", ".join(parts)
