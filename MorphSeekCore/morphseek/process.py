"""Settings of the processes MorphSeek runs itself: ``morphseek``, the Slicer worker, and the
benchmarks that time a registration as those run it. Made first thing, before torch loads OpenMP.
Scripts that import the engine into their own process (Slicer's, a notebook) are left as they are."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from . import defaults

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def prepare_process() -> None:
    """``defaults.OPENMP_ENVIRONMENT`` (unless already set), then :func:`keep_freed_memory`."""
    for name, value in defaults.OPENMP_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Linux (glibc): freed blocks stay in the process's heap for the next tensor of that size instead
    of going back to the system, up to ``defaults.KEPT_MEMORY_BYTES`` per block. By default glibc
    maps each block of over 32 MiB afresh and returns it when freed, so every step's large tensors
    are page-faulted and zeroed again by the kernel: a quarter of a brain registration's time on 2
    cores (docs/BENCHMARKS.md). The process keeps its peak memory until it exits, which suits a
    process that runs one job. Returns whether it applied (False elsewhere, or when the variables
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` already choose)."""
    if not sys.platform.startswith("linux") or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    limit = int(defaults.KEPT_MEMORY_BYTES)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
