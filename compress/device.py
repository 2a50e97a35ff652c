"""The device policy: where the block under work computes. The recipe's `device` (auto | cpu | cuda | cuda:N) is
resolved once per run; the model stays on the CPU, and the block a pass works on, its calibration activations and
the statistics collected from them live on the device while the block is worked on (calibration.capture moves them
there and back). Maths in compress/ops computes on its inputs' device. Evaluation moves the whole model for its
forward passes and back.

On the CPU every move is a no-op: a CPU run computes exactly what it computed before the policy existed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compress.errors import InputError
from compress.recipe import DEVICE_PATTERN

CPU = torch.device("cpu")


def resolve(spec: str, where: str = "device") -> torch.device:
    """The torch device for a recipe's `device` value: `auto` is the first CUDA device when torch sees one, else the
    CPU. Raises InputError naming `where` for a CUDA device this torch cannot use (no CUDA build, no GPU, or an
    index past the last GPU), or a value that is not one of the forms above."""
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise InputError(f"{where}: {spec!r} is not auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    if spec == "cpu":
        return CPU
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        built = "a build without CUDA" if cuda is None else f"CUDA {cuda}, but no GPU visible"
        raise InputError(f"{where}: {spec!r} asked for, but torch {torch.__version__} has {built}; use device: cpu "
                         "(or auto)")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"{where}: {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are "
                         "visible (cuda:0 ..)")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H200)` -- for logs and the report."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples, lists and dicts) on `device`; other values as they are.
    A tensor already there is returned as itself (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def move(module: nn.Module, device: torch.device) -> None:
    """Move a module's parameters and buffers to `device` in place (nothing to do when they are there)."""
    if any(t.device != device for t in _tensors(module)):
        module.to(device)


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module on `device` inside the block, back on the CPU after it (also when the block raises)."""
    move(module, device)
    try:
        yield module
    finally:
        move(module, CPU)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
