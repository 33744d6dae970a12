"""What the Triton backend's gradient filter (``filter_eps``) costs in accuracy.

The filter skips a ``[block_n, block_v]`` tile of the backward pass when every entry of ``dL/dz`` is
below ``filter_eps`` times its row's upstream gradient (for mean CE: ``|p_ij - 1[j = y_i]| < eps``
everywhere on the tile). This script measures, per ``eps``, the share of tiles skipped and the error
of ``grad_e`` / ``grad_c`` against the exact gradient (``||g - exact|| / ||exact||``; also the largest
entry error over the largest entry, and the error of the skipped classes' rows of ``grad_c``).

Two engines:

* ``--engine emulate`` (default): the filter applied to the exact float64 logit gradient in PyTorch,
  tile by tile with the kernel's rule, on CPU at any size (the kernel's skipped tiles contribute
  exactly nothing, which ``tests/test_triton.py::test_filter_eps`` checks);
* ``--engine triton``: the kernel itself (on CPU under ``TRITON_INTERPRET=1``: small shapes only),
  against the same float64 reference; ``--check`` runs both and asserts they agree.

    PYTHONPATH=src python benchmarks/bench_triton_filter.py --n 512 --d 256 --v 256000
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_triton_filter.py --engine triton --check \\
        --n 96 --d 32 --v 4096 --block-n 32 --block-v 128

Data: logits shaped like a language model's head (``gpu_check.lm_like``: a Zipf class prior, noise,
targets drawn from the prior and made likely; mean loss about 2.3 nats at V=256000), float32 inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import lm_like  # noqa: E402

import crossent as xe  # noqa: E402
from crossent._engine.options import LinearCrossEntropyOptions  # noqa: E402

EPS = (2.0**-16, 2.0**-12, 2.0**-10, 2.0**-7, 2.0**-5)


def exact(e, c, t):
    """``(dL/dz, grad_e, grad_c)`` of mean CE in float64."""
    z = e.double() @ c.double().T
    dz = torch.softmax(z, -1)
    dz[torch.arange(len(t)), t] -= 1
    dz /= len(t)
    return dz, dz @ c.double(), dz.T @ e.double()


def skipped_tiles(dz: torch.Tensor, eps: float, block_n: int, block_v: int, row_scale: float) -> torch.Tensor:
    """``[row blocks, vocabulary tiles]`` bool: the kernel's rule, max |dz| < eps * |upstream| on the tile."""
    n, v = dz.shape
    pad = torch.nn.functional.pad(dz.abs(), (0, -v % block_v, 0, -n % block_n))
    tile_max = pad.reshape(pad.shape[0] // block_n, block_n, -1, block_v).amax(dim=(1, 3))
    return tile_max < eps * row_scale


def emulate(dz, e, c, eps, block_n, block_v):
    skip = skipped_tiles(dz, eps, block_n, block_v, 1.0 / dz.shape[0])
    mask = skip.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[: dz.shape[0], : dz.shape[1]]
    kept = dz.masked_fill(mask, 0.0)
    return skip, kept @ c.double(), kept.T @ e.double()


def kernel(e, c, t, eps):
    le, lc = e.clone().requires_grad_(), c.clone().requires_grad_()
    opts = LinearCrossEntropyOptions(backend="triton", filter_eps=eps)
    loss = xe.linear_cross_entropy(le, lc, t, options=opts)
    return torch.autograd.grad(loss, (le, lc))


def errors(ge, gc, ref_e, ref_c, rare):
    def fro(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    return {
        "grad_e": fro(ge, ref_e),
        "grad_c": fro(gc, ref_c),
        "grad_c_max": ((gc.double() - ref_c).abs().max() / ref_c.abs().max()).item(),
        "grad_c_rare": fro(gc[rare], ref_c[rare]) if rare.any() else 0.0,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("emulate", "triton"), default="emulate")
    p.add_argument("--check", action="store_true", help="with --engine triton: also emulate and compare")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=256000)
    p.add_argument("--block-n", type=int, default=128, help="rows per tile (GPU half precision: 128)")
    p.add_argument("--block-v", type=int, default=128, help="classes per tile (GPU: 128)")
    p.add_argument("--eps", type=float, nargs="*", default=list(EPS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = "cuda" if args.engine == "triton" and torch.cuda.is_available() else "cpu"
    e, c, t = lm_like(args.n, args.d, args.v, torch.float32, seed=args.seed, device=device)
    dz, ref_e, ref_c = exact(e, c, t)
    rare = torch.ones(args.v, dtype=torch.bool, device=device)
    rare[t] = False  # classes no row targets: their gradient is only the (small) softmax
    p_target = dz[torch.arange(args.n), t] * args.n + 1
    print(f"N={args.n} D={args.d} V={args.v}, tiles {args.block_n}x{args.block_v}, engine {args.engine}, "
          f"median p_target {p_target.median().item():.3g}\n")  # fmt: skip
    print("| eps | tiles skipped | grad_e error | grad_c error | grad_c max error | grad_c error, untargeted classes |")
    print("|---|---|---|---|---|---|")
    for eps in args.eps:
        skip, ge, gc = emulate(dz, e, c, eps, args.block_n, args.block_v)
        if args.engine == "triton":
            ke, kc = kernel(e, c, t, eps)
            if args.check:
                torch.testing.assert_close(ke.double(), ge, rtol=1e-4, atol=1e-6 * ge.abs().max().item())
                torch.testing.assert_close(kc.double(), gc, rtol=1e-4, atol=1e-6 * gc.abs().max().item())
            ge, gc = ke, kc
        r = errors(ge, gc, ref_e, ref_c, rare)
        print(f"| 2^{torch.tensor(eps).log2().item():.0f} | {skip.float().mean().item():.1%} | {r['grad_e']:.2e} | "
              f"{r['grad_c']:.2e} | {r['grad_c_max']:.2e} | {r['grad_c_rare']:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
