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

import contextlib
import ctypes
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAPPED_FROM = 1 << 20  # bytes: allocations this large get mappings of their own once map_large_allocations ran


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def give_back_freed() -> None:
    """Return the heap's free pages to the system (malloc_trim(0)): wherever they lie, not only at the top."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


def map_large_allocations(threshold: int = MAPPED_FROM) -> bool:
    """From now on, in this process, serve allocations of at least `threshold` bytes from mappings of their own, so
    freeing one returns its memory at once, and stop glibc from raising the threshold (mallopt M_MMAP_THRESHOLD).
    Costs a page fault per 4 KB of each new large tensor (zeroed pages), about 0.1 s per GB allocated. Returns whether
    it took effect (False off glibc)."""
    libc = _libc()
    if libc is None:
        return False
    with contextlib.suppress(AttributeError):
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    return False
