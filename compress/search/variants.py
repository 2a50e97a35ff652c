"""The variant database: each module's compressed variants at each level, kept on disk as safetensors.

An allocator compares many assemblies of the same model; each assembly takes, per module, one variant from here, so
nothing is recomputed and memory stays bounded. The folder is keyed by a fingerprint of everything the variants
depend on (the model's weights, the pass settings, the calibration windows), so a rerun with the same inputs (after
a crash, or to try another budget) reuses what is there, and a changed input never reads stale variants.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress import __version__
from compress.atomic import write_atomic, write_text_atomic
from compress.errors import CompressError

# part of every variant key: a new release, or a change to how variants are computed (bump the suffix), never reads
# variants an older version wrote
CODE_VERSION = f"{__version__}/variants-2"
CACHE_BYTES = 1 << 30  # what a search keeps of loaded variants in memory (least recently used dropped first)


def fingerprint(*parts) -> str:
    """sha256 over tensors (their bytes, dtype and shape) and JSON-serializable settings, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_parts(model) -> list:
    """What a model's variants and search scores depend on besides the pass: every tensor of its state (embeddings,
    norms and head included, by name) and its config (rope, norm epsilon, ...), for `fingerprint`."""
    state = model.state_dict()
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # where it was read from
    return [config, *[p for name in sorted(state) for p in (name, state[name])]]


class VariantDB:
    """get/put of named tensor groups per (module, level); `folder=None` keeps them in memory."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._memory: dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, level) -> Path:
        return self.folder / f"{name}@{level}.safetensors"

    def has(self, name: str, level) -> bool:
        if self.folder is None:
            return (name, str(level)) in self._memory
        return self._path(name, level).exists()

    def put(self, name: str, level, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        meta = {k: str(v) for k, v in (meta or {}).items()}
        if self.folder is None:
            self._memory[(name, str(level))] = (tensors, meta)
            return
        # a crash never leaves a half-written variant under the real name
        write_atomic(self._path(name, level),
                     lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta))

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
            return self._memory.get(("json", key), (None,))[0]
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
