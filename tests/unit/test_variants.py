"""The in-memory cache searches read variants through: bounded by bytes, least recently used dropped first."""

import torch

from compress.search.variants import LoadCache


def test_load_cache_is_bounded_by_bytes_and_drops_the_least_recently_used():
    loads = []

    def load(name, level):
        loads.append((name, level))
        return {"weight": torch.zeros(level, 256)}  # level KiB of float32

    cache = LoadCache(load, max_bytes=3 * 1024)
    a, b = cache("a", 1), cache("b", 1)
    assert cache("a", 1) is a and cache.hits == 1 and cache.misses == 2
    cache("c", 1)  # three KiB: all held
    assert cache.bytes == 3 * 1024 and len(cache.items) == 3
    cache("d", 1)  # over: drops b, the least recently used (a was read after it)
    assert list(cache.items) == [("a", 1), ("c", 1), ("d", 1)] and cache.bytes == 3 * 1024
    assert cache("b", 1) is not b and loads.count(("b", 1)) == 2
    big = cache("e", 5)  # larger than the bound on its own: kept (the caller needs it), everything else dropped
    assert list(cache.items) == [("e", 5)] and cache.bytes == 5 * 1024 and cache("e", 5) is big
