"""Offline classification datasets for the harness, as float32 / int64 tensors.

Every loader reads data that an ordinary package install puts on disk; none downloads at run time.
A missing source raises :class:`MissingDataError` saying how to install it.

======================  ==============================================  ======================
name                    source                                          split
======================  ==============================================  ======================
``digits``              scikit-learn's bundled copy                     stratified 70/30, seed 0
``mnist1d``             pip ``mnist1d``, generated (never downloaded)   the paper's 4000/1000
``fashion-mnist``       Debian ``dataset-fashion-mnist`` (IDX files)    the official 60k/10k
``letter``              Debian ``r-cran-mlbench`` + pip ``rdata``       first 16000 / last 4000
``vowel``               same                                            speakers 0-7 / 8-14
``shuttle``             same                                            stratified 75/25, seed 0
``satellite``           same                                            stratified 75/25, seed 0
======================  ==============================================  ======================

Where the files are looked up, in order (the first folder holding them wins):

* Fashion-MNIST: ``$CROSSENT_FASHION_MNIST`` alone when it is set; else ``/usr/share/datasets/fashion-mnist``.
* mlbench's ``.rda`` files: ``$CROSSENT_MLBENCH_DIR`` alone when it is set; else
  ``/usr/lib/R/site-library/mlbench/data``, then the copy that ``make data`` unpacks under
  :func:`cache_dir` (``$XDG_CACHE_HOME/crossent/mlbench/usr/lib/R/site-library/mlbench/data``).

A variable that is set is the only place looked in, so that a location given explicitly is never
passed over for another copy, and so that pointing both at an empty folder hides every installed copy
(as CI does). :data:`PROFILES` says what each dataset is without reading it, so that options are
checked before any data is.
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

#: where Debian's packages put the files (dataset-fashion-mnist; r-cran-mlbench, relative to its root)
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
MLBENCH_SUBDIR = "usr/lib/R/site-library/mlbench/data"

# Letter pair-swap noise of the LDR-KL paper (B<->D C<->G E<->F H<->N I<->L K<->X M<->W O<->Q P<->R U<->V).
LETTER_PAIRS = ("BD", "CG", "EF", "HN", "IL", "KX", "MW", "OQ", "PR", "UV")


class MissingDataError(RuntimeError):
    """A dataset's source is not installed; the message says how to install it."""


@dataclass
class Dataset:
    """A train/test split. ``kind`` is ``"tabular"``, ``"signal"`` (1-D sequence) or ``"image"``."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    kind: str = "tabular"
    class_names: list[str] = field(default_factory=list)
    #: class pairs of the published class-dependent noise (Letter, Vowel); ``None`` where none is published.
    pairs: list[tuple[int, int]] | None = None
    #: how the loader scaled the features: ``"standard"`` (train mean 0, std 1), ``"unit"`` (pixels in
    #: [0, 1]), ``"minmax"`` (train range to [-1, 1]) or ``"none"``.
    scaling: str = "standard"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"classes={self.num_classes}, kind={self.kind!r})"
        )


def available() -> list[str]:
    return sorted(_LOADERS)


def canonical_name(name: str) -> str:
    """The registered spelling of ``name`` (``Fashion_MNIST`` -> ``fashion-mnist``); ValueError if unknown."""
    key = name.lower().replace("_", "-")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return key


def load(name: str, **kwargs) -> Dataset:
    """Load a dataset by name (see the module docstring)."""
    return _LOADERS[canonical_name(name)](**kwargs)


def _stratified_split(y, test_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDataError(
            f"this dataset needs the Python package {module!r}: pip install {extra} "
            f"(or pip install 'crossent[data]')"
        ) from None


# -- scikit-learn ----------------------------------------------------------------------------------
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes), pixels scaled to [0, 1]."""
    datasets = _need("sklearn.datasets", "scikit-learn")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = _stratified_split(y, 0.3, seed=0)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, "tabular", [str(i) for i in range(10)], scaling="unit")


# -- MNIST-1D --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _mnist1d_arrays():
    data = _need("mnist1d.data", "mnist1d")
    # make_dataset regenerates the paper's data procedurally; get_dataset() would download first.
    return data.make_dataset(data.get_dataset_args())


def load_mnist1d() -> Dataset:
    """MNIST-1D (Greydanus & Kobak 2020): 4000 / 1000 signals of length 40, 10 classes."""
    d = _mnist1d_arrays()
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Dataset(
        "mnist1d", as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]), 10, "signal",
        [str(i) for i in range(10)], scaling="none",
    )


# -- Fashion-MNIST (IDX files) ---------------------------------------------------------------------
FASHION_CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def _read_idx(path: Path) -> Tensor:
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())


def cache_dir() -> Path:
    """crossent's cache folder: ``$XDG_CACHE_HOME/crossent``, or ``~/.cache/crossent`` without the variable."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "crossent"


def fashion_mnist_dirs() -> list[Path]:
    """The folders searched for Fashion-MNIST's IDX files, in order (see the module docstring)."""
    return _search_path("CROSSENT_FASHION_MNIST", [Path(FASHION_SYSTEM_DIR)])


def mlbench_dirs() -> list[Path]:
    """The folders searched for mlbench's ``.rda`` files, in order (see the module docstring)."""
    return _search_path("CROSSENT_MLBENCH_DIR", [Path("/") / MLBENCH_SUBDIR, cache_dir() / "mlbench" / MLBENCH_SUBDIR])


def _search_path(variable: str, defaults: list[Path]) -> list[Path]:
    explicit = os.environ.get(variable)
    return [Path(explicit).expanduser()] if explicit else defaults


