"""The process's CPU memory allocator: keep freed memory for the next step instead of giving it back.

glibc's malloc serves a large block with fresh pages from mmap when it is above a threshold (128 KiB
at first, then the largest mmap'd block freed so far), and returns the top of its heap to the OS when
more than the trim threshold (twice that) is free there. A training step frees and allocates the same
activation and gradient tensors every step, so under those defaults every step faults its working
set in again, page by page: on the 2-core benchmark machine the plain fp32 ResNet-20 step (digits
16x16, batch 128) took ~8,000 minor page faults and 125 ms, and 108 ms with no faults once freed
memory is kept. A converted layer allocates a few more tensors per backward (δ̂ for each GEMM), so
each of its steps faulted more: the default allocator added up to ~0.1 to a recipe's step-time
ratio on that workload.

`keep_freed_memory` sets mallopt(M_MMAP_THRESHOLD) to 32 MiB (glibc's ceiling for it: blocks up to
that come from the heap) and mallopt(M_TRIM_THRESHOLD) to 1 GiB (up to that stays free at the top of
the heap): what a caching allocator does (PyTorch's CUDA one, jemalloc, tcmalloc). No number
changes; the resident memory stays near its peak. The trainer calls it at set-up and records
`info()` in the run's summary; scripts/bench_step.py runs its fp32 and recipe steps alike under it.
``LOWPREC_MALLOC=default`` leaves the allocator alone; elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ENV", "MODES", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "mode", "keep_freed_memory", "info"]

ENV = "LOWPREC_MALLOC"
MODES = ("keep", "default")
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_state: dict = {"set": False, "why": "not requested"}


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def mode() -> str:
    """``$LOWPREC_MALLOC`` (unset: "keep"); a ValueError naming it otherwise (lowprec.preflight checks
    it before a run writes anything)."""
    m = os.environ.get(ENV, "keep").strip() or "keep"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def keep_freed_memory() -> dict:
    """Set glibc's thresholds (module docstring) once per process unless ``LOWPREC_MALLOC=default``;
    returns `info()`."""
    if _state["set"]:
        return info()
    if mode() == "default":
        _state["why"] = f"{ENV}=default"
        return info()
    libc = _glibc()
    if libc is None:
        _state["why"] = "not glibc"
        return info()
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        _state["set"] = True
    else:
        _state["why"] = "mallopt refused"
    return info()


def info() -> dict:
    """What this process's allocator does, for a run's summary and a benchmark's header."""
    if _state["set"]:
        return {"malloc": "keep", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return {"malloc": "default", "why": _state["why"]}
