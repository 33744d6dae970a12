"""State that copies, pickles and casts without being shared or broken.

How these were found:

* ALDR-KL on the row-chunked (fused) path accepted duplicate ``sample_ids`` when they fell in different
  chunks, while ``cross_entropy`` refused them: the check ran per observed block. It now runs once
  per call, in ``commit``, where every row's observations are together.
* ``copy.deepcopy`` of an ALDR-KL loss kept the original's observation key, so a copy and its original
  summed into one loss read one set of temperatures.
* ``CrossEntropyLoss(loss=AdaptiveLDRKL(...)).half()`` (or ``.bfloat16()``, ``model.to(dtype)``) cast the
  table of temperatures, and the next step failed writing float64 temperatures into it. The table
  now stays float64 through casts of the module and follows only its device.

The same class nearby: pickling, the ``LossRef`` every loss carries for ``torch.compile``, and the
weighting strategies with state (a deepcopy or pickle must advance on its own).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import crossent as xe
import reference_whole_row as ref
from crossent._loss_ref import LossRef, ref_of
from crossent.losses import AdaptiveLDRKL
from crossent.weighting import RENT, BiasLossWeights, DirichletWeightSampling, DoReMi, LossReweighting

N, C = 8, 5


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g, dtype=dtype) * 2, torch.randint(0, C, (N,), generator=g)


def step(loss, seed=0, ids=None, dtype=torch.float64):
    z, y = batch(seed, dtype)
    ids = torch.arange(N) if ids is None else ids
    return xe.cross_entropy(z, y, loss=loss, extra={"sample_ids": ids}, reduction="none")


# -- sample ids: one check per call --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "recompute"])
def test_duplicate_sample_ids_in_different_chunks_are_refused(mode):
    """Rows 0 and 5 share id 3 and fall in different chunks of 4 rows."""
    z, y = batch()
    e, c = torch.eye(N, dtype=torch.float64).requires_grad_(), z.T.contiguous().requires_grad_()
    ids = torch.tensor([3, 0, 1, 2, 4, 3, 6, 7])
    crit = AdaptiveLDRKL(num_samples=N)
    options = xe.LinearCrossEntropyOptions(chunk_size=4, mode=mode)
    message = "sample_ids of the counted rows of one call must be distinct"
    with pytest.raises(ValueError, match=message):
        xe.linear_cross_entropy(e, c, y, loss=crit, extra={"sample_ids": ids}, reduction="sum", options=options)
    with pytest.raises(ValueError, match=message):
        xe.cross_entropy(z, y, loss=AdaptiveLDRKL(num_samples=N), extra={"sample_ids": ids})
    assert torch.equal(crit.lambdas, torch.ones(N, dtype=torch.float64))  # refused before any write


def test_distinct_ids_across_chunks_and_a_shared_id_of_an_ignored_row_pass():
    z, y = batch()
    y[5] = -100  # its id (3, again) is not read
    ids = torch.tensor([3, 0, 1, 2, 4, 3, 6, 7])
    e, c = torch.eye(N, dtype=torch.float64), z.T.contiguous()
    crit = AdaptiveLDRKL(num_samples=N)
    options = xe.LinearCrossEntropyOptions(chunk_size=4)
    out = xe.linear_cross_entropy(e, c, y, loss=crit, extra={"sample_ids": ids}, reduction="none", options=options)
    want, table = ref.aldr_step(z[y != -100], y[y != -100], ids[y != -100], torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(out[y != -100], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(crit.lambdas, table, rtol=1e-12, atol=0)


# -- copies and pickles ----------------------------------------------------------------------------------
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_aldr_kl_is_a_loss_of_its_own(how):
    original = AdaptiveLDRKL(num_samples=N)
    step(original, seed=1)
    duplicate = COPIES[how](original)
    torch.testing.assert_close(duplicate.lambdas, original.lambdas, rtol=0, atol=0)
    step(duplicate, seed=2)  # the copies' tables now differ
    table_a, table_b = original.lambdas.clone(), duplicate.lambdas.clone()
    assert not torch.equal(table_a, table_b)

    # In one composed loss each part reads its own table: the sum is the two reference steps.
    out = step(original + duplicate, seed=3)
    z, y = batch(3)
    ids = torch.arange(N)
    want_a, new_a = ref.aldr_step(z, y, ids, table_a)
    want_b, new_b = ref.aldr_step(z, y, ids, table_b)
    torch.testing.assert_close(out, want_a + want_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(original.lambdas, new_a, rtol=1e-12, atol=0)
    torch.testing.assert_close(duplicate.lambdas, new_b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("make", [lambda: AdaptiveLDRKL(num_samples=N), lambda: xe.losses.get("focal", gamma=1.0),
                                  lambda: xe.losses.LogitClip(base=AdaptiveLDRKL(num_samples=N)),
                                  lambda: xe.losses.APL(active=AdaptiveLDRKL(num_samples=N))],
                         ids=["aldr_kl", "focal", "logit_clip_of_aldr_kl", "apl_of_aldr_kl"])  # fmt: skip
def test_a_copy_carries_a_reference_to_itself(how, make):
    """The LossRef a compiled call hands to its custom operator names the copy, not the original."""
    if LossRef is None:
        pytest.skip("this PyTorch has no opaque objects for custom operators")
    original = make()
    duplicate = COPIES[how](original)
    assert ref_of(duplicate) is not None and ref_of(duplicate).loss is duplicate
    assert ref_of(duplicate) is not ref_of(original) and ref_of(original).loss is original
    shallow = copy.copy(original)
    assert ref_of(shallow).loss is shallow


def test_a_wrapper_copy_owns_its_loss_and_state():
    crit = xe.nn.CrossEntropyLoss(loss=AdaptiveLDRKL(num_samples=N))
    z, y = batch()
    crit(z, y, extra={"sample_ids": torch.arange(N)})
    twin = copy.deepcopy(crit)
    assert twin.loss is not crit.loss and ref_of(twin.loss).loss is twin.loss
    before = crit.loss.lambdas.clone()
    twin(*batch(1), extra={"sample_ids": torch.arange(N)})
    assert torch.equal(crit.loss.lambdas, before) and not torch.equal(twin.loss.lambdas, before)


T3 = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])


def _advance(strategy):
    """One call that moves the strategy's state (step counter, domain weights, minimum, generator)."""
    g = torch.Generator().manual_seed(5)
    losses = torch.rand(6, generator=g) + 0.1
    if isinstance(strategy, DoReMi):
        strategy(losses, reference_losses=losses / 2, domain_ids=torch.tensor([0, 1, 2, 0, 1, 2]))
    elif isinstance(strategy, BiasLossWeights):
        strategy(losses, features=torch.rand(6, 4, generator=g) * 0.01)
    elif isinstance(strategy, (RENT, DirichletWeightSampling)):
        strategy(losses, target=torch.tensor([0, 1, 2, 0, 1, 2]), logits=torch.randn(6, 3, generator=g))
    else:
        strategy(losses)


