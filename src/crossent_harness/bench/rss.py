"""The process's resident set, read from ``/proc/self/status``, and its peak mark reset (Linux only).

An RSS figure of one step: make every import and input first, call :func:`reset_peak`, read
``VmRSS`` as the baseline, run the step, then read ``VmHWM``. Without the reset, ``VmHWM`` (and
``ru_maxrss``) would keep an earlier, higher transient peak and hide the step's growth below it.
"""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``"VmRSS"``, ``"VmHWM"``), or -1 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


__all__ = ["reset_peak", "status_kib"]
