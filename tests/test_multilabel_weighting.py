"""Multi-label training: DynamicClassWeights against the paper's formula (float64, written out step by
step), its state contract (state_dict, one update per step, frozen in eval mode, independent copies),
and the per-class F1 threshold search against a brute-force search over every candidate threshold."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as xe
from crossent.weighting import DynamicClassWeights
from crossent_harness.experiments.metrics import best_f1_thresholds, f1_per_class, macro_f1
from _gloo import check, run_cases


# -- the reference: the paper's update and loss, one step at a time ------------------------------------------------
class Reference:
    """``bar l_c <- s mean_i l_ic + (1 - s) bar l_c`` (start ``1/C``), ``w = (1/(eps + bar l)) / sum``,
    ``L = sum_ic w_c l_ic / (N C)``; masked elements are left out of the means and of ``N C``."""

    def __init__(self, num_classes, smoothing=0.05, eps=1e-5):
        self.s, self.eps = smoothing, eps
        self.running = [1.0 / num_classes] * num_classes

    def step(self, losses, mask=None):
        losses = losses.detach().double()
        n, c = losses.shape
        mask = torch.ones(n, c, dtype=torch.bool) if mask is None else mask
        for k in range(c):
            values = [losses[i, k].item() for i in range(n) if mask[i, k]]
            if values:
                self.running[k] = self.s * sum(values) / len(values) + (1 - self.s) * self.running[k]
        return self.weights()

    def weights(self):
        inverse = [1.0 / (self.eps + r) for r in self.running]
        return torch.tensor([v / sum(inverse) for v in inverse], dtype=torch.float64)

    def loss(self, losses, w, mask=None):
        mask = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask
        total = sum(w[k] * losses[i, k] for i in range(losses.shape[0]) for k in range(losses.shape[1]) if mask[i, k])
        return total / max(int(mask.sum()), 1)


def _batches(steps, n=6, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 0.5, 1.0, 3.0])[:c]  # classes with very different loss levels
    return [(torch.rand(n, c, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("smoothing", [0.05, 0.5, 1.0])
def test_weights_and_loss_follow_the_formula_step_by_step(smoothing):
    dyn, ref = DynamicClassWeights(4, smoothing=smoothing), Reference(4, smoothing)
    for losses in _batches(5):
        losses.requires_grad_(True)
        w_ref = ref.step(losses)
        expected = ref.loss(losses, w_ref)
        got = dyn(losses)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(dyn.class_weights, w_ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(dyn.running_losses, torch.tensor(ref.running, dtype=torch.float64))
        # the weights are constants: d L / d l_ic = w_c / (N C), the gradient of the reference
        (g,) = torch.autograd.grad(got, losses)
        (g_ref,) = torch.autograd.grad(ref.loss(losses, w_ref), losses)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)
    assert abs(dyn.class_weights.sum().item() - 1) < 1e-12
    assert dyn.class_weights.argmax() == 0 and dyn.class_weights.argmin() == 3  # the easy class weighs most


def test_the_weights_move_with_the_losses():
    dyn = DynamicClassWeights(2, smoothing=0.5)
    start = dyn.class_weights
    torch.testing.assert_close(start, torch.tensor([0.5, 0.5], dtype=torch.float64))
    dyn(torch.tensor([[0.0, 2.0]]))
    assert dyn.class_weights[0] > 0.5  # class 0 has no loss left: it is weighted up, not down
    dyn(torch.tensor([[5.0, 0.0]]))
    dyn(torch.tensor([[5.0, 0.0]]))
    assert dyn.class_weights[0] < 0.5


def test_float32_losses_give_float32_loss_and_reference_values():
    dyn, ref = DynamicClassWeights(4), Reference(4)
    for losses in _batches(3, dtype=torch.float32):
        w = ref.step(losses)
        got = dyn(losses)
        assert got.dtype == torch.float32 and dyn.weights(losses).dtype == torch.float32
        torch.testing.assert_close(got.double(), ref.loss(losses.double(), w), rtol=1e-6, atol=0)


def test_mask_leaves_elements_out_and_a_class_without_any_keeps_its_running_loss():
    dyn, ref = DynamicClassWeights(4, smoothing=0.3), Reference(4, 0.3)
    g = torch.Generator().manual_seed(3)
    for losses in _batches(4, seed=1):
        mask = torch.rand(losses.shape, generator=g) < 0.6
        mask[:, 2] = False  # class 2 never labelled
        losses = torch.where(mask, losses, torch.full_like(losses, float("nan")))  # masked values are not read
        w = ref.step(losses, mask)
        torch.testing.assert_close(dyn(losses, mask=mask), ref.loss(losses, w, mask), rtol=1e-12, atol=0)
        assert (dyn.weights(losses, mask=mask)[~mask] == 0).all()
    assert dyn.running_losses[2] == 0.25  # untouched: 1 / C


def test_leading_dimensions_are_flattened():
    dyn, ref = DynamicClassWeights(4), Reference(4)
    losses = _batches(1, n=6)[0]
    w = ref.step(losses)
    torch.testing.assert_close(dyn(losses.reshape(2, 3, 4)), ref.loss(losses, w), rtol=1e-12, atol=0)


def test_with_the_multilabel_focal_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 3, dtype=torch.float64, requires_grad=True), (torch.rand(16, 3) < 0.3).double()
    p = torch.sigmoid(logits)
    pt = p * targets + (1 - p) * (1 - targets)
    focal = -(1 - pt) ** 2 * torch.log(pt)  # the official form: alpha = 1, gamma = 2
    elementwise = xe.losses.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0)
    torch.testing.assert_close(elementwise, focal)
    dyn, ref = DynamicClassWeights(3), Reference(3)
    torch.testing.assert_close(dyn(elementwise), ref.loss(focal, ref.step(focal)), rtol=1e-12, atol=0)


# -- the state contract ------------------------------------------------------------------------------------------
def test_weights_peeks_at_the_step_without_taking_it():
    dyn = DynamicClassWeights(4)
    for losses in _batches(3):
        before = dyn.state_dict()
        peek = dyn.weights(losses)
        assert torch.equal(dyn.running_losses, before["running_losses"]) and dyn.num_steps == before["num_steps"]
        losses.requires_grad_(True)
        (g,) = torch.autograd.grad(dyn(losses), losses)
        torch.testing.assert_close(g * losses.numel(), peek, rtol=1e-12, atol=0)  # the weights __call__ applied


def test_one_update_per_call_and_per_update():
    dyn, ref = DynamicClassWeights(4), Reference(4)
    for i, losses in enumerate(_batches(4)):
        if i % 2:
            dyn.update(losses)
        else:
            dyn(losses)
        ref.step(losses)
        assert dyn.num_steps == i + 1
    torch.testing.assert_close(dyn.class_weights, ref.weights(), rtol=1e-12, atol=0)


def test_eval_mode_freezes_the_weights_and_train_resumes():
    dyn, ref = DynamicClassWeights(4), Reference(4)
    first, second = _batches(2)
    dyn(first)
    w = ref.step(first)
    frozen = copy.deepcopy(dyn.state_dict())
    assert dyn.eval() is dyn and not dyn.training
    torch.testing.assert_close(dyn(second), ref.loss(second, w), rtol=1e-12, atol=0)  # current weights
    torch.testing.assert_close(dyn.weights(second), w.expand(6, 4), rtol=1e-12, atol=0)
    dyn.update(second)
    assert dyn.num_steps == 1 and torch.equal(dyn.running_losses, frozen["running_losses"])
    dyn.train()
    torch.testing.assert_close(dyn(second), ref.loss(second, ref.step(second)), rtol=1e-12, atol=0)
    assert dyn.num_steps == 2


def test_state_dict_round_trip_continues_the_same_run():
    dyn = DynamicClassWeights(4, smoothing=0.2)
    batches = _batches(6)
    for losses in batches[:3]:
        dyn(losses)
    state = dyn.state_dict()
    assert set(state) == {"running_losses", "num_steps"} and state["num_steps"] == 3
    assert state["running_losses"].dtype == torch.float64
    restored = DynamicClassWeights(4, smoothing=0.2)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    for losses in batches[3:]:
        assert torch.equal(restored(losses), dyn(losses))
    assert torch.equal(restored.running_losses, dyn.running_losses)
    state["running_losses"][0] = 100.0  # the state dict is a copy
    assert dyn.running_losses[0] != 100.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_advances_on_its_own(how):
    original = DynamicClassWeights(4)
    first, second, third = _batches(3)
    original(first)
    duplicate = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    frozen = original.state_dict()
    duplicate(second)
    assert torch.equal(original.running_losses, frozen["running_losses"]) and original.num_steps == 1
    original(second)
    assert torch.equal(original.running_losses, duplicate.running_losses)
    duplicate.eval()
    assert original.training
    original(third)
    assert duplicate.num_steps == 2


def test_bad_arguments_and_state_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        DynamicClassWeights(0)
    with pytest.raises(ValueError, match="smoothing"):
        DynamicClassWeights(3, smoothing=0.0)
    with pytest.raises(ValueError, match="eps"):
        DynamicClassWeights(3, eps=0.0)
    dyn = DynamicClassWeights(3)
    with pytest.raises(ValueError, match="C = 3"):
        dyn(torch.rand(4, 2))
    with pytest.raises(TypeError, match="floating point"):
        dyn(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="class 1 are not finite"):
        dyn(torch.tensor([[0.1, float("inf"), 0.2]]))
    assert dyn.num_steps == 0
    with pytest.raises(ValueError, match="running_losses must have 3"):
        dyn.load_state_dict({"running_losses": torch.ones(2), "num_steps": 0})
    with pytest.raises(ValueError, match="num_steps"):
        dyn.load_state_dict({"running_losses": torch.ones(3), "num_steps": -1})


# -- data parallelism: two gloo ranks with unequal batches equal one process on the whole batch ---------------
SIZES = (5, 2)


def _distributed_case(rank, world):
    full = _batches(3, n=sum(SIZES), seed=7)
    mask = torch.rand(sum(SIZES), 4, generator=torch.Generator().manual_seed(1)) < 0.7
    start, stop = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    dyn, ref = DynamicClassWeights(4, smoothing=0.3), Reference(4, 0.3)
    for losses in full:
        w = ref.step(losses, mask)
        local = dyn(losses[start:stop], mask=mask[start:stop])
        # averaging the ranks' losses (as data parallelism averages gradients) gives the global mean
        mean = local.detach().clone()
        torch.distributed.all_reduce(mean)
        torch.testing.assert_close(mean / world, ref.loss(losses, w, mask), rtol=1e-12, atol=0)
        torch.testing.assert_close(dyn.class_weights, w, rtol=1e-12, atol=0)  # the same state on every rank
    dyn.eval()
    if rank == 0:  # eval mode exchanges nothing: one rank alone does not wait for the other
        local = full[0][start:stop]
        torch.testing.assert_close(dyn(local), ref.loss(local, ref.weights()), rtol=1e-12, atol=0)
    torch.distributed.barrier()


def test_data_parallel_ranks_share_the_state_and_the_global_mean():
    check(run_cases(2, {"dynamic": _distributed_case}, timeout=90, gloo_timeout=15), "dynamic")


# -- threshold search ---------------------------------------------------------------------------------------------
def _brute_force(scores, labels):
    """Every candidate threshold of every class (each distinct score, and +inf); the best F1, the lowest
    threshold reaching it."""
    thresholds, best = [], []
    for c in range(scores.shape[1]):
        candidates = sorted(set(scores[:, c].tolist())) + [float("inf")]
        f1 = [f1_per_class((scores[:, c] >= t).unsqueeze(1), labels[:, c : c + 1])[0].item() for t in candidates]
        top = max(f1)
        thresholds.append(float("inf") if top == 0 else min(t for t, v in zip(candidates, f1) if v == top))
        best.append(top)
    return torch.tensor(thresholds, dtype=torch.float64), torch.tensor(best, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 25),
    c=st.integers(1, 4),
    levels=st.sampled_from([3, 1000]),  # few levels: many ties
    positive_rate=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_threshold_search_equals_brute_force(n, c, levels, positive_rate, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n, c), generator=g).double() / levels
    labels = torch.rand(n, c, generator=g) < positive_rate
    thresholds, best = best_f1_thresholds(scores, labels)
    want_t, want_f1 = _brute_force(scores, labels)
    torch.testing.assert_close(best, want_f1, rtol=1e-12, atol=0)
    torch.testing.assert_close(thresholds, want_t, rtol=0, atol=0)
    assert macro_f1(scores, labels, thresholds) == pytest.approx(want_f1.mean().item(), abs=1e-12)


def test_threshold_edge_cases():
    labels = torch.tensor([[0, 1], [0, 0], [0, 1]])
    scores = torch.tensor([[0.9, 0.3], [0.8, 0.3], [0.1, 0.3]])  # class 0: no positive; class 1: all tied
    thresholds, f1 = best_f1_thresholds(scores, labels)
    assert thresholds[0] == float("inf") and f1[0] == 0  # predict none
    assert thresholds[1] == pytest.approx(0.3) and f1[1] == pytest.approx(2 * 2 / (3 + 2))  # all in
    assert macro_f1(scores, labels, thresholds) == pytest.approx(0.4)
    empty_t, empty_f1 = best_f1_thresholds(torch.zeros(0, 2), torch.zeros(0, 2))
    assert torch.isinf(empty_t).all() and (empty_f1 == 0).all()
    logits = torch.tensor([[-30.0], [-31.0]])  # any monotone score: logits work as well as probabilities
    assert best_f1_thresholds(logits, torch.tensor([[1], [0]]))[0].item() == -30.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="NaN"):
        best_f1_thresholds(torch.tensor([[0.1], [float("nan")]]), torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="0/1"):
        macro_f1(torch.rand(2, 2), torch.tensor([[2, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        macro_f1(torch.rand(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="thresholds"):
        macro_f1(torch.rand(2, 2), torch.ones(2, 2), torch.tensor([0.5, 0.5, 0.5]))
