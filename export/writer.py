"""Write an artifact atomically: everything goes into a temporary sibling folder that is renamed into place at the
end, so an existing artifact is never half-overwritten and a crash leaves the old one intact."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from export.format import (
    CONFIG,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SINGLE_WEIGHTS,
    TOKENIZER_FILES,
    WEIGHTS_INDEX,
    shard_name,
)

VERSIONED_PACKAGES = ("compress-llm", "torch", "transformers", "safetensors")


class ArtifactExistsError(FileExistsError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


class ArtifactWriter:
    """Collects an artifact in a temporary folder next to `out`; `commit()` renames it into place."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise ArtifactExistsError(f"{self.out} exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.tensors: dict[str, dict] = {}
        self.manifest_extra: dict = {}

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not committed: leave nothing half-written behind
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_weights(self, state: dict[str, torch.Tensor], shard_bytes: int) -> None:
        """safetensors, one file or shards plus an index; tensors are written contiguous and unshared."""
        state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
        shards = _shards(state, shard_bytes)
        names = [SINGLE_WEIGHTS] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(names, shards):
            save_file(shard, self.tmp / fname, metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                self.tensors[k] = {"file": fname, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            self.write_json(WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

    def write_json(self, name: str, data) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_tokenizer(self, source: Path) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, self.tmp / name)
                copied.append(name)
        return copied

    def write_manifest(self, **fields) -> dict:
        """manifest.json over every file now in the folder (call again after adding files)."""
        self.manifest_extra.update(fields)
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            **self.manifest_extra,
            "tensors": self.tensors,
            "files": files,
        }
        self.write_json(MANIFEST, manifest)
        return manifest

    def commit(self) -> Path:
        """Rename the finished folder into place; an old artifact is moved aside first and removed after."""
        if not (self.tmp / MANIFEST).exists() or not (self.tmp / CONFIG).exists():
            raise RuntimeError("commit() before config.json and manifest.json were written")
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise ArtifactExistsError(f"{self.out} exists; pass --overwrite to replace it")
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out
