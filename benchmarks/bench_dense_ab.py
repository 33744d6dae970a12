"""Dense path before and after a change: ``crossent.cross_entropy`` forward + backward from two source trees.

Each measurement is a fresh process (so the two trees never share a module cache) that times the
median of ``--repeats`` CE steps on float32 logits ``[8192, C]``; the trees alternate within every
round, and the table reports each tree's median over the rounds.

    git archive <commit> src | tar -x -C /tmp/baseline
    OMP_NUM_THREADS=1 python benchmarks/bench_dense_ab.py --baseline /tmp/baseline/src --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import statistics, sys, time, torch
import crossent as xe
c, reps = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
logits, target = torch.randn(8192, c, generator=g), torch.randint(0, c, (8192,), generator=g)
def step():
    x = logits.detach().requires_grad_()
    start = time.perf_counter()
    xe.cross_entropy(x, target).backward()
    return time.perf_counter() - start
step()
print(statistics.median(step() for _ in range(reps)))
"""


def measure(src: str, classes: int, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", WORKER, str(classes), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the src/ directory of the baseline tree")
    parser.add_argument("--current", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 32000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{'C':>7} {'baseline s':>11} {'current s':>10} {'ratio':>6}")
    for c in args.classes:
        base, cur = [], []
        for r in range(args.rounds):
            order = [(args.baseline, base), (args.current, cur)]
            for src, out in order if r % 2 == 0 else order[::-1]:
                out.append(measure(src, c, args.repeats))
        b, n = statistics.median(base), statistics.median(cur)
        print(f"{c:>7} {b:>11.4f} {n:>10.4f} {n / b:>6.2f}")


if __name__ == "__main__":
    main()
