"""Bad or unusual input: a named error, or PyTorch's answer, never a silent wrong one.

* Unsigned targets: ``uint8`` classes are read as the integers they are (PyTorch accepts ``uint8``);
  ``ignore_index=-100`` no longer wraps around to class 156. Bool targets are refused everywhere.
* Hyperparameters and options that were accepted and gave NaN: each now raises, naming the argument
  (``softcap=math.inf`` is the limit of the cap, no capping, equal to ``softcap=None``).
* 'meta' tensors (no data: deferred initialisation, shape propagation) work on both entry points,
  with the shapes and dtypes PyTorch gives.
* Vocab-parallel arguments and ``shift=True`` with a 0-dim target get named errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent as xe
from crossent.calibration import TemperatureScaling
from crossent.distributed import vocab_parallel_cross_entropy
from crossent.weighting import DoReMi, LossReweighting

g = torch.Generator().manual_seed(0)


# -- targets ------------------------------------------------------------------------------------------


def test_uint8_targets_are_the_classes_they_hold():
    # C = 300: class 156 is what -100 wraps to in uint8, class 200 is beyond 300 wrapped to 44.
    x = torch.randn(4, 300, generator=g, dtype=torch.float64)
    y = torch.tensor([200, 156, 3, 255], dtype=torch.uint8)
    ref = F.cross_entropy(x, y.long(), reduction="none")
    torch.testing.assert_close(F.cross_entropy(x, y, reduction="none"), ref)  # PyTorch reads them so too
    torch.testing.assert_close(xe.cross_entropy(x, y, reduction="none"), ref)
    e, c = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(300, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(xe.linear_cross_entropy(e, c, y, reduction="none"), F.cross_entropy(e @ c.T, y.long(), reduction="none"))
    torch.testing.assert_close(vocab_parallel_cross_entropy(x, y, vocab_start=0, reduction="none"), ref)


def test_bool_targets_are_refused_everywhere():
    y = torch.tensor([True, False])
    with pytest.raises(TypeError, match="integer class indices.*torch.bool"):
        xe.cross_entropy(torch.randn(2, 3), y)
    with pytest.raises(TypeError, match="integer class indices.*torch.bool"):
        xe.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), y)
    with pytest.raises(TypeError, match="integer class indices.*torch.bool"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), y, vocab_start=0)


# -- hyperparameters and options ------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.1])
def test_z_loss_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match="z_loss"):
        xe.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), z_loss=value)
    with pytest.raises(ValueError, match="z_loss"):
        xe.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), z_loss=value)
    with pytest.raises(ValueError, match="z_loss: scale"):
        xe.losses.ZLoss(value)


def test_softcap_infinity_is_no_capping_and_other_bad_caps_raise():
    x, y = torch.randn(5, 7, generator=g), torch.randint(0, 7, (5,), generator=g)
    torch.testing.assert_close(xe.cross_entropy(x, y, softcap=math.inf), xe.cross_entropy(x, y))
    e, c = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    torch.testing.assert_close(xe.linear_cross_entropy(e, c, y, softcap=math.inf), xe.linear_cross_entropy(e, c, y))
    torch.testing.assert_close(vocab_parallel_cross_entropy(x, y, vocab_start=0, softcap=math.inf), xe.cross_entropy(x, y))
    for bad, match in [(math.nan, "finite"), (0.0, "> 0"), (-1.0, "> 0"), ("2", "real number")]:
        with pytest.raises((ValueError, TypeError), match=f"softcap.*{match}"):
            xe.cross_entropy(x, y, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be finite"):
        xe.transforms.Softcap(math.inf)  # the transform itself: a finite cap


def test_sigmoid_focal_alpha_must_be_a_weight_or_negative():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        xe.losses.get("sigmoid_focal", alpha=2.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        xe.losses.sigmoid_focal_loss(torch.randn(3), torch.ones(3), alpha=1.5)
    assert xe.losses.get("sigmoid_focal", alpha=-1.0).alpha == -1.0  # no weighting, as torchvision


@pytest.mark.parametrize("name", ["nce", "ngce", "apl", "nmae", "nfl"])
def test_normalised_losses_need_two_classes(name):
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        xe.cross_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), loss=name)


@pytest.mark.parametrize("sigma_ratio", [math.inf, math.nan, 0.0])
def test_hl_gauss_sigma_ratio(sigma_ratio):
    with pytest.raises(ValueError, match="sigma_ratio"):
        xe.targets.hl_gauss(torch.randn(4), 0.0, 1.0, 10, sigma_ratio=sigma_ratio)


def test_temperature_fit_refuses_non_finite_logits():
    logits = torch.randn(6, 3, generator=g)
    logits[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"logits\[2, 1\] = nan"):
        TemperatureScaling().fit(logits, torch.zeros(6, dtype=torch.long))


def test_doremi_state_is_checked():
    good = DoReMi(3).state_dict()
    for key, bad, match in [
        ("domain_weights", torch.tensor([0.5, -0.1, 0.6], dtype=torch.float64), "non-negative|positive"),
        ("average_weights", torch.tensor([0.5, math.nan, 0.5], dtype=torch.float64), "finite"),
        ("scores", torch.tensor([0.0, math.inf, 0.0], dtype=torch.float64), "finite"),
        ("domain_weights", torch.ones(4, dtype=torch.float64), "3 entries"),
        ("counter", -2, "counter must be an integer >= 1"),
        ("counter", 1.5, "counter must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            DoReMi(3).load_state_dict({**good, key: bad})
    fresh = DoReMi(3)
    fresh.load_state_dict(good)
    torch.testing.assert_close(fresh.domain_weights, DoReMi(3).domain_weights)


def test_loss_reweighting_state_is_checked():
    for bad in (-1, 2.5, "3", math.nan):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
            LossReweighting().load_state_dict({"num_steps": bad})
    rw = LossReweighting()
    rw.load_state_dict({"num_steps": torch.tensor(7)})
    assert rw.num_steps == 7


# -- meta tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "weight": "w"}, {"loss": "focal"}, {"loss": "nfl"}], ids=str)
def test_cross_entropy_on_meta_tensors(kw):
    kw = {k: (torch.ones(5, device="meta") if v == "w" else v) for k, v in kw.items()}
    x = torch.randn(4, 5, 3, device="meta", requires_grad=True)
    y = torch.zeros(4, 3, dtype=torch.long, device="meta")
    out = xe.cross_entropy(x, y, **kw)
    ref = F.cross_entropy(torch.randn(4, 5, 3, device="meta"), y, reduction=kw.get("reduction", "mean"))
    assert out.device.type == "meta" and out.shape == ref.shape and out.dtype == ref.dtype
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.device.type == "meta" and gx.shape == x.shape
    q = torch.rand(4, 5, device="meta")
    assert xe.cross_entropy(torch.randn(4, 5, device="meta"), q).shape == ()


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"shift": True, "reduction": "none"}, {"return_stats": True}], ids=str)
def test_linear_cross_entropy_on_meta_tensors(kw):
    e = torch.randn(2, 6, 3, device="meta", requires_grad=True)
    c = torch.randn(5, 3, device="meta", requires_grad=True)
    y = torch.zeros(2, 6, dtype=torch.long, device="meta")
    out = xe.linear_cross_entropy(e, c, y, bias=torch.zeros(5, device="meta"), **kw)
    loss = out[0] if kw.get("return_stats") else out
    expected = {"none": (2, 5) if kw.get("shift") else (2, 6)}.get(kw.get("reduction"), ())
    assert loss.device.type == "meta" and loss.shape == expected and loss.dtype == torch.float32
    ge, gc = torch.autograd.grad(loss.sum(), (e, c))
    assert ge.shape == e.shape and gc.shape == c.shape
    if kw.get("return_stats"):
        assert out[1].lse.shape == out[1].argmax.shape == (2, 6)


# -- vocab-parallel and shift arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, target, kw, err, match",
    [
        (torch.tensor(1.0), torch.tensor(0), {"vocab_start": 0}, ValueError, "class dimension"),
        ([[1.0, 2.0]], torch.tensor([0]), {"vocab_start": 0}, TypeError, "logits must be a tensor, got list"),
        (torch.randn(2, 3), torch.tensor([0, 1]), {"vocab_start": None}, TypeError, "vocab_start must be an int, got NoneType"),
        (torch.randn(2, 3), torch.tensor([0, 1]), {"vocab_start": 0.0}, TypeError, "vocab_start must be an int, got float"),
        (torch.randn(2, 3), torch.tensor([0, 1]), {"vocab_start": -1}, ValueError, "vocab_start must be >= 0"),
        (torch.randn(2, 3), torch.tensor([0, 1]), {"vocab_start": 0, "softcap": math.nan}, ValueError, "softcap"),
    ],
)
def test_vocab_parallel_argument_errors(logits, target, kw, err, match):
    with pytest.raises(err, match=match):
        vocab_parallel_cross_entropy(logits, target, **kw)


def test_shift_with_a_zero_dim_target():
    with pytest.raises(ValueError, match=r"shift=True needs a sequence dimension .* got shape \(\)"):
        xe.linear_cross_entropy(torch.randn(3), torch.randn(5, 3), torch.tensor(1), shift=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_argument_checks_do_not_synchronise_with_the_device():
    from crossent import _validation as V

    target = torch.tensor([0, 3, -100, 2], device="cuda")
    weight = torch.tensor([1.0, -2.0, 0.5, 3.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        V.check_index_target(target, 4, -100, target.shape)
        V.check_class_weight(weight, 4, target.device, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
