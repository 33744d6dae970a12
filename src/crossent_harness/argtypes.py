"""Argument types of the ``crossent`` commands: a number that cannot run is refused while parsing.

``float("inf")`` and ``float("nan")`` are floats to Python, so argparse's ``type=float`` takes
``--imbalance inf`` or ``--lr nan``; :func:`finite_float` does not, and every real-valued option of
the commands uses it. The range of each option is checked where its meaning is known.
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A finite real number (``inf``, ``nan`` and overflowing literals such as ``1e999`` are refused).

    >>> finite_float("1e-3")
    0.001
    >>> finite_float("inf")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a finite number, got 'inf'
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