STRATEGIES = {
    "LossReweighting": lambda: LossReweighting(warmup_steps=0),
    "DoReMi": lambda: DoReMi(3),
    "BiasLossWeights": lambda: BiasLossWeights(),
    "RENT": lambda: RENT(T3, generator=torch.Generator().manual_seed(0)),
    "DirichletWeightSampling": lambda: DirichletWeightSampling(T3, 1.0, generator=torch.Generator().manual_seed(1)),
}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_copy_of_a_stateful_strategy_advances_on_its_own(name, how):
    original = STRATEGIES[name]()
    _advance(original)
    duplicate = COPIES[how](original)
    _same(duplicate.state_dict(), original.state_dict())
    frozen = copy.deepcopy(original.state_dict())
    _advance(duplicate)
    _same(original.state_dict(), frozen)  # the original did not move
    _advance(original)
    _same(original.state_dict(), duplicate.state_dict())  # the same step from the same state


# -- casts of the module ----------------------------------------------------------------------------------
CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "double": lambda m: m.double(),
    "float": lambda m: m.float(),
    "to_dtype": lambda m: m.to(torch.float16),
    "to_device_and_dtype": lambda m: m.to("cpu", torch.bfloat16),
}


def _criteria():
    return {
        "aldr_kl": xe.nn.CrossEntropyLoss(loss=AdaptiveLDRKL(num_samples=N)),
        "logit_clip_of_aldr_kl": xe.nn.CrossEntropyLoss(loss=xe.losses.LogitClip(base=AdaptiveLDRKL(num_samples=N))),
        "apl_of_aldr_kl": xe.nn.CrossEntropyLoss(loss=xe.losses.APL(active=AdaptiveLDRKL(num_samples=N))),
    }


def _table(crit):
    return [m for m in crit.modules() if isinstance(m, AdaptiveLDRKL)][0].lambdas


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("which", ["aldr_kl", "logit_clip_of_aldr_kl", "apl_of_aldr_kl"])
def test_casting_the_wrapper_keeps_the_table_float64_and_the_next_step_works(which, cast):
    crit = _criteria()[which]
    twin = copy.deepcopy(crit)  # never cast: the reference of the same steps
    ids = {"sample_ids": torch.arange(N)}
    z, y = batch()
    crit(z.float(), y, extra=ids)
    twin(z.float(), y, extra=ids)
    CASTS[cast](crit)
    assert _table(crit).dtype == torch.float64
    torch.testing.assert_close(_table(crit), _table(twin), rtol=0, atol=0)  # not rounded through the cast
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "to_dtype": torch.float16}.get(cast, torch.float32)
    dtype = torch.bfloat16 if cast == "to_device_and_dtype" else dtype
    z2, y2 = batch(1)
    out = crit(z2.to(dtype), y2, extra=ids)
    twin(z2.to(dtype), y2, extra=ids)
    assert torch.isfinite(out)
    torch.testing.assert_close(_table(crit), _table(twin), rtol=0, atol=0)

    # state_dict after the cast: float64, and it loads into a fresh wrapper cast the same way.
    state = crit.state_dict()
    key = [k for k in state if k.endswith("lambdas")][0]
    assert state[key].dtype == torch.float64
    fresh = CASTS[cast](_criteria()[which])
    fresh.load_state_dict(state)
    assert _table(fresh).dtype == torch.float64
    torch.testing.assert_close(_table(fresh), _table(crit), rtol=0, atol=0)


def test_casting_a_model_around_the_criterion():
    """model.to(dtype) reaches the criterion as a submodule; the model's own parameters do follow."""
    model = torch.nn.Module()
    model.head = torch.nn.Linear(3, C)
    model.criterion = xe.nn.CrossEntropyLoss(loss=AdaptiveLDRKL(num_samples=N))
    model.to(torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16 and _table(model.criterion).dtype == torch.float64
    x = torch.randn(N, 3, dtype=torch.bfloat16)
    out = model.criterion(model.head(x), torch.randint(0, C, (N,)), extra={"sample_ids": torch.arange(N)})
    out.backward()
    assert torch.isfinite(out) and model.head.weight.grad is not None
    assert not torch.equal(_table(model.criterion), torch.ones(N, dtype=torch.float64))
