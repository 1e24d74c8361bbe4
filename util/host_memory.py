"""Process settings for CPU training and evaluation: the host-memory allocator, and
denormal floats flushed to zero (:func:`tune_cpu_process` applies both).

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its
mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so every large activation of every step is new memory: the kernel
zero-fills it page by page on first touch. :func:`keep_freed_memory` makes glibc serve large
blocks from its heap and never give freed memory back, so from the second step on the same
pages are reused. At PASCAL size (ResNet-50, 473², batch 4) on the 2-core dev machine the
frozen backbone pass went from 6156 to 5247 ms and a benchmark run's system time from 24.8 to
about 10 s (docs/benchmarks.md).

The cost: the process keeps its peak heap (what the step needs anyway). Not glibc (musl,
macOS, Windows) → nothing is changed. The same effect without code:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615 python ...``; or
preload jemalloc / tcmalloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def tune_cpu_process(malloc: bool = True) -> dict:
    """What a CPU run should set before its first parallel operator (worker threads inherit
    the floating-point mode of the thread that creates them):

    - ``malloc``: :func:`keep_freed_memory`;
    - denormals flushed to zero (``torch.set_flush_denormal``: FTZ/DAZ). Values below 1.2e-38
      become 0 — nothing a network's result depends on — and arithmetic on them no longer
      takes the processor's slow path: a ResNet-101 step at PASCAL size (random weights, whose
      activations and gradients span a huge range) measured 15.2–17.6 s without, 13.8–14.7 s
      with (docs/benchmarks.md).

    Returns what was applied, e.g. ``{"malloc_tuned": True, "flush_denormal": True}``."""
    import torch

    return {"malloc_tuned": keep_freed_memory() if malloc else False,
            "flush_denormal": bool(torch.set_flush_denormal(True))}


def keep_freed_memory() -> bool:
    """Tune glibc malloc as the module docstring says; True if applied (idempotent)."""
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap for no block (so large blocks come from the reusable heap); never trim the heap
    # (-1 is SIZE_MAX for glibc's size_t threshold)
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    _applied = ok
    if not ok:
        log.debug("mallopt refused the settings; allocator left as it is")
    return ok
