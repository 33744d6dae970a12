"""GPU check of the Triton backend: agreement at scale, speed and memory against the peers, other losses.

Run by ``benchmarks/gpu_check.sh`` (which runs the GPU tests first); on its own:

    PYTHONPATH=src python benchmarks/gpu_check.py --out results/gpu_check [--budget 300]

Sections, each skipped once the time budget is spent (results are written after every section):

1. ``agreement``: N=8192, D=2304, V=256000 (Gemma 2 2B's head) in bfloat16 against a dense float32
   reference (TF32 off) formed from the same rounded inputs: relative error of the loss and of
   ``grad_e``/``grad_c`` (Frobenius norm of the difference over that of the reference, and the
   largest entry error over the largest entry) for crossent (``triton``, ``triton`` with
   ``filter_eps``, ``torch``) and each peer.
2. ``speed``: forward + backward time (median of ``--reps`` after two warm-up calls, CUDA events) and
   peak memory beyond the inputs (allocated bytes; also beyond inputs and gradients) for: crossent
   ``triton`` and ``torch``, Cut Cross-Entropy (``impl="cce"`` and its exact variant), Liger's fused
   linear cross-entropy, PyTorch's ``F.linear_cross_entropy``, ``torch.compile`` of the naive path and
   the naive path. A peer that is not installed (or fails) is reported as skipped, with the reason.
3. ``losses``: every streamable loss family of interest on the ``triton`` backend, time relative to CE.
4. ``agreement_losses``: those losses on the ``triton`` backend against the dense path on the same
   float32 logits, errors as in 1.
5. ``tiles``: CE on the ``triton`` backend with a few other tile shapes (for choosing defaults).

Synthetic data shaped like a language model's head (:func:`lm_like`): a Zipf class prior, noise, and
targets drawn from the prior and made likely (mean loss about 2.3 nats at V=256000).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import crossent as xe
from crossent._engine.options import LinearCrossEntropyOptions

GIB = 2**30


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.time(), budget

    def left(self) -> float:
        return self.budget - (time.time() - self.start)


def lm_like(n: int, d: int, v: int, dtype, seed: int = 0, device="cuda", noise: float = 2.0, boost: float = 8.0):
    """``(e, c, target)`` shaped like a language model's head.

    Logits ``e_i . c_j = log prior_j + noise + boost 1[j = y_i]`` (about): a Zipf class prior carried by
    a shared feature, noise of standard deviation ``noise``, targets drawn from the prior and lifted by
    ``boost``. At V=256000 the mean loss is about 2.3 nats and the median target probability 0.45.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    log_prior = -1.1 * torch.log(torch.arange(1, v + 1, device=device, dtype=torch.float32))
    log_prior -= torch.logsumexp(log_prior, 0)
    target = torch.multinomial(log_prior.exp(), n, replacement=True, generator=g)
    e = torch.randn(n, d, device=device, generator=g) * (noise / math.sqrt(d))
    c = torch.randn(v, d, device=device, generator=g)
    c_t = c[target]
    e += boost * c_t / c_t.pow(2).sum(1, keepdim=True)
    e[:, 0] = 1.0  # the shared feature: e_i0 c_j0 = log prior_j
    c[:, 0] = log_prior
    return e.to(dtype), c.to(dtype), target


# -- methods: (e, c, target) -> scalar mean loss ---------------------------------------------------------------


def naive(e, c, t):
    return F.cross_entropy((e @ c.T).float(), t)


def triton_loss(e, c, t, **kw):
    return xe.linear_cross_entropy(e, c, t, backend="triton", **kw)


