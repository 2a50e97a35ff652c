"""Write an artifact atomically: everything goes into a temporary sibling folder that replaces `out` in one atomic
exchange at the end, so an existing artifact is never half-overwritten and a crash leaves the old one or the new one
whole (the rules for what may be replaced are in export/target.py)."""

from __future__ import annotations

import datetime
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
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
    Manifest,
    shard_name,
)
from export.heap import give_back_freed
from export.target import TargetError, check_target, exchange, hold, links_outside, old_name, tmp_prefix

VERSIONED_PACKAGES = ("compress-llm", "torch", "transformers", "safetensors")
PART_SUFFIX = ".safetensors.part"  # a shard written while the stream runs, renamed when the count is known


class ArtifactExistsError(FileExistsError):
    pass


def step(name: str) -> None:
    """A named point in the write sequence. It does nothing; the crash test (tests/unit/test_crash.py) replaces it in
    a child process to kill that process at each point in turn."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def source_files(folder: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[Path]:
    """The tokenizer and generation files of a source model folder that an artifact copies, after checking them:
    a file that is a symbolic link to a place outside the folder is refused (it would be published with the
    artifact), except links of a Hugging Face cache snapshot into its own repository's blobs; a .json file must be
    JSON. Raises TargetError naming the file."""
    folder = Path(folder)
    found = []
    for name in names:
        p = folder / name
        if not p.is_file():
            continue
        real = links_outside(p, folder)
        if real is not None:
            raise TargetError(f"{p}: a symbolic link to {real}, outside the model folder; the artifact would publish "
                              "that file: copy it into the folder if it belongs there")
        if name.endswith(".json"):
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise TargetError(f"{p}: not valid JSON ({err})") from None
        found.append(p)
    return found


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


def _unshared(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard with a copy of each tensor whose storage another tensor of the shard shares (safetensors refuses
    shared storage); the others as they are."""
    owners = Counter(t.untyped_storage().data_ptr() for t in shard.values())
    return {k: t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t for k, t in shard.items()}


