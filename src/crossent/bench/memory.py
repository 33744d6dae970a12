"""Exact accounting of the tensor memory a computation holds: :class:`LiveBytes`.

RSS is a poor gauge of one step's memory: the allocator keeps freed blocks and hands them out again,
so a step that reuses what the warm-up freed shows little or even negative growth. LiveBytes instead
watches every storage that an ATen operation allocates while it is active, adds its bytes when the
storage appears and subtracts them when the storage is freed, and keeps the peak. That is the memory
the step's tensors needed at once, whatever the allocator does with it. (Buffers that a single kernel
allocates and frees internally are not tensors and are not seen; nor is memory of other processes.)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._held.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
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
