"""Where an artifact goes: what may be replaced, what is refused, and how a replacement stays atomic.

Rules (docs/promises.md lists them with their tests):
- `out` is replaced only when it is a compress artifact (its manifest says so) holding nothing but what its manifest
  lists, and only with `overwrite`; an empty folder is written into; anything else is refused.
- `out` is never a symbolic link, the file-system root, the current folder or one of its parents, nor equal to,
  inside or around a folder the run reads from (the source model).
- The finished artifact replaces the old one by one atomic exchange of the two folders (Linux renameat2
  RENAME_EXCHANGE); where the file system cannot exchange, by two renames whose interruption the next run repairs.
  Either way `out` holds the old or the new artifact, whole.
- Temporary folders carry the writing process's id (`.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID`) and are locked
  (flock) by it while it runs; the next run on the same `out` removes those nobody holds (their process died, in
  any container or host), restores an old artifact that an interrupted replacement left aside, and says what it did.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from export.format import FORMAT_NAME, MANIFEST

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_TMP_RANDOM = 8  # characters tempfile adds to a prefix


class TargetError(ValueError):
    """An output folder that must not be written or replaced; the message names it and says why."""


def tmp_prefix(out: Path) -> str:
    """Prefix of this process's temporary folder beside `out`."""
    return f".{out.name}.tmp-{os.getpid()}-"


def old_name(out: Path) -> Path:
    """Where the two-rename fallback moves the old artifact while the new one is renamed into place."""
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def is_artifact(folder: Path) -> bool:
    """True when `folder` holds a manifest.json that says it is a compress artifact."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _unlisted(folder: Path) -> list[str]:
    """Files in an artifact folder that its manifest does not list (a user's own files)."""
    files = json.loads((folder / MANIFEST).read_text()).get("files")
    listed = set(files) if isinstance(files, dict) else set()
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p.relative_to(folder).as_posix() not in listed | {MANIFEST})


def hf_snapshot_root(folder: Path) -> Path | None:
    """The repository folder of a Hugging Face hub cache snapshot (`models--ORG--NAME/snapshots/REV`, whose files
    link into `models--ORG--NAME/blobs/`), or None when `folder` is not laid out as one."""
    real = Path(os.path.realpath(folder))
    repo = real.parent.parent
    if (real.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--"))
            and (repo / "blobs").is_dir()):
        return repo
    return None


def links_outside(path: Path, folder: Path) -> Path | None:
    """Where `path` really is when that is outside `folder` (through a symbolic link on the way), else None. In a hub
    cache snapshot, links into the repository's own `blobs/` stay inside."""
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    repo = hf_snapshot_root(folder)
    if real == root or root in real.parents or (repo is not None and repo / "blobs" in real.parents):
        return None
    return real


def _absolute(path: Path) -> Path:
    """`path` made absolute with symbolic links resolved, also when it does not exist yet."""
    return Path(os.path.realpath(path))


def _check_lengths(out: Path, ancestor: Path) -> None:
    """Refuse a path the file system cannot hold: any part longer than NAME_MAX (the last one with room for the
    temporary folder's prefix and suffix), or the whole longer than PATH_MAX."""
    name_max, path_max = os.pathconf(ancestor, "PC_NAME_MAX"), os.pathconf(ancestor, "PC_PATH_MAX")
    parts = [os.fsencode(p) for p in out.parts]
    room = len(os.fsencode(f"..tmp-{os.getpid()}-")) + _TMP_RANDOM  # what the temporary name adds to the last part
    for i, part in enumerate(parts):
        limit = name_max - (room if i == len(parts) - 1 else 0)
        if len(part) > limit:
            shown = part.decode(errors="replace")
            raise TargetError(f"output {out}: the name {shown[:40]}... is too long ({len(part)} bytes; this file "
                              f"system allows {limit} there)")
    if len(os.fsencode(str(_absolute(out)))) + room >= path_max:
        raise TargetError(f"output {out}: the path is too long for this file system ({path_max} bytes at most)")


