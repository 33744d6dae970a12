"""Odd-k-out learning (crossent.sets) against the paper's formulas, written here with plain autograd in float64.

Muttenthaler et al., ICLR 2024: a set of k + 2 examples (two of the pair class y', one of each of k other
classes); loss -e_{y'}^T log softmax(sum_x f(x)) (hard) or -(1/(k+2)) sum_{y in S_y} e_y^T log softmax(sum_x f(x))
(soft).
"""

from __future__ import annotations

import pytest
import torch

import crossent as xe
from crossent.sets import OddKOutSampler, oko_cross_entropy, oko_targets


def reference_oko(logits: torch.Tensor, set_labels: torch.Tensor, num_classes: int, soft: bool) -> torch.Tensor:
    """The mean over sets of the paper's set loss, from the sets' labels, one set at a time."""
    losses = []
    for z, labels in zip(logits, set_labels):
        log_p = torch.log(torch.exp(z.sum(0)) / torch.exp(z.sum(0)).sum())
        members = [int(c) for c in labels]
        if soft:
            q = torch.zeros(num_classes, dtype=torch.float64)
            for c in members:
                q[c] += 1.0 / len(members)
            losses.append(-(q * log_p).sum())
        else:
            pair = max(set(members), key=members.count)
            losses.append(-log_p[pair])
    return torch.stack(losses).mean()


