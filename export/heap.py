"""The C heap under streamed work (glibc; no-ops elsewhere): what a process that frees large tensors one after another
needs so that its resident memory follows what it holds, not what it once held.

glibc serves an allocation from its heap below a threshold and from a mapping of its own above it; freeing a mapped
chunk raises the threshold to that chunk's size (up to 32 MB). After the first large tensor is freed, every tensor
below that size comes from the heap, where small live objects allocated between them keep the freed pages from
being returned: a streamed run's resident memory then grew with depth although nothing it held did (measured at
168 layers, hidden 512: 190 MB kept after the compressed evaluation's head and logits, 100 MB more over the writing of
five 64 MB shards; docs/scale.md, "Under a memory limit").
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MAPPED_FROM = 1 << 20  # bytes: allocations this large get mappings of their own once map_large_allocations ran


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (macOS, Windows, musl) or another allocator is preloaded
    (jemalloc, tcmalloc: glibc's settings would not reach it)."""
    if platform.libc_ver()[0] != "glibc" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def give_back_freed() -> None:
    """Return the heap's free pages to the system (malloc_trim(0)): wherever they lie, not only at the top."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = MAPPED_FROM) -> bool:
    """From now on, in this process, serve new allocations of at least `threshold` bytes (at most 32 MB) from mappings
    of their own, so that freeing one returns its memory at once, and stop glibc from raising that threshold
    (mallopt M_MMAP_THRESHOLD); return the heap's top above 2 x `threshold` on each free (M_TRIM_THRESHOLD), and trim
    now what the heap already holds free (free chunks already in the heap are still reused first). Costs a page
    fault per 4 KB of each new large tensor (zeroed pages). Returns whether it took effect (False where _libc is
    None)."""
    libc = _libc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold))
    libc.malloc_trim(0)
    return done