def methods() -> dict:
    """Name -> callable or the reason it is skipped."""
    out: dict = {
        "crossent_triton": triton_loss,
        "crossent_torch": lambda e, c, t: xe.linear_cross_entropy(e, c, t, backend="torch"),
        "naive": naive,
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda e, c, t: cce(e, c, t, impl="cce")
        try:
            from cut_cross_entropy.cce_utils import CCEPresets  # noqa: F401 (releases with named presets)

            out["cce_exact"] = lambda e, c, t: cce(e, c, t, impl="cce_exact")
        except ImportError:  # older releases: the exact variant is the unfiltered gradient
            out["cce_exact"] = lambda e, c, t: cce(e, c, t, impl="cce", filter_eps=None)
    except Exception as err:  # noqa: BLE001 - any failure to load a peer is a reason to skip it
        out["cce"] = out["cce_exact"] = f"not available: {err!r}"
    try:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        except ImportError:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def liger(x, w, t):
                return LigerFusedLinearCrossEntropyFunction.apply(x, w, t)[0]

        out["liger"] = lambda e, c, t: liger(e, c, t)
    except Exception as err:  # noqa: BLE001
        out["liger"] = f"not available: {err!r}"
    if hasattr(F, "linear_cross_entropy"):
        out["torch_lce"] = lambda e, c, t: F.linear_cross_entropy(e, c, t)
    else:
        out["torch_lce"] = f"not in torch {torch.__version__}"
    out["naive_compile"] = torch.compile(naive)
    return out


# -- agreement ---------------------------------------------------------------------------------------------------


def _errors(loss, grads, ref_loss, ref_grads) -> dict:
    out = {"loss_rel": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
    for name, g, r in zip(("grad_e", "grad_c"), grads, ref_grads):
        diff = g.float() - r
        out[f"{name}_fro"] = (diff.norm() / r.norm()).item()
        out[f"{name}_max"] = (diff.abs().max() / r.abs().max()).item()
    return out


def _run(fn, e, c, t):
    le, lc = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    loss = fn(le, lc, t)
    grads = torch.autograd.grad(loss, (le, lc))
    return loss.detach(), grads


def agreement(args, clock, results):
    torch.backends.cuda.matmul.allow_tf32 = False
    e, c, t = lm_like(args.n, args.d, args.v, torch.bfloat16)
    e32, c32 = e.float().requires_grad_(), c.float().requires_grad_()
    logits = e32 @ c32.T
    ref = F.cross_entropy(logits, t)
    ref_grads = [g.detach() for g in torch.autograd.grad(ref, (e32, c32))]
    p_target = logits.detach().log_softmax(-1).gather(1, t[:, None]).exp()
    del logits
    rows = results.setdefault("agreement", {})
    rows["_reference"] = {"loss": ref.item(), "p_target_median": p_target.median().item()}
    cands = dict(methods())
    for eps in args.filter_eps:
        opts = LinearCrossEntropyOptions(backend="triton", filter_eps=eps)
        cands[f"crossent_triton_filter_{eps:g}"] = partial(triton_loss, options=opts)
    for name, fn in cands.items():
        if clock.left() < 60:
            rows[name] = "skipped: time budget"
            continue
        if isinstance(fn, str):
            rows[name] = fn
            continue
        try:
            loss, grads = _run(fn, e, c, t)
            rows[name] = _errors(loss, grads, ref, ref_grads)
        except Exception as err:  # noqa: BLE001
            rows[name] = f"failed: {err!r}"
            traceback.print_exc()
        print(name, rows[name], flush=True)
        torch.cuda.empty_cache()


def agreement_losses(args, clock, results):
    """Other losses of the triton backend against the dense path on the same float32 logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    e, c, t = lm_like(args.n, args.d, args.v, torch.bfloat16)
    e32, c32 = e.float(), c.float()
    logits = e32 @ c32.T
    others = results.setdefault("agreement_losses", {})
    for name, kw in LOSSES.items():
        if name == "ce" or clock.left() < 60:
            continue
        try:
            z = logits.clone().requires_grad_()
            dense = xe.cross_entropy(z, t, **kw)
            (gz,) = torch.autograd.grad(dense, z)
            ref_e, ref_c = (gz @ c32, gz.T @ e32)
            del z, gz
            loss, grads = _run(partial(triton_loss, **kw), e, c, t)
            others[name] = _errors(loss, grads, dense.detach(), (ref_e, ref_c))
        except Exception as err:  # noqa: BLE001
            others[name] = f"failed: {err!r}"
            traceback.print_exc()
        print(name, others[name], flush=True)
        torch.cuda.empty_cache()


# -- speed and memory --------------------------------------------------------------------------------------------


def measure(fn, e, c, t, reps: int) -> dict:
    le, lc = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    for _ in range(2):  # compilation, autotuning, allocator warm-up
        fn(le, lc, t).backward()
        le.grad = lc.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(le, lc, t).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        le.grad = lc.grad = None
    peak = torch.cuda.max_memory_allocated() - base
    grads = le.numel() * le.element_size() + lc.numel() * lc.element_size()
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "peak_gib": peak / GIB,
        "peak_beyond_grads_gib": (peak - grads) / GIB,
    }


def speed(args, clock, results):
    e, c, t = lm_like(args.n, args.d, args.v, torch.bfloat16, seed=1)
    rows = results.setdefault("speed", {})
    for name, fn in methods().items():
        if isinstance(fn, str):
            rows[name] = fn
        elif clock.left() < 45:
            rows[name] = "skipped: time budget"
        else:
            try:
                rows[name] = measure(fn, e, c, t, args.reps)
            except Exception as err:  # noqa: BLE001
                rows[name] = f"failed: {err!r}"
                traceback.print_exc()
        print(name, rows[name], flush=True)
        torch.cuda.empty_cache()


LOSSES = {
    "ce": {},
    "label_smoothing_z_loss": {"label_smoothing": 0.1, "z_loss": 1e-4},
    "softcap_30": {"softcap": 30.0},
    "focal": {"loss": "focal"},
    "poly1": {"loss": "poly1"},
    "squentropy": {"loss": "squentropy"},
    "nce": {"loss": "nce"},
    "ngce": {"loss": "ngce"},
    "ldr_kl": {"loss": "ldr_kl"},
    "circle": {"loss": "circle"},
}


def losses(args, clock, results):
    e, c, t = lm_like(args.n, args.d, args.v, torch.bfloat16, seed=2)
    rows = results.setdefault("losses", {})
    for name, kw in LOSSES.items():
        if clock.left() < 30:
            rows[name] = "skipped: time budget"
            continue
        try:
            rows[name] = measure(partial(triton_loss, **kw), e, c, t, args.reps)
        except Exception as err:  # noqa: BLE001
            rows[name] = f"failed: {err!r}"
            traceback.print_exc()
        if isinstance(rows[name], dict) and isinstance(rows.get("ce"), dict):
            rows[name]["x_ce"] = rows[name]["ms"] / rows["ce"]["ms"]
        print(name, rows[name], flush=True)


def tiles(args, clock, results):
    from crossent._engine.triton import config

    default, per_sm = config.HALF, config.PROGRAMS_PER_SM
    shapes = {  # name -> (launch for half precision, forward programs per SM)
        "default": (default, per_sm),
        "bwd_64x128_w4": (default.replace(backward=config.Tiles(64, 128, 32, 4, 3)), per_sm),
        "bwd_128x64_w4": (default.replace(backward=config.Tiles(128, 64, 64, 4, 3)), per_sm),
        "bwd_128x128_w8_s4_dg128": (
            default.replace(backward=config.Tiles(128, 128, 64, 8, 4), grad_block_d=128),
            per_sm,
        ),
        "fwd_128x256_w8": (default.replace(forward=config.Tiles(128, 256, 32, 8, 3)), per_sm),
        "fwd_64x128_w4_s4": (default.replace(forward=config.Tiles(64, 128, 64, 4, 4)), per_sm),
        "fwd_programs_x2": (default, 2 * per_sm),
    }
    e, c, t = lm_like(args.n, args.d, args.v, torch.bfloat16, seed=3)
    rows = results.setdefault("tiles", {})
    try:
        for name, (launch, programs) in shapes.items():
            if clock.left() < 30:
                rows[name] = "skipped: time budget"
                continue
            config.HALF, config.PROGRAMS_PER_SM = launch, programs
            try:
                rows[name] = measure(triton_loss, e, c, t, args.reps)
            except Exception as err:  # noqa: BLE001
                rows[name] = f"failed: {err!r}"
            print(name, rows[name], flush=True)
    finally:
        config.HALF, config.PROGRAMS_PER_SM = default, per_sm


# -- report ------------------------------------------------------------------------------------------------------


def report(results: dict) -> str:
    lines = [f"# Triton backend GPU check\n\n{results.get('env', {})}\n"]
    for section, rows in results.items():
        if section == "env" or not isinstance(rows, dict):
            continue
        lines.append(f"\n## {section}\n")
        keys = sorted({k for r in rows.values() if isinstance(r, dict) for k in r})
        lines.append("| method | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for name, r in rows.items():
            if isinstance(r, dict):
                cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            else:
                cells = [str(r)] + [""] * (len(keys) - 1)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--v", type=int, default=256000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=300.0, help="seconds for all sections")
    p.add_argument("--filter-eps", type=float, nargs="*", default=[2.0**-12, 2.0**-7])
    p.add_argument("--sections", nargs="*", default=["agreement", "speed", "losses", "agreement_losses", "tiles"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    import triton

    results: dict = {
        "env": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "shape": f"N={args.n} D={args.d} V={args.v} bfloat16",
            "command": " ".join(sys.argv),
        }
    }
    for section in args.sections:
        if clock.left() < 30:
            results[section] = "skipped: time budget"
            continue
        t0 = time.time()
        try:
            globals()[section](args, clock, results)
        except Exception as err:  # noqa: BLE001
            results[section] = f"failed: {err!r}"
            traceback.print_exc()
        print(f"== {section}: {time.time() - t0:.0f} s", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "report.md").write_text(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
