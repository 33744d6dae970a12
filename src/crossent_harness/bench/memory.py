"""Exact accounting of the tensor memory a computation holds: :func:`allocator_peak` and :class:`LiveBytes`.

:func:`allocator_peak` replays the allocation events that PyTorch's CPU allocator reports to its
profiler (every allocation and free, with its size, in time order) and returns the most bytes that
were held at once. It sees every buffer, those that a fused operator allocates inside its kernel and
those of compiled code included. :class:`LiveBytes` counts the storages that operators return,
through a dispatch mode; it needs no profiler but cannot see inside fused operators.

RSS is a poor gauge of one step's memory: the allocator keeps freed blocks and hands them out again,
so a step that reuses what the warm-up freed shows little or even negative growth. LiveBytes instead
watches every storage that an ATen operation allocates while it is active, adds its bytes when the
storage appears and subtracts them when the storage is freed, and keeps the peak. That is the memory
the step's tensors needed at once, whatever the allocator does with it.

What it cannot see: buffers that one operator allocates and frees inside its own kernel. For ATen's
operators these are small workspaces; but a fused operator registered outside ATen (PyTorch's
``torch_nn._linear_cross_entropy_batch_chunked``, say) runs its whole computation inside, so only its
outputs are seen. :attr:`LiveBytes.opaque` names such operators, so that a caller can tell a complete
figure from a partial one.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def allocator_peak(fn) -> int:
    """The most bytes PyTorch's CPU allocator held at once during ``fn()``, beyond what it held before.

    Example:
        >>> def work():
        ...     a = torch.ones(1000)      # 4000 bytes
        ...     b = a * 2                 # 4000 more
        ...     del a
        ...     return b + 1              # a's 4000 are free again by now
        >>> 8000 <= allocator_peak(work) < 8100  # and a few bytes for the wrapped Python scalars
        True
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and _on_cpu(e)]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _on_cpu(event) -> bool:
    return str(event.device_type()).upper().endswith("CPU")


class LiveBytes(TorchDispatchMode):
    """Bytes held by the storages that ops allocate while active: ``live`` now, ``peak`` at most.

    Example:
        >>> with LiveBytes() as rec:
        ...     a = torch.ones(1000)          # 4000 bytes
        ...     b = a * 2                     # 4000 more
        ...     del a
        ...     c = b + 1                     # a's 4000 are gone by now
        >>> rec.peak, rec.live
        (8000, 8000)
    """

    #: operator namespaces whose operators allocate every tensor through the dispatcher
    TRANSPARENT = ("aten", "prims")

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        #: operators outside :attr:`TRANSPARENT` that ran: their internal buffers were not counted
        self.opaque: set[str] = set()
        self._held: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._held.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in self.TRANSPARENT:
            self.opaque.add(str(func))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                # a view or an in-place result shares a storage already counted (or an input's)
                if nbytes and key not in self._held and not _is_input_storage(key, args, kwargs):
                    self._held.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out


def _is_input_storage(key: int, args, kwargs) -> bool:
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.numel() and a.untyped_storage().data_ptr() == key:
            return True
        if isinstance(a, (list, tuple)) and _is_input_storage(key, a, None):
            return True
    return False
