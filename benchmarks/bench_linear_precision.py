"""How far half-precision ``grad_c`` is from exact, by accumulator and chunk count.

``linear_cross_entropy`` with bfloat16 inputs adds one ``[chunk, V]`` product per chunk into ``grad_c``.
With the default float32 accumulator the rounding does not grow with the number of chunks; with
``accum_dtype=torch.bfloat16`` each chunk adds a rounding to bfloat16. This script measures the
relative error of ``grad_c`` (Frobenius norm, and largest entry) against a float64 evaluation of the
same rounded inputs, next to the naive bfloat16 path (one product over all rows) and to the exact
result rounded to bfloat16 (the best any bfloat16 gradient can do).

    python benchmarks/bench_linear_precision.py                     # V=8192, D=256, N in {4096, 32768}
    python benchmarks/bench_linear_precision.py --tokens 1024 8192 --vocab 4096
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import crossent as xe


def relative_errors(grad: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = grad.double() - exact
    return (diff.norm() / exact.norm()).item(), (diff.abs().max() / exact.abs().max()).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    results = {}
    print(f"V={args.vocab} D={args.hidden} {args.dtype}, chunks of {args.chunk_size} rows; grad_c error (norm, max)")
    for n in args.tokens:
        e = (torch.randn(n, args.hidden, generator=g) * 0.5).to(dtype)
        c = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(dtype)
        t = torch.randint(0, args.vocab, (n,), generator=g)
        c64 = c.double().requires_grad_()
        F.cross_entropy(e.double() @ c64.T, t).backward()
        exact = c64.grad
        row = {}
        for name, accum in (("float32 accumulator", torch.float32), (f"{args.dtype} accumulator", dtype)):
            leaf = c.clone().requires_grad_()
            xe.linear_cross_entropy(e, leaf, t, accum_dtype=accum, chunk_size=args.chunk_size).backward()
            row[name] = relative_errors(leaf.grad, exact)
        leaf = c.clone().requires_grad_()
        F.cross_entropy((e @ leaf.T).float(), t).backward()
        row["naive path"] = relative_errors(leaf.grad, exact)
        row["exact, rounded"] = relative_errors(exact.to(dtype), exact)
        results[n] = row
        chunks = -(-n // args.chunk_size)
        print(f"N={n} ({chunks} chunks): " + ", ".join(f"{k} {a:.1e} ({b:.1e})" for k, (a, b) in row.items()))
    return results


if __name__ == "__main__":
    main()
