"""The supernet a search walks: every unit's compressed variants at every level, kept in a variant database on disk,
and an `Assembler` that puts the model's units at chosen levels and back to dense.

An allocator compares many assemblies of the same model; each assembly takes, per unit, one variant from the
database, so nothing is recomputed and memory stays bounded. The database's folder is keyed by a fingerprint of
everything the variants depend on (`compress.search.variants.fingerprint` over the model's weights, the pass settings,
the calibration windows, and `CODE_VERSION`), so a rerun with the same inputs (after a crash, or to try another
budget) reuses what is there, and a changed input never reads stale variants.

What a level means is the pass's: a `Swap` applies one unit's variant to the model (a quantized weight of the same
shape: `WeightSwap`; kept structures with a refitted projection: the Tyr pass's swap) and restores the dense model.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress import __version__
from compress.atomic import write_atomic, write_text_atomic
from compress.errors import CompressError

# part of every variant key: a new release, or a change to how variants are computed (bump the suffix), never reads
# variants an older version wrote
CODE_VERSION = f"{__version__}/variants-2"
CACHE_BYTES = 1 << 30  # what a search keeps of loaded variants in memory (least recently used dropped first)


class VariantDB:
    """get/put of named tensor groups per (unit or module, level); `folder=None` keeps them in memory. On disk one
    safetensors file per variant, `{name}@{level}.safetensors`, and JSON side files (measured errors, search states)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._memory: dict[tuple[str, str], tuple[dict, dict[str, str]]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, level) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}@{level}.safetensors"

    def has(self, name: str, level) -> bool:
        if self.folder is None:
            return (name, str(level)) in self._memory
        return self._path(name, level).exists()

    def put(self, name: str, level, tensors: dict[str, torch.Tensor], meta: dict[str, object] | None = None) -> None:
        text = {k: str(v) for k, v in (meta or {}).items()}
        tensors = {k: v.cpu() for k, v in tensors.items()}  # variants live on the CPU, wherever they were computed
        if self.folder is None:
            self._memory[(name, str(level))] = (tensors, text)
            return
        # a crash never leaves a half-written variant under the real name
        write_atomic(self._path(name, level),
                     lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=text))

    def get(self, name: str, level) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if self.folder is None:
            return self._memory[(name, str(level))]
        from safetensors import safe_open

        path = self._path(name, level)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta
        except Exception as err:  # safetensors raises its own error types for a damaged header or payload
            raise CompressError(f"{path}: unreadable variant ({err}); delete {self.folder} to rebuild it") from None

    def read_json(self, key: str) -> dict | None:
        if self.folder is None:
            return self._memory.get(("json", key), (None, {}))[0]
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, key: str, value: dict) -> None:
        if self.folder is None:
            self._memory[("json", key)] = (value, {})
            return
        write_text_atomic(self.folder / f"{key}.json", json.dumps(value, indent=1))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class LoadCache:
    """`load(*key)` memoized in a least-recently-used cache bounded by the bytes of the tensors it holds, so a search
    that revisits a few levels per unit reads each from disk once, and one that roams never holds the whole database."""

    def __init__(self, load: Callable, max_bytes: int = CACHE_BYTES):
        self.load, self.max_bytes = load, max_bytes
        self.items: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def __call__(self, *key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        value = self.load(*key)
        self.items[key] = value
        self.bytes += _nbytes(value)
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= _nbytes(old)
        return value


class Swap(Protocol):
    """How one kind of unit takes a variant: `put` sets a unit to a level, `restore` puts every unit back to dense."""

    def put(self, unit: str, level: Any) -> None: ...

    def restore(self) -> None: ...


class Assembler:
    """The model as one point of the supernet: remembers the level every unit holds (none: dense) and applies only the
    units whose level changes. Use it as a context manager to leave the model dense however the search ends."""

    def __init__(self, swap: Swap):
        self.swap = swap
        self.level: dict[str, Any] = {}

    def assemble(self, levels: Mapping[str, Any]) -> None:
        """Put each named unit at its level; units not named keep theirs."""
        for unit, level in levels.items():
            if self.level.get(unit) == level:
                continue
            self.swap.put(unit, level)
            self.level[unit] = level

    def restore_dense(self) -> None:
        self.swap.restore()
        self.level = {}

    def __enter__(self) -> Assembler:
        return self

    def __exit__(self, *exc) -> None:
        self.restore_dense()


class WeightSwap:
    """Units whose variants replace module weights in place of the same shape (a fused group's quantized weights):
    `load(module, level)` gives a module's weight at a level, `dense` its dense weight."""

    def __init__(self, modules: dict[str, nn.Linear], members: dict[str, list[str]],
                 load: Callable[[str, Any], torch.Tensor], dense: dict[str, torch.Tensor]):
        self.modules, self.members, self.load, self.dense = modules, members, load, dense

    def put(self, unit: str, level: Any) -> None:
        for name in self.members[unit]:  # on the module's device (a block under work may be on the GPU)
            lin = self.modules[name]
            lin.weight.data = self.load(name, level).to(lin.weight.device)

    def restore(self) -> None:
        for name, lin in self.modules.items():
            lin.weight.data = self.dense[name].to(lin.weight.device)
