"""Small stand-ins for the optional datasets, written where a test asks (its ``tmp_path``).

Tests never depend on the real files being installed or absent: they point ``CROSSENT_FASHION_MNIST``
or ``CROSSENT_MLBENCH_DIR`` at a folder these functions filled, or at an empty one.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest


def write_idx(path: Path, array) -> None:
    """One gzipped IDX file, as Fashion-MNIST ships them."""
    import numpy as np

    a = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + a.tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 6, n_test: int = 2):
    """Fashion-MNIST's four IDX files with random 28x28 images; returns the training images."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:n_test])
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) + 5) % 10)
    return images


def write_vowel(folder: Path) -> None:
    """mlbench's ``Vowel.rda`` as the R package lays it out (speaker factor V1, nine features, 11 vowels), one
    row per speaker and vowel; skips the test where ``rdata`` cannot write R files."""
    import numpy as np

    rdata = pytest.importorskip("rdata", reason="the mlbench datasets need the rdata package")
    if not hasattr(rdata, "write_rda"):
        pytest.skip("this rdata cannot write .rda files (rdata >= 0.11 can)")
    import pandas as pd

    speakers, vowels = 15, [f"v{k:02d}" for k in range(11)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "V1": pd.Categorical([str(s) for s in range(speakers) for _ in vowels], categories=[str(s) for s in range(speakers)]),
        **{f"V{k}": rng.normal(size=speakers * len(vowels)) for k in range(2, 11)},
        "Class": pd.Categorical([v for _ in range(speakers) for v in vowels], categories=vowels),
    })  # fmt: skip
    rdata.write_rda(folder / "Vowel.rda", {"Vowel": frame})
