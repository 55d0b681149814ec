"""Process memory policy for the big jobs (one extraction or one reduction per process)."""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Keep freed heap memory in the process for reuse (glibc ``mallopt``); True if set.

    glibc serves each allocation over its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and unmaps it when freed, so each large tensor of a CPU pass is faulted in and
    zeroed by the kernel page by page, every time. ``M_MMAP_MAX=0`` serves them from the
    heap and ``M_TRIM_THRESHOLD=-1`` never gives the heap back, so later micro-batches reuse
    the pages of the first instead of faulting them in again (the kernel time this saves:
    docs/benchmarks/2026-11-29.md); the reduction's numpy blocks are reused the same way. The
    process keeps its peak memory until it exits, which for one job, one process, costs
    nothing. Where the C library is not glibc nothing changes
    and False is returned.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
