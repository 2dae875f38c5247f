"""Keeping freed memory in the process during CPU training (glibc's malloc only).

A CPU training step allocates and frees many activation-sized buffers. With glibc's defaults, buffers above
the mmap threshold are mapped fresh and unmapped on free, and every fresh page is zeroed by the kernel on its
first touch: a quick-preset run took 4.4x as many page faults (922k against 209k; in a bare step loop the step
took 1.2x the time, in the training loop no difference was measured: benchmarks/NOTES.md "Host memory").
Raising the mmap and trim thresholds (what jemalloc or tcmalloc, PyTorch's advice for CPU training, do in their
own way) keeps freed memory for the next step; the process keeps its peak heap until it exits, which a
training process does anyway.

Set ITCONV_FAST_MALLOC=default to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: every activation of the paper's networks is below it

_applied = None  # None: not tried; else the description of what holds


def keep_freed_memory() -> str:
    """Raises glibc's mmap and trim thresholds for this process (once); returns what holds, for the run's
    environment record. Does nothing (and says so) with another C library or ITCONV_FAST_MALLOC=default."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("ITCONV_FAST_MALLOC", "").lower() == "default":
        _applied = "default (ITCONV_FAST_MALLOC=default)"
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _applied = "default (no glibc mallopt)"
        return _applied
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    _applied = "glibc: freed memory kept (mmap and trim thresholds 1 GiB)" if ok else "default (mallopt refused)"
    return _applied
