"""Run many test cases on a few gloo processes, with deadlines, so that a hang fails fast.

Starting a process costs seconds (an interpreter and torch), so one launch runs every case of a world
size and reports each case's outcome; the tests then read their case's outcome. The processes are
forked from the test process (torch is already imported) and run one intra-op thread each. Every
collective times out after ``gloo_timeout`` seconds and the launch as a whole after ``timeout``, so a
rank left waiting by another fails the test instead of stalling the suite. With
``CROSSENT_GLOO_TIMES=1`` each case's time on every rank is printed (``pytest -s``).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world: int, tmp: str, cases: dict, gloo_timeout: float) -> None:
    torch.set_num_threads(1)
    outcome: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=gloo_timeout),
        )  # fmt: skip
        for name, case in cases.items():
            start = time.perf_counter()
            try:
                case(rank, world)
                outcome[name] = (None, time.perf_counter() - start)
            except BaseException:  # noqa: BLE001 (reported to the test process)
                outcome[name] = (traceback.format_exc(), time.perf_counter() - start)
        dist.destroy_process_group()
    finally:
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(outcome, f)


def run_cases(world: int, cases: dict, *, timeout: float = 120.0, gloo_timeout: float = 20.0) -> dict:
    """Run ``cases`` (name -> ``case(rank, world)``) on ``world`` gloo ranks, in order, in one launch.

    Returns ``{name: [error or None per rank]}``; a rank that never reported (hung or crashed)
    reports the same message for every case.
    """
    context = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [context.Process(target=_child, args=(r, world, tmp, cases, gloo_timeout)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outcomes = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes.append(pickle.load(f))
            else:
                outcomes.append({})
    if os.environ.get("CROSSENT_GLOO_TIMES"):
        for name in cases:
            print(name, [round(o[name][1], 2) for o in outcomes if name in o])
    results = {}
    for name in cases:
        per_rank = []
        for r in range(world):
            if name in outcomes[r]:
                per_rank.append(outcomes[r][name][0])
            elif r in hung:
                per_rank.append(f"rank {r} did not finish within {timeout} s")
            else:
                per_rank.append(f"rank {r} exited (code {procs[r].exitcode}) before this case")
        results[name] = per_rank
    return results


def check(results: dict, name: str) -> None:
    """Fail with every rank's traceback unless case ``name`` passed on every rank."""
    errors = [f"--- rank {r} ---\n{e}" for r, e in enumerate(results[name]) if e is not None]
    if errors:
        raise AssertionError(f"case {name!r} failed:\n" + "\n".join(errors))
