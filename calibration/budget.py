"""What calibration asks of the model and the machine, checked before any text is read or any block is run: windows
no longer than the model's context, and activations that fit in the memory available."""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import InputError

# block inputs and outputs are held at once for every window, a block changed by its pass is run again (a third
# copy), and one batch's temporaries (float64 statistics, attention) come on top
ACTIVATION_COPIES = 4


def check_context(seq_lens: dict[str, int], context: int | None) -> None:
    """Refuse a window longer than the model's context length (config `max_position_embeddings`; None: unknown)."""
    for name, seq_len in seq_lens.items():
        if context is not None and seq_len > context:
            raise InputError(f"{name} {seq_len} exceeds the model's context length {context} "
                             "(max_position_embeddings in config.json); lower it")


def activation_bytes(windows: int, seq_len: int, hidden: int, dtype_bytes: int) -> int:
    """Bytes the block engine holds for `windows` windows of `seq_len` tokens: (windows, seq_len, hidden) per copy."""
    return windows * seq_len * hidden * dtype_bytes * ACTIVATION_COPIES


def available_bytes() -> int | None:
    """Memory this process can still take (bytes): MemAvailable of /proc/meminfo (else free physical pages), and
    no more than a cgroup v2 limit leaves; None where neither can be read."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            found = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def check_activation_memory(windows: int, seq_len: int, hidden: int, dtype_bytes: int,
                            available: int | None = None) -> None:
    """Refuse calibration whose activations (see activation_bytes) exceed the memory available (bytes; measured
    when None), naming calibration.windows and the numbers."""
    need = activation_bytes(windows, seq_len, hidden, dtype_bytes)
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        gib = 2**30
        raise InputError(
            f"calibration.windows {windows} x seq_len {seq_len} x hidden size {hidden} x {dtype_bytes} bytes x "
            f"{ACTIVATION_COPIES} copies = {need / gib:.1f} GiB of activations, but {available / gib:.1f} GiB of "
            "memory is available; lower calibration.windows or calibration.seq_len")


def check_fits(model, windows: int, seq_lens: dict[str, int]) -> None:
    """Before any text is read: every `seq_lens` entry ({recipe field: tokens}) within the model's context, and
    `windows` windows of the longest calibration window within memory (the model is already loaded)."""
    config = model.config
    check_context(seq_lens, getattr(config, "max_position_embeddings", None))
    dtype_bytes = next(model.parameters()).element_size()
    check_activation_memory(windows, seq_lens["calibration.seq_len"], config.hidden_size, dtype_bytes)
