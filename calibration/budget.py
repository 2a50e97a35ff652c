"""What calibration asks of the model and the machine, checked before any text is read or any block is run: windows
no longer than the model's context, and activations that fit in the memory available."""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import InputError

# capture.for_each_block at its peak holds every window's hidden states (windows, seq_len, hidden) three times: the
# block's inputs, its outputs, and, while a block its pass changed is run again, the new outputs beside the old ones
ACTIVATION_COPIES = 3
# cgroup v2 and v1: (folder of the hierarchy, its controller in /proc/self/cgroup, limit file, usage file, the
# memory.stat key of the inactive page cache, which usage counts and the kernel reclaims before it kills)
_CGROUPS = (("sys/fs/cgroup", "", "memory.max", "memory.current", "inactive_file"),
            ("sys/fs/cgroup/memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def check_context(seq_lens: dict[str, int], context: int | None) -> None:
    """Refuse a window longer than the model's context length (config `max_position_embeddings`; None: unknown)."""
    for name, seq_len in seq_lens.items():
        if context is not None and seq_len > context:
            raise InputError(f"{name} {seq_len} exceeds the model's context length {context} "
                             "(max_position_embeddings in config.json); lower it")


def activation_bytes(windows: int, seq_len: int, hidden: int, dtype_bytes: int) -> int:
    """Bytes the block engine holds for `windows` windows of `seq_len` tokens: (windows, seq_len, hidden) per copy."""
    return windows * seq_len * hidden * dtype_bytes * ACTIVATION_COPIES


def _meminfo_available(root: Path) -> int | None:
    """MemAvailable of /proc/meminfo (bytes): free memory plus what the kernel can reclaim (page cache, slab)."""
    try:
        with open(root / "proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _cgroup_left(root: Path) -> int | None:
    """Bytes the memory limits of this process's cgroup and of every cgroup above it still allow (the least of
    them): limit - usage + inactive page cache, the notion MemAvailable uses (usage counts page cache, e.g. the
    safetensors just read, that the kernel reclaims before it kills). None where no limit can be read."""
    try:
        membership = [line.split(":", 2) for line in (root / "proc/self/cgroup").read_text().splitlines()]
    except OSError:
        membership = []
    found = None
    for mount, controller, limit_file, usage_file, cache_key in _CGROUPS:
        top = root / mount
        own = next((p[2].strip("/") for p in membership if len(p) == 3 and controller in p[1].split(",")), "")
        folder = top / own if own and ".." not in own.split("/") and (top / own).is_dir() else top
        for d in [folder, *(p for p in folder.parents if p.is_relative_to(top))]:
            try:
                limit = (d / limit_file).read_text().strip()
                if limit == "max":
                    continue
                stats = dict(line.split(maxsplit=1) for line in (d / "memory.stat").read_text().splitlines())
                left = int(limit) - int((d / usage_file).read_text()) + int(stats.get(cache_key, 0))
            except (OSError, ValueError):
                continue
            found = max(left, 0) if found is None else min(found, max(left, 0))
    return found


def available_bytes(root: Path = Path("/")) -> int | None:
    """Memory this process can still take without swapping (bytes): MemAvailable of /proc/meminfo (else free
    physical pages), and no more than any cgroup memory limit above the process leaves (see _cgroup_left); None
    where neither can be read. `root`: where /proc and /sys are (tests give a fake tree)."""
    found = _meminfo_available(root)
    if found is None and root == Path("/"):
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    left = _cgroup_left(root)
    return left if found is None else found if left is None else min(found, left)


def check_activation_memory(windows: int, seq_len: int, hidden: int, dtype_bytes: int,
                            available: int | None = None) -> None:
    """Refuse calibration whose activations (activation_bytes: the engine's peak, ACTIVATION_COPIES copies) exceed
    the memory available (bytes; measured when None), naming calibration.windows and the numbers.

    The margin is in the run's favour, on purpose: nothing is added for one batch's temporaries (they grow with
    calibration.batch_size, not with windows), the evaluation windows or what a pass keeps, and `available` counts
    reclaimable page cache as free. So a refusal means the activations alone cannot fit beside what is already
    resident (the model is loaded): the run would surely be killed; a tight run is left to run."""
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
