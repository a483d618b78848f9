"""Reuse of freed CPU memory for large tensors.

glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh mmap and
unmaps it on free, so each large CPU tensor page-faults on first touch and pays for the unmap on
release. Adapting a whole meta-batch at once makes large tensors (all tasks in one), and on a CPU
this costs about a fifth of a MAML step (bench/RESULTS.md). With mmap switched off for malloc and
freed memory kept (the environment equivalent: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<big>),
glibc reuses the memory, as PyTorch's caching allocator does on GPUs. The price: the process keeps
its peak memory instead of returning it to the system."""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's malloc.h
_applied = False


def keep_freed_cpu_memory() -> bool:
    """Switches glibc malloc to reuse freed memory (process-wide). Returns False where that is
    not possible (not glibc), True once applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _applied
