"""Each label-noise definition against the reference's definition: flip rate and transition matrix.

The references draw from NumPy, so their individual flips differ from ours; what must agree is what
each definition fixes: exact per-class flip counts (APL symmetric), which class a label may move to,
and the rate at which it moves. ``reference_*`` below restate each published definition as a plain
loop over the labels, the way the papers' code describes it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossent_harness.experiments import datasets, noise

LETTER_PAIRS = [(1, 3), (2, 6), (4, 5), (7, 13), (8, 11), (10, 23), (12, 22), (14, 16), (15, 17), (20, 21)]


# -- the references, restated ------------------------------------------------------------------------
def reference_apl_symmetric(labels: np.ndarray, num_classes: int, rate: float, rng) -> np.ndarray:
    """int(rate N) noisy examples in all, int(that / C) of each class, each to a random other class."""
    out = labels.copy()
    per_class = int(int(rate * len(labels)) / num_classes)
    for c in range(num_classes):
        for i in rng.choice(np.where(labels == c)[0], per_class, replace=False):
            out[i] = rng.choice([k for k in range(num_classes) if k != c])
    return out


def reference_flip_by_map(labels: np.ndarray, class_map: dict, rate: float, rng) -> np.ndarray:
    """One uniform draw per label; below ``rate``, the label becomes its image under the map."""
    checks = rng.random(len(labels))
    return np.array([class_map.get(int(y), int(y)) if u < rate else y for y, u in zip(labels, checks)])


def reference_uniform(labels: np.ndarray, num_classes: int, rate: float, rng) -> np.ndarray:
    """Below ``rate``, the label becomes a class drawn from all C (possibly itself)."""
    draws = rng.integers(0, num_classes, len(labels))
    checks = rng.random(len(labels))
    return np.where(checks < rate, draws, labels)


def binomial_tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def digits_train_labels() -> torch.Tensor:
    pytest.importorskip("sklearn")
    return datasets.load("digits").y_train


# -- APL symmetric -----------------------------------------------------------------------------------
def test_apl_symmetric_flips_exactly_the_references_counts_on_digits():
    y = digits_train_labels()
    ours = noise.get("apl-symmetric").corrupt(y, 10, 0.4, seed=0)
    ref = torch.from_numpy(reference_apl_symmetric(y.numpy(), 10, 0.4, np.random.default_rng(0)))
    per_class = int(int(0.4 * len(y)) / 10)  # 50 of each digit
    for noisy in (ours, ref):
        changed = noisy != y
        assert torch.bincount(y[changed], minlength=10).tolist() == [per_class] * 10
        assert noise.flip_rate(y, noisy) == pytest.approx(10 * per_class / len(y))
    # 500 of the 1258 training digits: 39.75% at rate 0.4, where a redraw from all classes changes about 36%
    assert len(y) == 1258 and round(100 * noise.flip_rate(y, ours), 2) == 39.75
    assert noise.flip_rate(y, noise.get("ldr-uniform").corrupt(y, 10, 0.4, seed=0)) < 0.38


def test_apl_symmetric_moves_uniformly_to_the_other_classes():
    y = torch.arange(10).repeat_interleave(3000)
    noisy = noise.get("apl-symmetric").corrupt(y, 10, 0.6, seed=1)
    expected = noise.get("apl-symmetric").transition(y, 10, 0.6)
    assert torch.allclose(expected.sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(expected.diagonal(), torch.full((10,), 0.4, dtype=torch.float64))
    emp = noise.empirical_transition(y, noisy, 10)
    assert emp.diagonal().tolist() == pytest.approx([0.4] * 10, abs=1e-12)  # exact counts
    assert torch.allclose(emp, expected, atol=binomial_tolerance(0.6 / 9, 1800))
    ref = torch.from_numpy(reference_apl_symmetric(y.numpy(), 10, 0.6, np.random.default_rng(1)))
    assert torch.allclose(noise.empirical_transition(y, ref, 10), expected, atol=binomial_tolerance(0.6 / 9, 1800))


def test_apl_symmetric_refuses_classes_too_small_to_flip():
    y = torch.tensor([0] * 50 + [1] * 5)
    with pytest.raises(ValueError, match="class 1 has only 5"):
        noise.get("apl-symmetric").check(y, 2, 0.4)


# -- APL asymmetric ------------------------------------------------------------------------------------
def test_apl_asymmetric_is_the_mnist_map_at_the_given_rate():
    y = torch.arange(10).repeat_interleave(5000)
    model = noise.get("apl-asymmetric")
    noisy = model.corrupt(y, 10, 0.3, seed=2)
    t = model.transition(y, 10, 0.3)
    mapping = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    for c in range(10):
        row = torch.zeros(10, dtype=torch.float64)
        if c in mapping:
            row[c], row[mapping[c]] = 0.7, 0.3
        else:
            row[c] = 1.0
        assert torch.equal(t[c], row), c
    emp = noise.empirical_transition(y, noisy, 10)
    ref = torch.from_numpy(reference_flip_by_map(y.numpy(), mapping, 0.3, np.random.default_rng(2)))
    for got in (emp, noise.empirical_transition(y, ref, 10)):
        assert torch.allclose(got, t, atol=binomial_tolerance(0.3, 5000))
    # only the five source classes change: half the labels, at rate 0.3
    assert noise.flip_rate(y, noisy) == pytest.approx(0.5 * 0.3, abs=binomial_tolerance(0.15, len(y)))
    with pytest.raises(ValueError, match="10-class"):
        model.corrupt(torch.arange(26), 26, 0.3)


# -- LDR uniform ---------------------------------------------------------------------------------------
def test_ldr_uniform_redraws_from_every_class():
    n, c, rate = 200_000, 10, 0.4
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1))
    model = noise.get("ldr-uniform")
    noisy = model.corrupt(y, c, rate, seed=3)
    expected_flip = rate * (c - 1) / c  # a redraw may land on the label itself
    ref = torch.from_numpy(reference_uniform(y.numpy(), c, rate, np.random.default_rng(3)))
    t = model.transition(y, c, rate)
    for got in (noisy, ref):
        assert noise.flip_rate(y, got) == pytest.approx(expected_flip, abs=binomial_tolerance(expected_flip, n))
        assert torch.allclose(noise.empirical_transition(y, got, c), t, atol=0.01)
    assert torch.allclose(t.diagonal(), torch.full((c,), 1 - rate + rate / c, dtype=torch.float64))
    assert torch.equal(noisy, model.corrupt(y, c, rate, seed=3))  # same seed, same labels
    assert torch.equal(model.corrupt(y, c, 0.0), y)


# -- LDR class-dependent -------------------------------------------------------------------------------
def test_ldr_class_dependent_uses_the_published_letter_pairs():
    names = [chr(ord("A") + i) for i in range(26)]
    pairs = [(names.index(a), names.index(b)) for a, b in datasets.LETTER_PAIRS]
    assert sorted(pairs) == LETTER_PAIRS  # B<->D C<->G E<->F H<->N I<->L K<->X M<->W O<->Q P<->R U<->V
    y = torch.arange(26).repeat(4000)
    model = noise.get("ldr-class-dependent")
    noisy = model.corrupt(y, 26, 0.3, seed=0, pairs=pairs)
    mapping = {a: b for p in pairs for a, b in (p, p[::-1])}
    t = model.transition(y, 26, 0.3, pairs=pairs)
    ref = torch.from_numpy(reference_flip_by_map(y.numpy(), mapping, 0.3, np.random.default_rng(0)))
    for got in (noisy, ref):
        moved = got != y
        assert all(mapping[int(a)] == int(b) for a, b in zip(y[moved][:500], got[moved][:500]))
        assert not moved[~torch.isin(y, torch.tensor(list(mapping)))].any()  # A J S T Y Z never move
        # 20 of 26 letters have a partner
        assert noise.flip_rate(y, got) == pytest.approx(0.3 * 20 / 26, abs=binomial_tolerance(0.23, len(y)))
        assert torch.allclose(noise.empirical_transition(y, got, 26), t, atol=binomial_tolerance(0.3, 4000))


def test_ldr_class_dependent_elsewhere_moves_to_the_next_class():
    y = torch.arange(10).repeat_interleave(4000)
    model = noise.get("ldr-class-dependent")
    t = model.transition(y, 10, 0.45)
    assert all(t[i, (i + 1) % 10] == 0.45 and t[i, i] == 0.55 for i in range(10))
    noisy = model.corrupt(y, 10, 0.45, seed=5)
    ref = torch.from_numpy(reference_flip_by_map(y.numpy(), {i: (i + 1) % 10 for i in range(10)}, 0.45,
                                                 np.random.default_rng(5)))
    for got in (noisy, ref):
        assert noise.flip_rate(y, got) == pytest.approx(0.45, abs=binomial_tolerance(0.45, len(y)))
        assert torch.allclose(noise.empirical_transition(y, got, 10), t, atol=binomial_tolerance(0.45, 4000))


def test_adjacent_swap_keeps_the_former_pair_noise_under_its_own_name():
    assert noise.get("adjacent-swap").corrupt(torch.arange(5), 5, 1.0).tolist() == [1, 0, 3, 2, 4]
    t = noise.get("adjacent-swap").transition(torch.arange(4), 4, 0.2)
    assert t[0].tolist() == [0.8, 0.2, 0.0, 0.0] and t[3].tolist() == [0.0, 0.0, 0.2, 0.8]


# -- names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old", ["symmetric", "pair"])
def test_ambiguous_former_names_are_refused_with_the_choices(old):
    with pytest.raises(ValueError, match="ambiguous") as info:
        noise.get(old)
    assert "ldr-" in str(info.value)


def test_unknown_noise_and_bad_rates():
    with pytest.raises(ValueError, match="unknown noise 'gaussian'"):
        noise.get("gaussian")
    for name in noise.names():
        with pytest.raises(ValueError, match="noise rate"):
            noise.get(name).corrupt(torch.arange(10), 10, 1.5)


@pytest.mark.parametrize("name", noise.names())
def test_every_transition_matrix_is_row_stochastic(name):
    y = torch.arange(10).repeat(30)
    t = noise.get(name).transition(y, 10, 0.35)
    assert t.shape == (10, 10) and (t >= 0).all()
    assert torch.allclose(t.sum(1), torch.ones(10, dtype=torch.float64))
