"""glibc allocator setting for the CPU forward and backward passes (torch-free, so any entry point can call it)."""

from __future__ import annotations

import os
import sys

_applied: bool | None = None


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks up to `limit` bytes instead of returning them to the kernel.

    CPU forward passes allocate and free activation buffers of tens of MB per batch; by default
    glibc maps and unmaps each one, and the kernel zeroes every page again. On this 2-core
    machine a 600-image scan took 1.5-2 M page faults and ~4 s of system time that way, and
    ~0.5 M and ~2 s with this (about 1 s less wall time, measured four times each way).
    Training gains too: 2 pre-training epochs of the phase profile took 3.2-3.3 s instead of
    3.8-3.9 s (system time 0.4 s instead of 1.4 s).
    Process-wide and idempotent; `LIDA_MALLOC_TUNE=0` turns it off. False where it does not apply.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = _apply(limit)
    return _applied


def _apply(limit: int) -> bool:
    if os.environ.get("LIDA_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))