def _flush_and_drop(path: Path) -> None:
    """Write a finished file's pages to disk and drop them from the page cache: under a memory cgroup the pages of the
    shards written so far are charged to the run until written back, and an artifact larger than the limit was
    OOM-killed while writing (docs/scale.md). The file is read back only by `compress verify`, from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """Collects an artifact in a temporary folder next to `out`; `commit()` renames it into place."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        try:
            check_target(self.out, overwrite)
        except TargetError as err:
            raise ArtifactExistsError(str(err)) from None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(self.out), dir=self.out.parent))
        self._locks = [hold(self.tmp)]  # marks the folder as a live run's until this process ends or closes them
        self.notes: list[str] = []  # what the commit could not tidy (the artifact itself is in place)
        step("temporary folder made")
        self.tensors: dict[str, dict] = {}
        self.manifest_extra: dict = {}

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not committed: leave nothing half-written behind
            shutil.rmtree(self.tmp, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def write_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int) -> None:
        """safetensors from (name, tensor) pairs in stored order, one file or shards plus an index.

        A shard closes when it holds a tensor and the next one would take it past `shard_bytes`; it is written at
        once under a temporary name, so at most one shard's tensors (and the one arriving) are held. The count is
        known at the end: then the files take their names, model.safetensors for one shard, otherwise
        model-0000i-of-0000n.safetensors and model.safetensors.index.json. Tensors are taken as they come
        (contiguous, on the CPU; copied only where needed). Raises ValueError on a name that arrives twice."""
        parts: list[tuple[Path, dict[str, dict]]] = []  # each written shard: temporary file, its tensors' records
        shard: dict[str, torch.Tensor] = {}
        names: set[str] = set()
        size = total = 0

        def close() -> None:
            part = self.tmp / f"weights-{len(parts)}{PART_SUFFIX}"
            save_file(_unshared(shard), part, metadata={"format": "pt"})
            _flush_and_drop(part)
            parts.append((part, {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                                 for k, t in shard.items()}))
            shard.clear()
            give_back_freed()  # the shard's tensors, freed between small live objects (export/heap.py)

        for name, tensor in tensors:
            if name in names:
                raise ValueError(f"{name}: arrives twice among the tensors to store")
            names.add(name)
            tensor = (tensor.detach() if tensor.requires_grad else tensor).contiguous().cpu()  # no copy if none needed
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                close()
                size = 0
            shard[name] = tensor
            size += nbytes
            total += nbytes
        if shard or not parts:
            close()
        files = [SINGLE_WEIGHTS] if len(parts) == 1 else [shard_name(i, len(parts)) for i in range(len(parts))]
        weight_map = {}
        for fname, (part, records) in zip(files, parts, strict=True):
            os.replace(part, self.tmp / fname)
            step(f"wrote {fname}")
            for k, record in records.items():
                weight_map[k] = fname
                self.tensors[k] = {"file": fname, **record}
        if len(parts) > 1:
            self.write_json(WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor]) -> int:
        """One safetensors file at `rel` (a path inside the artifact, folders made) whose tensors the manifest lists
        with that file, as it lists the weights'; returns its bytes. Raises ValueError on a name already stored."""
        if taken := sorted(set(tensors) & set(self.tensors)):
            raise ValueError(f"{taken[0]}: arrives twice among the tensors to store")
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_unshared(tensors), path, metadata={"format": "pt"})
        step(f"wrote {rel}")
        for k, t in tensors.items():
            self.tensors[k] = {"file": rel, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        return path.stat().st_size

    def write_json(self, name: str, data) -> None:
        self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / name).write_text(text)
        step(f"wrote {name}")

    def copy_tokenizer(self, source: Path) -> list[str]:
        """Copy the source's tokenizer and generation files (checked by `source_files`); returns their names."""
        copied = []
        for p in source_files(source):
            shutil.copyfile(p, self.tmp / p.name)  # contents only: the source's permissions and times stay behind
            copied.append(p.name)
        step("copied tokenizer files")
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
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": package_versions(),
            **self.manifest_extra,
            "tensors": self.tensors,
            "files": files,
        }
        self.write_text(MANIFEST, Manifest.model_validate(manifest).dumps())
        return manifest

    def _sync(self) -> None:
        """Give every file the mode the umask asks for (safetensors writes owner-only files) and flush every file and
        the folder to disk, so that the rename publishes complete files after a power loss."""
        mask = _umask()
        for p in [*self.tmp.rglob("*"), self.tmp]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self) -> Path:
        """Put the finished folder in place: rename it when `out` is free; otherwise exchange it with the old
        artifact in one atomic step and remove the old one, or, where the file system cannot exchange, move the old
        one aside first (the next run restores it if this is interrupted between the two renames)."""
        if not (self.tmp / MANIFEST).exists() or not (self.tmp / CONFIG).exists():
            raise RuntimeError("commit() before config.json and manifest.json were written")
        self._sync()
        step("synced")
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            step("renamed into place")
            _sync_folder(self.out.parent)
            return self.out
        try:
            check_target(self.out, self.overwrite)  # again: the folder may have changed during the run
        except TargetError as err:
            raise ArtifactExistsError(str(err)) from None
        self._locks.append(hold(self.out))  # the old artifact is ours until it is removed
        try:
            exchange(self.tmp, self.out)  # self.tmp now holds the old artifact
            step("exchanged")
            old = self.tmp
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
                raise
            old = old_name(self.out)
            os.replace(self.out, old)
            step("moved the old artifact aside")
            os.replace(self.tmp, self.out)
            step("renamed into place")
        _sync_folder(self.out.parent)
        try:
            shutil.rmtree(old)
        except OSError as err:
            self.notes.append(f"the new artifact is in place, but the old one could not be removed from {old} "
                              f"({err.strerror}); remove that folder yourself")
        step("removed the old artifact")
        return self.out
