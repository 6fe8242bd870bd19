"""glibc malloc settings that keep XLA:CPU's freed buffers mapped, set by the app before JAX starts.

XLA:CPU takes every buffer of a call from malloc: its outputs, and one temporary buffer that holds all
its intermediates (tens of MB for the MNIST CNN's train step). glibc serves a request above its mmap
threshold (adaptive, but capped well below that size) with a fresh mmap and unmaps it on free, so every
call touches new pages and the kernel faults each one in: thousands of page faults per train step
(`getrusage`; the count is in docs/design.md §7). With all requests served from one heap that is never
trimmed, a step reuses the pages of the step before and faults none (benchmarks/step_vs_torch.py:
the allocator lever).

The settings are process-wide and must precede the allocations they are meant for: `keep_freed_memory()`
runs first thing in the app's entry point, before the XLA backend starts its threads (a thread that
already has its own malloc arena keeps it). The cost is memory that is never handed back to the OS
while the process lives: its peak heap, which a training process reaches in its first step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS: dict[str, tuple[int, int]] = {
    "mmap_max": (M_MMAP_MAX, 0),  # no request served by its own mmap: all come from the heap
    "arena_max": (M_ARENA_MAX, 1),  # one heap for all threads (extra arenas would be mmap'd heaps)
    "trim_threshold": (M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory stays mapped for the next call
}

_applied: dict[str, int] | None = None


def _mallopt():
    """glibc's mallopt, or None elsewhere (macOS, or a Linux C library that is not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc.mallopt if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> dict[str, int]:
    """Apply `SETTINGS` once per process; returns {setting: value} of those glibc accepted ({} elsewhere)."""
    global _applied
    if _applied is not None:
        return _applied
    mallopt = _mallopt()
    _applied = {}
    if mallopt is not None:
        for name, (param, value) in SETTINGS.items():
            if mallopt(param, value) == 1:  # mallopt returns 1 on success
                _applied[name] = value
    return _applied


def applied() -> dict[str, int]:
    """What `keep_freed_memory` set in this process ({} if it has not run or could not)."""
    return dict(_applied or {})
