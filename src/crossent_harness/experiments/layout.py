"""Protocol-specific layouts of a loaded dataset: another train/test split, another feature scaling.

A protocol may test on a split other than the dataset's usual one (the LDR-KL code tests Letter on a
random 2,000 rows) and scale features otherwise (to [-1, 1], as LIBSVM's copies of the UCI data are).
Both apply to feature vectors only (tabular data), and scaling is always fitted on the training rows.

Splits are written ``default`` (the dataset's own) or ``random:N`` (N test rows drawn at random,
with a fixed seed, from the training and test rows together; the rest, in their stored order, train).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .datasets import Dataset

SCALINGS = ("standard", "minmax")
SPLIT_SEED = 0  # one split for every run seed, as the reference's fixed data files are


def parse_split(text: str) -> int | None:
    """``"default"`` -> None; ``"random:N"`` -> N (ValueError otherwise)."""
    if text == "default":
        return None
    kind, _, size = text.partition(":")
    if kind == "random" and size.isdigit() and int(size) > 0:
        return int(size)
    raise ValueError(f"split must be 'default' or 'random:N' with N > 0 test rows, got {text!r}")


def resplit(data: Dataset, test_rows: int, seed: int = SPLIT_SEED) -> Dataset:
    """``data`` with a random ``test_rows``-row test set drawn from all its rows (features as loaded)."""
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    if not 0 < test_rows < len(y):
        raise ValueError(f"split random:{test_rows} needs fewer test rows than the {len(y)} rows of {data.name}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test = order[:test_rows].sort().values
    train = order[test_rows:].sort().values
    return replace(data, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


def rescale(data: Dataset, how: str) -> Dataset:
    """Refit the feature scaling on the training rows: ``standard`` (mean 0, std 1) or ``minmax`` ([-1, 1]).

    Both are per-feature affine maps fitted on the training rows, so applying one after the loader's own
    scaling gives the same features as applying it to the raw data.

    Example:
        >>> d = Dataset("toy", torch.tensor([[0.0], [4.0]]), torch.tensor([0, 1]), torch.tensor([[2.0], [6.0]]),
        ...             torch.tensor([0, 1]), 2)
        >>> rescale(d, "minmax").x_test.flatten().tolist()
        [0.0, 2.0]
    """
    if data.kind != "tabular":
        raise ValueError(f"feature scaling applies to tabular data; {data.name} is {data.kind}")
    x_train, x_test = data.x_train, data.x_test
    if how == "standard":
        shift = x_train.mean(0, keepdim=True)
        scale = x_train.std(0, keepdim=True).clamp_min(1e-6)
    elif how == "minmax":
        low, high = x_train.min(0, keepdim=True).values, x_train.max(0, keepdim=True).values
        shift = (low + high) / 2
        scale = ((high - low) / 2).clamp_min(1e-6)  # a constant feature maps to 0
    else:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {how!r}")
    return replace(data, x_train=(x_train - shift) / scale, x_test=(x_test - shift) / scale, scaling=how)


def apply(data: Dataset, split: str = "default", scaling: str | None = None) -> Dataset:
    """The dataset as a protocol lays it out. After a new split the scaling is refitted (the requested
    one, else the dataset's own ``standard`` scaling) so that no test row informs it."""
    test_rows = parse_split(split)
    if test_rows is not None:
        data = resplit(data, test_rows)
        if scaling is None and data.scaling == "standard":
            scaling = "standard"
    return rescale(data, scaling) if scaling is not None else data
