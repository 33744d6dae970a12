"""One benchmark configuration, in a fresh process: ``python -m crossent_harness.bench._linear_worker SPEC``.

SPEC is a JSON object (method, n, d, v, dtype, device, warmup, repeats, threads, seed). Prints one JSON
line (strict JSON: a NaN loss is null): the median and every timing of forward + backward, the step's peak memory, and the loss (a
cross-check between methods).

Memory, the figure that is compared: the most bytes one step held at once beyond its inputs
(``peak_live_bytes``; the gradients, which every method must produce, are counted in it and also
reported apart as ``grad_bytes``). On CPU it comes from one extra, untimed step whose allocations and
frees PyTorch's allocator reports to the profiler (:func:`crossent_harness.bench.memory.allocator_peak`: exact,
fused operators and compiled code included); on CUDA from the allocator's statistics over the timed
steps (``torch.cuda.max_memory_allocated`` less what was allocated before them).

RSS, a secondary figure: the growth of the peak resident set over the timed steps (after the warm-up
steps, which also compile what ``torch.compile`` compiles, and a reset of the kernel's mark through
``/proc/self/clear_refs``). It is never below zero, but the allocator's reuse of memory the warm-up freed
makes it an underestimate, and at small shapes it says little. With ``warmup = 0`` the first timed step
is the process's first call and the exact accounting's step runs after the timed ones, so the RSS
figure includes what the first call imports and initialises (modules, the BLAS library's buffers).
"""

from __future__ import annotations

import gc
import json
import sys
import time

from ..records import strict_json
from .rss import reset_peak as _reset_peak
from .rss import status_kib as _rss_kib


def _method(name: str, spec: dict):
    """A function ``(e, c, t) -> loss`` (``None`` for the matrix-product floor, which runs no autograd)."""
    import torch
    import torch.nn.functional as F

    half = spec["dtype"] != "float32"

    def naive(e, c, t):
        z = e @ c.T
        return F.cross_entropy(z.float() if half else z, t)

    if name == "naive":
        return naive
    if name == "naive_compile":
        return torch.compile(naive)
    if name in ("floor", "floor_t"):
        # floor: grad_c = z.T @ e; floor_t: its transpose e.T @ z with both operands row-major, the
        # faster layout on CPUs with bfloat16 matrix units. Ratios use the faster of the two.
        transposed = name == "floor_t"

        def floor(e, c, t):
            with torch.no_grad():
                z = e @ c.T
                return (z @ c, e.T.contiguous() @ z if transposed else z.T @ e)

        return floor
    if name.startswith("torch_lce"):
        if not hasattr(F, "linear_cross_entropy"):
            raise RuntimeError(f"torch {torch.__version__} has no F.linear_cross_entropy")
        options = None
        if name == "torch_lce_auto":
            options = torch.nn.LinearCrossEntropyOptions()
        elif name.startswith("torch_lce_"):
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=int(name.rsplit("_", 1)[1]))
        return lambda e, c, t: F.linear_cross_entropy(e, c, t, options=options)
    if name == "cce_compile":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda e, c, t: cce(e, c, t, impl="torch_compile")
    if name.startswith("crossent"):
        import crossent as xe

        from .linear import loss_kwargs

        if name == "crossent_ce_accum_input":
            kw = {"accum_dtype": getattr(torch, spec["dtype"])}
        else:
            kw = loss_kwargs()[name.removeprefix("crossent_")]
        chunk = spec.get("chunk_size")
        return lambda e, c, t: xe.linear_cross_entropy(e, c, t, chunk_size=chunk, **kw)
    raise ValueError(f"unknown method {name!r}")


def measure(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    n, d, v = spec["n"], spec["d"], spec["v"]
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    e = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    c = (torch.randn(v, d, generator=gen) * d**-0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    fn = _method(spec["method"], spec)
    cuda = device.type == "cuda"

    def step():
        e.grad = c.grad = None
        out = fn(e, c, t)
        if isinstance(out, torch.Tensor):
            out.backward()
        if cuda:
            torch.cuda.synchronize()
        return out

    for _ in range(spec["warmup"]):
        out = None
        out = step()
    e.grad = c.grad = None
    out = None
    gc.collect()
    grad_bytes = e.numel() * e.element_size() + c.numel() * c.element_size()
    # With no warm-up the timed steps include the process's first call (what it imports and
    # initialises on first use shows in the RSS figure): the exact accounting's step comes after them.
    first_call = spec["warmup"] == 0
    live = None if cuda or first_call else _live_peak(step, spec["method"])
    e.grad = c.grad = None
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_ok = _reset_peak()
    rss0 = _rss_kib("VmRSS")
    times = []
    loss = None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(spec["repeats"]):
        out = None  # the floor returns its gradient-sized products: never two sets alive at once
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        if isinstance(out, torch.Tensor):
            loss = float(out.detach())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss_peak = _rss_kib("VmHWM")
    if first_call and not cuda:
        out = None
        e.grad = c.grad = None
        gc.collect()
        live = _live_peak(step, spec["method"])
    threads = torch.get_num_threads()
    result = {"times": times, "median": sorted(times)[len(times) // 2], "loss": loss, "threads": threads}
    if not cuda:
        # Share of its threads' time this process got on CPUs: well below 1 means another process
        # competed. (On CUDA the host mostly waits for the device, so the figure would mean nothing.)
        result["cpu_share"] = cpu / max(wall * threads, 1e-9)
    result["grad_bytes"] = grad_bytes
    if reset_ok:
        result["rss_growth"] = max(0, (rss_peak - rss0) * 1024)
    if cuda:
        result["peak_live_bytes"] = max(0, torch.cuda.max_memory_allocated() - base)
        result["memory_source"] = "cuda allocator"
    elif isinstance(live, int):
        result["peak_live_bytes"] = live
        result["memory_source"] = "cpu allocator"
    else:
        result["memory_error"] = live
    return result


def _live_peak(step, method: str) -> int | str:
    """Peak bytes of the tensors one step holds at once (an int), or why it could not be measured."""
    from crossent_harness.bench.memory import allocator_peak

    try:
        # the step's return value (the floor's gradient-sized products) is dropped as the step ends
        return allocator_peak(step)
    except Exception as exc:  # noqa: BLE001 - a profiler that cannot record memory here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    try:
        res = measure(spec)
    except Exception as exc:  # reported, not raised: one failing peer must not stop the table
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print(strict_json(res))
