"""Transformed copies of a dataset's inputs: the views that the correctness-aware calibrator reads.

The calibrator of Liu et al. (2024) reads the model's softmax on transformed versions of each input
(rotated, greyscaled and colour-jittered ImageNet images in the paper): how well the views agree with
the prediction tells how likely it is right. The harness makes :data:`COUNT` views per input from its
own data, by kind:

==========  ==================================================================================
kind        views
==========  ==================================================================================
image       horizontal flip; a circular shift of 2 pixels to the right; Gaussian noise
signal      circular shifts by +2 and -2 positions; Gaussian noise
tabular     Gaussian noise at three strengths (0.1, 0.2 and 0.4 of each feature's std)
==========  ==================================================================================

Image and signal noise has a standard deviation of :data:`NOISE` times the inputs' overall one. Noise
is drawn from a generator seeded with ``seed``, so a run's views are reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

COUNT = 3  #: views per input, as in the official code (its three transformed copies)
NOISE = 0.25  #: noise std of image and signal views, relative to the inputs' std
TABULAR_NOISE = (0.1, 0.2, 0.4)  #: noise std of tabular views, relative to each feature's std


def transformed(x: Tensor, kind: str, seed: int) -> list[Tensor]:
    """:data:`COUNT` transformed copies of ``x`` (rows of one dataset of ``kind``), each shaped as ``x``.

    Example:
        >>> x = torch.arange(6.0).reshape(1, 6)
        >>> shifted, back, noisy = transformed(x, "signal", seed=0)
        >>> shifted.tolist(), back.tolist()
        ([[4.0, 5.0, 0.0, 1.0, 2.0, 3.0]], [[2.0, 3.0, 4.0, 5.0, 0.0, 1.0]])
    """
    g = torch.Generator().manual_seed(seed)

    def noisy(std):
        return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)

    if kind == "image":
        return [x.flip(-1), x.roll(2, dims=-1), noisy(NOISE * x.std())]
    if kind == "signal":
        return [x.roll(2, dims=-1), x.roll(-2, dims=-1), noisy(NOISE * x.std())]
    if kind == "tabular":
        feature_std = x.std(0, keepdim=True) if len(x) > 1 else torch.ones_like(x)
        return [noisy(s * feature_std) for s in TABULAR_NOISE]
    raise ValueError(f"kind must be 'image', 'signal' or 'tabular', got {kind!r}")
