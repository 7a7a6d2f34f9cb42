"""Keeping freed heap memory for reuse, so per-request arrays do not page-fault on every request.

Every request allocates a few large numpy arrays (the decoded image in float32, two resized
copies, the packed patches: 1 to 40 MB each). glibc serves allocations above its mmap threshold
(128 KiB at first) with fresh mmap pages and returns freed memory at the top of the heap to the
OS; it raises the threshold when such a block is freed, which suits one size repeated, but with
images of varied sizes the next request's arrays keep landing on new pages, which the kernel
faults in and zeroes. Measured in the server (`bench/service_ab.py`, int8, one client): on the
mixed-size load the median pack time went from 9.8 to 5.6 ms; with one size repeated it stays
3.5 ms either way. Raising both thresholds keeps those pages in the process for the next request:
RSS stays at the high-water mark of concurrent requests instead of following each one down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
# glibc's own environment variables; a deployment that sets either keeps its choice.
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
# mallopt(int, int): the value is a C int, so 2 GiB and more cannot be said at all (4096 MiB
# would wrap to 0, which trims on every free: the opposite of the setting).
MAX_KEEP_MB = (2**31 - 1) >> 20  # 2047


def keep_freed_memory(megabytes: int) -> bool:
    """Lets the heap keep up to `megabytes` of freed memory and serve allocations up to a quarter
    of it without mmap. Returns whether it was applied (glibc only; 0 or an env override: no)."""
    if megabytes > MAX_KEEP_MB:
        raise ValueError(
            f"heap_keep_mb {megabytes} is above glibc's limit of {MAX_KEEP_MB} (a C int of bytes)"
        )
    if megabytes <= 0 or any(name in os.environ for name in _ENV):
        return False
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    keep = megabytes << 20
    # Mmap threshold at most 32 MiB on 64-bit glibc (HEAP_MAX_SIZE / 2); larger requests are rare.
    applied = bool(
        mallopt(_M_TRIM_THRESHOLD, keep) == 1 and mallopt(_M_MMAP_THRESHOLD, min(keep // 4, 32 << 20)) == 1
    )
    if not applied:
        logger.warning("mallopt refused the heap settings; per-request arrays will page-fault")
    return applied