def _probe_writable(folder: Path, name: str) -> None:
    """Refuse a place where the temporary folder for `name` cannot be made: create one and remove it."""
    try:
        probe = tempfile.mkdtemp(prefix=f".{name}.probe-", dir=folder)
    except OSError as err:
        raise TargetError(f"output {folder / name}: cannot write in {folder} ({err.strerror})") from None
    os.rmdir(probe)


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `out` that must not be written or replaced (see the module's rules).

    Raises TargetError naming the folder and the reason (also for a path the system cannot look at)."""
    out = Path(out)
    try:
        _check_target(out, overwrite)
    except OSError as err:
        raise TargetError(f"output {out}: {err.strerror or err} ({err.filename or out})") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a part too long, or a folder that cannot be entered: nothing there for us
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    ancestor = _absolute(out).parent
    while not _exists(ancestor):
        ancestor = ancestor.parent
    _check_lengths(out, ancestor if ancestor.is_dir() else ancestor.parent)
    if out.is_symlink():
        raise TargetError(f"output {out} is a symbolic link (to {os.readlink(out)}); give the real folder")
    real = _absolute(out)
    if real == Path(real.anchor) or not out.name or out.name in (".", ".."):
        raise TargetError(f"output {out}: name a new folder (not {out}, which resolves to {real})")
    cwd = _absolute(Path.cwd())
    if cwd == real or real in cwd.parents:
        raise TargetError(f"output {out} is the current folder or contains it ({cwd}); name a folder inside it")
    if out.exists():
        if not out.is_dir():
            raise TargetError(f"output {out} exists and is not a folder")
        if any(out.iterdir()):
            if not is_artifact(out):
                raise TargetError(f"output {out} exists and is not a compress artifact (no {MANIFEST} of format "
                                  f"{FORMAT_NAME!r}); refusing to replace it, --overwrite included: name another "
                                  "folder, or remove it yourself")
            if not overwrite:
                raise TargetError(f"output {out} exists; pass --overwrite to replace it")
            extra = _unlisted(out)
            if extra:
                raise TargetError(f"output {out} holds files that are not part of the artifact "
                                  f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); replacing it would "
                                  "delete them: move them out first")
        _probe_writable(real.parent, out.name)
        return
    if not ancestor.is_dir():
        raise TargetError(f"output {out}: {ancestor} is a file, not a folder")
    _probe_writable(ancestor, out.name)


def check_apart(out: Path, folder: Path, what: str) -> None:
    """Refuse an `out` equal to, inside or containing `folder` (a folder the run reads from), naming both."""
    a, b = _absolute(Path(out)), _absolute(Path(folder))
    if a == b or b in a.parents or a in b.parents:
        how = "is" if a == b else ("is inside" if b in a.parents else "contains")
        raise TargetError(f"output {out} {how} {what} {folder}; write the artifact somewhere else")


def hold(folder: Path) -> int:
    """Lock `folder` for as long as the returned descriptor stays open (the kernel drops the lock when the process
    dies, however it dies): how a run marks its temporary folders as alive. Close it with os.close."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _held(folder: Path) -> bool:
    """Whether a live run holds `folder` (see `hold`); a folder left by a dead run is free."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True  # cannot look: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our own lock too
    return False


def recover_leftovers(out: Path) -> list[str]:
    """Repair what dead runs left beside `out`: restore an old artifact that an interrupted replacement moved aside
    (when `out` is missing), remove their temporary folders. A folder that a live run holds (`hold`) is left alone,
    whichever process, container or host it runs in. Returns one message per thing done; raises TargetError when
    the folder cannot be looked at or cleaned."""
    out = Path(out)
    try:
        return _recover(out)
    except OSError as err:
        raise TargetError(f"output {out}: cannot clean up beside it: {err.strerror or err} "
                          f"({err.filename or out})") from None


def _recover(out: Path) -> list[str]:
    parent = _absolute(out).parent
    if not _exists(parent) or not parent.is_dir():
        return []
    name = re.escape(out.name)
    old_re, tmp_re = re.compile(rf"\.{name}\.old-(\d+)"), re.compile(rf"\.{name}\.tmp-(\d+)-\w{{{_TMP_RANDOM}}}")
    done = []
    for p in sorted(parent.iterdir()):
        m = old_re.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir() or _held(p):
            continue
        if not out.exists() and not out.is_symlink() and is_artifact(p):
            os.replace(p, out)
            done.append(f"restored {out} from {p.name}: an earlier --overwrite (process {m.group(1)}) was "
                        "interrupted between its two renames")
        else:
            shutil.rmtree(p)
            done.append(f"removed {p.name}, the old artifact an interrupted --overwrite (process {m.group(1)}) left")
    for p in sorted(parent.iterdir()):
        m = tmp_re.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _held(p):
            shutil.rmtree(p)
            done.append(f"removed {p.name}, left by an interrupted run (process {m.group(1)})")
    return done


def exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (renameat2 RENAME_EXCHANGE). Raises OSError where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))
