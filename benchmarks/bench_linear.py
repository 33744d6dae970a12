"""Fused linear cross-entropy: speed and memory against the naive path and its peers.

    python benchmarks/bench_linear.py            # quick (about a minute)
    python benchmarks/bench_linear.py --full     # the shapes recorded in BENCHMARKS.md

See ``crossent_harness.bench.linear`` for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from crossent_harness.bench.linear import main  # noqa: E402

if __name__ == "__main__":
    main()
