"""export/heap.py: a freed large tensor leaves the process's resident memory once large allocations are mapped, and
the heap's free pages go back on a trim; without either, glibc keeps it (the growth a streamed run had with depth).
Each case runs in a fresh process, one thread, with no allocator settings or preloads inherited: the setting is
process-wide, and glibc's thresholds move with what was freed (freeing a 24 MB mapped chunk raises the mapping
threshold to 24 MB and the trim threshold to 48 MB, so a 16 MB tensor then comes from the heap and stays there)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator, read through /proc/self/smaps_rollup")

SCRIPT = """
import sys, torch
from export.heap import give_back_freed, map_large_allocations
def anon_mb():  # exact, unlike the per-thread-cached counters of /proc/self/status
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
mode = sys.argv[1]
if mode == "mapped":
    assert map_large_allocations()
big = torch.ones(6 << 20); del big      # 24 MB, mapped: freeing it raises glibc's thresholds
before = anon_mb()
x = torch.ones(4 << 20)                  # 16 MB: from the heap, unless large allocations are mapped
pins = [torch.ones(16) for _ in range(64)]  # small live objects allocated after it
del x
if mode == "trim":
    give_back_freed()
print(anon_mb() - before)
"""


def _kept_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    return float(out.stdout.strip().splitlines()[-1])


def test_glibc_keeps_a_freed_tensor_by_default():
    # the problem itself: without this, the two fixes below would pass for nothing
    assert _kept_mb("default") > 12


@pytest.mark.parametrize("mode", ["mapped", "trim"])
def test_freed_tensor_leaves(mode):
    assert _kept_mb(mode) < 1