def _sets(b: int, k: int, c: int, seed: int) -> torch.Tensor:
    """``[b, k+2]`` labels of odd-k-out sets: a pair class twice, then k other distinct classes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        classes = torch.randperm(c, generator=g)[: k + 1]
        rows.append(torch.cat([classes[:1], classes]))
    return torch.stack(rows)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("k", [1, 3])
def test_values_and_gradients_match_the_paper(soft, k):
    c = 7
    set_labels = _sets(5, k, c, seed=k)
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(5, k + 2, c, dtype=torch.float64, generator=g)).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()

    loss = oko_cross_entropy(logits, oko_targets(set_labels, c, soft=soft, dtype=torch.float64))
    ref = reference_oko(ref_logits, set_labels, c, soft)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)
    # every member of a set gets the same gradient: the loss reads only the sum
    torch.testing.assert_close(logits.grad, logits.grad[:, :1].expand_as(logits.grad))


def test_reductions_and_float32():
    set_labels = _sets(4, 1, 5, seed=0)
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2))
    target = oko_targets(set_labels, 5)
    per_set = oko_cross_entropy(logits, target, reduction="none")
    assert per_set.shape == (4,) and per_set.dtype == torch.float32
    torch.testing.assert_close(oko_cross_entropy(logits, target, reduction="sum"), per_set.sum())
    ref = reference_oko(logits.double(), set_labels, 5, soft=False)
    torch.testing.assert_close(per_set.mean().double(), ref, rtol=1e-6, atol=1e-6)


def test_any_crossent_loss_on_the_summed_logits():
    set_labels = _sets(4, 2, 6, seed=3)
    logits = torch.randn(4, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = oko_targets(set_labels, 6)
    expected = xe.cross_entropy(logits.sum(1), target, loss="focal")
    torch.testing.assert_close(oko_cross_entropy(logits, target, loss="focal"), expected)


def test_targets_from_the_sets_labels():
    set_labels = torch.tensor([[2, 2, 0], [1, 3, 1], [0, 4, 4]])
    assert oko_targets(set_labels, 5).tolist() == [2, 1, 4]
    soft = oko_targets(set_labels, 5, soft=True, dtype=torch.float64)
    expected = torch.tensor([[1, 0, 2, 0, 0], [0, 2, 0, 1, 0], [1, 0, 0, 0, 2]], dtype=torch.float64) / 3
    torch.testing.assert_close(soft, expected)


@pytest.mark.parametrize(
    ("labels", "num_classes", "error", "match"),
    [
        (torch.tensor([[0, 1, 2]]), 3, ValueError, r"set 0 has no pair class"),
        (torch.tensor([[0, 0, 1], [1, 1, 2], [2, 2, 3]]), 3, ValueError,
         r"set_labels\[2, 2\] = 3 is not a class in \[0, 3\)"),
        (torch.tensor([[0, 0, -1]]), 3, ValueError, r"set_labels\[0, 2\] = -1"),
        (torch.tensor([0, 0, 1]), 3, ValueError, r"\[B, S\]"),
        (torch.tensor([[0.0, 0.0, 1.0]]), 3, TypeError, r"integer tensor"),
        (torch.tensor([[0, 0, 1]]), 0, ValueError, r"num_classes must be >= 1"),
    ],
)
def test_targets_errors(labels, num_classes, error, match):
    with pytest.raises(error, match=match):
        oko_targets(labels, num_classes)


@pytest.mark.parametrize(
    ("shape", "target", "match"),
    [
        ((4, 5), torch.zeros(4, dtype=torch.long), r"\[B, S, C\]"),
        ((4, 0, 5), torch.zeros(4, dtype=torch.long), r"\[B, S, C\]"),
        ((4, 3, 5), torch.zeros(3, dtype=torch.long), r"class indices \[B\] = \[4\].*got shape \(3,\)"),
        ((4, 3, 5), torch.zeros(4, 3, dtype=torch.long), r"got shape \(4, 3\)"),
        ((4, 3, 5), torch.zeros(4, 4), r"class probabilities \[B, C\] = \[4, 5\].*got shape \(4, 4\)"),
    ],
)
def test_loss_shape_errors(shape, target, match):
    with pytest.raises(ValueError, match=match):
        oko_cross_entropy(torch.zeros(shape), target)


def test_an_out_of_range_pair_class_is_named():
    with pytest.raises(ValueError, match="7"):
        oko_cross_entropy(torch.zeros(2, 3, 5), torch.tensor([1, 7]))


# -- the sampler ---------------------------------------------------------------------------------------------------


def _check_composition(labels: torch.Tensor, batch: list[int], k: int, sets: int) -> torch.Tensor:
    idx = torch.tensor(batch).view(sets, k + 2)
    set_labels = labels[idx]
    for members, lab in zip(idx.tolist(), set_labels.tolist()):
        assert lab[0] == lab[1], lab                              # the pair
        assert members[0] != members[1], members                  # two different examples of it
        assert len(set(lab[1:])) == k + 1, lab                    # k odd classes, distinct, none the pair class
    return idx


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sets_have_the_odd_k_out_composition(k):
    labels = torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(k))
    sampler = OddKOutSampler(labels, k=k, sets_per_batch=16, num_batches=5, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert len(batch) == 16 * (k + 2)
        idx = _check_composition(labels, batch, k, 16)
        assert oko_targets(labels[idx], 6).tolist() == labels[idx[:, 0]].tolist()


def test_few_examples_per_class():
    # classes 0 and 3 have one example each: never a pair class, still odd classes; class 1 has exactly two
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    sampler = OddKOutSampler(labels, k=1, sets_per_batch=400, num_batches=1, generator=torch.Generator().manual_seed(0))
    idx = _check_composition(labels, next(iter(sampler)), 1, 400)
    pair_classes = set(labels[idx[:, 0]].tolist())
    assert pair_classes == {1, 2}
    assert set(labels[idx[:, 2]].tolist()) == {0, 1, 2, 3}
    # the two members of class 1's pair are its two examples
    ones = idx[labels[idx[:, 0]] == 1][:, :2]
    assert all(sorted(row) == [1, 2] for row in ones.tolist())


def test_classes_are_drawn_uniformly_not_by_frequency():
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(90, dtype=torch.long), torch.full((10,), 2)])
    sampler = OddKOutSampler(labels, k=1, sets_per_batch=6000, generator=torch.Generator().manual_seed(0))
    pair = labels[sampler.sample()[:, 0]]
    share = torch.bincount(pair, minlength=3).double() / len(pair)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)


def test_deterministic_with_a_generator():
    labels = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(0))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return list(OddKOutSampler(labels, k=2, sets_per_batch=8, num_batches=3, generator=g))

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    first = draw(1)
    assert first[0] != first[1]  # batches are fresh draws


def test_default_number_of_batches_covers_the_examples_about_once():
    labels = torch.arange(100) % 4
    assert len(OddKOutSampler(labels, k=1, sets_per_batch=10)) == 4    # ceil(100 / 30)
    assert len(OddKOutSampler(labels, k=2, sets_per_batch=25)) == 1
    assert len(OddKOutSampler(labels, k=1, sets_per_batch=10, num_batches=0)) == 0


def test_sampler_feeds_a_data_loader():
    labels = torch.arange(12) % 4
    data = torch.utils.data.TensorDataset(torch.arange(12), labels)
    sampler = OddKOutSampler(labels, k=1, sets_per_batch=5, num_batches=2, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    for x, y in loader:
        assert x.shape == (15,)
        assert (labels[x] == y).all()
        _check_composition(labels, x.tolist(), 1, 5)


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (torch.tensor([0, 1, 2, 3]), {}, ValueError, r"no class has the two examples a pair needs"),
        (torch.tensor([0, 0, 1, 1]), {"k": 2}, ValueError,
         r"k=2 odd classes and a pair class need 3 classes, the labels have 2"),
        (torch.tensor([0, 0, 1]), {"k": 0}, ValueError, r"k must be >= 1"),
        (torch.tensor([0, 0, 1]), {"sets_per_batch": 0}, ValueError, r"sets_per_batch must be >= 1"),
        (torch.tensor([0, 0, -1]), {}, ValueError, r"labels must be >= 0, got -1 at position 2"),
        (torch.tensor([0.0, 0.0, 1.0]), {}, TypeError, r"1-D integer tensor"),
        (torch.tensor([[0, 0, 1]]), {}, TypeError, r"1-D integer tensor"),
        (torch.tensor([], dtype=torch.long), {}, ValueError, r"no class has"),
    ],
)
def test_sampler_errors(labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        OddKOutSampler(labels, **kwargs)


# -- the harness: `crossent compare --losses oko` ----------------------------------------------------------------


def test_compare_trains_oko_and_predicts_single_examples():
    from crossent_harness.experiments.compare import CompareConfig, run
    from crossent_harness.experiments.methods import parse_list
    from crossent_harness.experiments.train import TrainConfig

    cfg = CompareConfig(methods=parse_list("oko,oko:k=2:targets=soft"), hidden=(32,), train_size=300,
                        train=TrainConfig(epochs=3, batch_size=32))
    runs = run(cfg)["runs"]
    assert [r["method"] for r in runs] == ["oko", "oko:k=2:targets=soft"]
    assert runs[0]["info"] == {"k": 1, "targets": "hard"} and runs[1]["info"] == {"k": 2, "targets": "soft"}
    for r in runs:
        assert r["acc"] > 0.5, r  # digits: chance is 0.1


@pytest.mark.parametrize(
    ("spec", "match"),
    [("oko:k=0", r"k must be an integer >= 1, got 0"), ("oko:k=1.5", r"k must be an integer"),
     ("oko:targets=mixed", r"targets must be 'hard' or 'soft'"),
     ("oko:gamma=2", r"unknown hyperparameter 'gamma' of ce")],
)
def test_compare_refuses_bad_oko_specs(spec, match):
    from crossent_harness.experiments.methods import Method

    with pytest.raises(ValueError, match=match):
        Method.parse(spec).check()


def test_compare_refuses_more_odd_classes_than_the_dataset_has():
    from crossent_harness.experiments.compare import CompareConfig
    from crossent_harness.experiments.config import OptionError
    from crossent_harness.experiments.methods import parse_list

    with pytest.raises(OptionError, match=r"--losses: oko:k=10: k \+ 1 distinct classes a set, but digits has 10"):
        CompareConfig(methods=parse_list("oko:k=10")).check()
