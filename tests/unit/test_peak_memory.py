"""A run reports its own peak resident memory, not an earlier run's in the same process (a notebook, a test
session): the peak window is reset when a run starts (Linux /proc/self/clear_refs)."""

from pathlib import Path

import pytest
import torch

from compress.pipeline import peak_memory_mb, reset_peak_memory

MB = 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak window can be reset on Linux only")
def test_reset_starts_a_new_peak_window():
    reset_peak_memory()
    before = peak_memory_mb()
    block = torch.ones(300 * MB // 4)  # 300 MB, touched
    during = peak_memory_mb()
    assert during - before > 250
    del block
    reset_peak_memory()
    assert peak_memory_mb() < during - 200