def _find_dir(variable: str, folders: list[Path], probe: str, what: str) -> Path:
    """The first of ``folders`` that holds ``probe``; MissingDataError (where it looked, then ``what``) if none."""
    for folder in folders:
        if (folder / probe).exists():
            return folder
    where = ", ".join(map(str, folders))
    if os.environ.get(variable):
        raise MissingDataError(f"{probe} not found in {where} (from {variable}). {what}")
    raise MissingDataError(f"{probe} not found in {where}. {what}")


def load_fashion_mnist() -> Dataset:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, pixels scaled to [0, 1]."""
    d = _find_dir(
        "CROSSENT_FASHION_MNIST", fashion_mnist_dirs(), "train-images-idx3-ubyte.gz",
        "Install Fashion-MNIST with: apt-get update && apt-get install -y dataset-fashion-mnist "
        f"(files land in {FASHION_SYSTEM_DIR}), or point CROSSENT_FASHION_MNIST at a folder holding the four "
        "*-ubyte.gz IDX files.",
    )
    x_tr = _read_idx(d / "train-images-idx3-ubyte.gz").float().div_(255.0).unsqueeze(1)
    x_te = _read_idx(d / "t10k-images-idx3-ubyte.gz").float().div_(255.0).unsqueeze(1)
    y_tr = _read_idx(d / "train-labels-idx1-ubyte.gz").long()
    y_te = _read_idx(d / "t10k-labels-idx1-ubyte.gz").long()
    return Dataset("fashion-mnist", x_tr, y_tr, x_te, y_te, 10, "image", list(FASHION_CLASSES), scaling="unit")


# -- UCI data shipped in R's mlbench ---------------------------------------------------------------
def _mlbench_frame(stem: str):
    d = _find_dir(
        "CROSSENT_MLBENCH_DIR", mlbench_dirs(), f"{stem}.rda",
        "It comes with the R package mlbench; install it without R:\n"
        "  apt-get update && apt-get download r-cran-mlbench\n"
        f"  dpkg-deb -x r-cran-mlbench_*.deb {cache_dir() / 'mlbench'}\n"
        "  pip install rdata\n"
        "(or apt-get install r-cran-mlbench, or set CROSSENT_MLBENCH_DIR to the folder holding the .rda files).",
    )
    rdata = _need("rdata", "rdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that these old files declare no encoding
        return rdata.read_rda(str(d / f"{stem}.rda"))[stem]


def _frame_xy(frame, label: str, drop=()):
    import numpy as np

    cols = [c for c in frame.columns if c != label and c not in drop]
    feats = []
    for c in cols:
        col = frame[c]
        feats.append(col.cat.codes.to_numpy() if hasattr(col, "cat") else col.to_numpy())
    x = torch.tensor(np.stack(feats, 1).astype("float32"))
    y = torch.tensor(frame[label].cat.codes.to_numpy().astype("int64"))
    return x, y, [str(c) for c in frame[label].cat.categories]


def load_letter() -> Dataset:
    """UCI Letter Recognition (20000 x 16, 26 classes A-Z); the usual first-16000 / last-4000 split."""
    x, y, names = _frame_xy(_mlbench_frame("LetterRecognition"), "lettr")
    x_tr, x_te = _standardize(x[:16000], x[16000:])
    pairs = [(names.index(a), names.index(b)) for a, b in LETTER_PAIRS]
    return Dataset("letter", x_tr, y[:16000], x_te, y[16000:], 26, "tabular", names, pairs)


def load_vowel() -> Dataset:
    """UCI Vowel (990 x 9, 11 classes); speakers 0-7 train (528), 8-14 test (462), as in the UCI split."""
    frame = _mlbench_frame("Vowel")
    speaker = torch.tensor(frame["V1"].cat.codes.to_numpy().astype("int64"))
    x, y, names = _frame_xy(frame, "Class", drop=("V1",))
    tr, te = speaker < 8, speaker >= 8
    x_tr, x_te = _standardize(x[tr], x[te])
    pairs = [(2 * i, 2 * i + 1) for i in range(5)]
    return Dataset("vowel", x_tr, y[tr], x_te, y[te], 11, "tabular", names, pairs)


def _mlbench_split(stem: str, label: str, name: str) -> Dataset:
    x, y, names = _frame_xy(_mlbench_frame(stem), label)
    tr, te = _stratified_split(y, 0.25, seed=0)
    x_tr, x_te = _standardize(x[tr], x[te])
    return Dataset(name, x_tr, y[tr], x_te, y[te], len(names), "tabular", names)


def load_shuttle() -> Dataset:
    """UCI Statlog Shuttle (58000 x 9, 7 classes with 10 to 45586 examples each: a natural long tail)."""
    return _mlbench_split("Shuttle", "Class", "shuttle")


def load_satellite() -> Dataset:
    """UCI Statlog Landsat Satellite (6435 x 36, 6 classes)."""
    return _mlbench_split("Satellite", "classes", "satellite")


class Profile(NamedTuple):
    """What a dataset is, known without reading it: options are checked against it before any data is loaded."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int


PROFILES = {
    "digits": Profile("tabular", (64,), 10),
    "mnist1d": Profile("signal", (40,), 10),
    "fashion-mnist": Profile("image", (1, 28, 28), 10),
    "letter": Profile("tabular", (16,), 26),
    "vowel": Profile("tabular", (9,), 11),
    "shuttle": Profile("tabular", (9,), 7),
    "satellite": Profile("tabular", (36,), 6),
}


def profile(name: str) -> Profile:
    """The :class:`Profile` of ``name`` (any spelling :func:`canonical_name` accepts); ValueError if unknown."""
    return PROFILES[canonical_name(name)]


_LOADERS = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "fashion-mnist": load_fashion_mnist,
    "letter": load_letter,
    "vowel": load_vowel,
    "shuttle": load_shuttle,
    "satellite": load_satellite,
}
