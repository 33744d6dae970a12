"""NaN in, NaN out: a row with a NaN (or +inf) logit gets a non-finite loss from every registered loss.

A loss that returned a finite number for such a row while its gradient is NaN would hide the fault from
a finiteness check on the loss. The other rows must be unaffected: the same values as without the bad
row. Dense (``cross_entropy``) and row-chunked (``linear_cross_entropy``, the bad value in ``e``).
"""

from __future__ import annotations

import math

import pytest
import torch

import crossent as xe
from crossent.losses import registered

N, C, D = 4, 5, 3
T = torch.eye(C) * 0.5 + 0.1  # row-stochastic


def build(name):
    """(loss object, extra) for a registered name, with what it needs at C classes."""
    hp = {"forward_correction": dict(T=T), "backward_correction": dict(T=T), "aldr_kl": dict(num_samples=N)}
    obj = xe.losses.get(name, **hp.get(name, {}))
    if name == "aldr_kl":
        obj.eval()  # the same temperatures on every call
    return obj, ({"sample_ids": torch.arange(N)} if name == "aldr_kl" else None)


def inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, C, generator=g, dtype=torch.float64)
    return z, torch.tensor([0, 1, 2, 4])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(registered()))
def test_dense_engine(name, bad):
    z, y = inputs()
    loss, extra = build(name)
    clean = xe.cross_entropy(z, y, loss=loss, extra=extra, reduction="none")
    for column in (int(y[0]), 3):  # the target's logit, another one
        zb = z.clone()
        zb[0, column] = bad
        out = xe.cross_entropy(zb, y, loss=loss, extra=extra, reduction="none")
        assert not torch.isfinite(out[0]), (column, out[0])
        if bad != bad:  # NaN, not merely non-finite
            assert torch.isnan(out[0])
        torch.testing.assert_close(out[1:], clean[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(registered()))
def test_row_chunked_engine(name):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(N, D, generator=g, dtype=torch.float64)
    c = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    loss, extra = build(name)
    clean = xe.linear_cross_entropy(e, c, y, loss=loss, extra=extra, reduction="none")
    e[0, 1] = math.nan
    out = xe.linear_cross_entropy(e, c, y, loss=loss, extra=extra, reduction="none")
    assert torch.isnan(out[0])
    torch.testing.assert_close(out[1:], clean[1:], rtol=1e-12, atol=1e-12)


def test_tgce_is_nan_where_its_gradient_is():
    z = torch.tensor([[0.0, math.nan, 1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    out = xe.cross_entropy(z, torch.tensor([0, 0]), loss="tgce", reduction="none")
    out.sum().backward()
    assert torch.isnan(out[0]) and torch.isnan(z.grad[0]).any()
    assert torch.isfinite(out[1]) and torch.isfinite(z.grad[1]).all()
