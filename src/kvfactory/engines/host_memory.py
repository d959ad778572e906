"""Host memory for KV buffers that is already mapped when a request needs it.

A reused 4k-token context is ~190 MB of fp32 KV read from the store and copied into the
model's cache tensors. Fresh anonymous memory costs a page fault per 4 KiB page, measured
here at ~7 us each: ~0.35 s per 190 MB, more than the copy and most of a warm TTFT. glibc
hands large blocks back to the kernel on free (mmap'd blocks, heap trimming), so without
care every request after a restart, and many after it, pays those faults again.

``reserve_host_memory`` does what an engine with a preallocated KV pool does once at start,
at the allocator level so tensors stay ordinary torch tensors: it tells glibc to serve
large blocks from one heap it never trims, then touches ``nbytes`` of that heap and frees
it. Later KV tensors and block payloads are carved from mapped pages. The price is that the
process keeps its peak heap instead of returning it. Only glibc on Linux has these knobs;
elsewhere, or where another allocator is preloaded (vLLM's CPU build preloads tcmalloc,
which keeps freed memory cached by itself), this does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class HostReserve:
    reserved_bytes: int
    seconds: float
    reason: str = ""
    """Why nothing was reserved (empty when ``reserved_bytes`` > 0)."""


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (musl and others lack it: no mallopt knobs)
    except (OSError, AttributeError):
        return None
    process = ctypes.CDLL(None)  # the malloc every other library in the process calls
    if (
        ctypes.cast(process.malloc, ctypes.c_void_p).value
        != ctypes.cast(libc.malloc, ctypes.c_void_p).value
    ):
        return None  # an interposed allocator (vLLM CPU preloads tcmalloc): knobs do nothing
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def reserve_host_memory(nbytes: int) -> HostReserve:
    """Keep freed large blocks in the process and pre-fault ``nbytes`` of heap for them.

    One arena, so the model thread, the store's reader and writer threads and the server all
    draw from the same pre-faulted heap; no mmap for large blocks; no trimming below 2 GiB
    of free top-of-heap. Call once, after the model's weights are loaded (loading would
    otherwise consume the reserve).
    """
    if nbytes <= 0:
        return HostReserve(0, 0.0, "disabled")
    libc = _glibc()
    if libc is None:
        return HostReserve(0, 0.0, "needs glibc's malloc on Linux (not an LD_PRELOADed one)")
    started = time.perf_counter()
    for param, value in (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_THRESHOLD, _INT_MAX),
        (_M_TRIM_THRESHOLD, _INT_MAX),
    ):
        if libc.mallopt(param, value) != 1:
            return HostReserve(0, 0.0, f"mallopt({param}) was refused")
    pointer = libc.malloc(nbytes)
    if not pointer:
        return HostReserve(0, 0.0, f"could not allocate {nbytes} bytes")
    try:
        ctypes.memset(pointer, 0, nbytes)
    finally:
        libc.free(pointer)
    return HostReserve(nbytes, time.perf_counter() - started)


def reserve_and_report(nbytes: int, purpose: str) -> HostReserve:
    """``reserve_host_memory`` plus one log line saying what was reserved, or why not."""
    reserve = reserve_host_memory(nbytes)
    if reserve.reserved_bytes:
        log.info(
            "pre-faulted %.0f MiB of host memory for %s in %.2fs",
            reserve.reserved_bytes / (1 << 20),
            purpose,
            reserve.seconds,
        )
    elif nbytes:
        log.info("host memory not reserved for %s: %s", purpose, reserve.reason)
    return reserve


__all__ = ["HostReserve", "reserve_and_report", "reserve_host_memory"]
