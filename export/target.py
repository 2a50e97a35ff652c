"""Where an artifact goes: what may be replaced, what is refused, and how a replacement stays atomic.

Rules (docs/promises.md lists them with their tests):
- `out` is replaced only when it is a compress artifact (its manifest says so) holding nothing but what its manifest
  lists, and only with `overwrite`; an empty folder is written into; anything else is refused.
- `out` is never a symbolic link, the file-system root, the current folder or one of its parents, nor equal to,
  inside or around a folder the run reads from (the source model).
- The finished artifact replaces the old one by one atomic exchange of the two folders (Linux renameat2
  RENAME_EXCHANGE); where the file system cannot exchange, by two renames whose interruption the next run repairs.
  Either way `out` holds the old or the new artifact, whole.
- Temporary folders carry the writing process's id (`.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID`); the next run on
  the same `out` removes those of dead processes, restores an old artifact that an interrupted replacement left
  aside, and says what it did.
"""

from __future__ import annotations

import ctypes
import errno
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


def _absolute(path: Path) -> Path:
    """`path` made absolute with symbolic links resolved, also when it does not exist yet."""
    return Path(os.path.realpath(path))


def _probe_writable(folder: Path, name: str) -> None:
    """Refuse a place where the temporary folder for `name` cannot be made: create one and remove it."""
    limit = os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    longest = len(os.fsencode(f".{name}.tmp-{os.getpid()}-")) + _TMP_RANDOM
    if longest > limit:
        raise TargetError(f"output {name[:40]}...: the name is too long ({len(os.fsencode(name))} bytes; this file "
                          f"system allows {limit - (longest - len(os.fsencode(name)))} for an artifact's name)")
    try:
        probe = tempfile.mkdtemp(prefix=f".{name}.probe-", dir=folder)
    except OSError as err:
        raise TargetError(f"output {folder / name}: cannot write in {folder} ({err.strerror})") from None
    os.rmdir(probe)


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `out` that must not be written or replaced (see the module's rules).

    Raises TargetError naming the folder and the reason."""
    out = Path(out)
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
                raise TargetError(f"output {out} exists; pass --overwrite (overwrite=True in Python) to replace it")
            extra = _unlisted(out)
            if extra:
                raise TargetError(f"output {out} holds files that are not part of the artifact "
                                  f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); replacing it would "
                                  "delete them: move them out first")
        _probe_writable(real.parent, out.name)
        return
    ancestor = real.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TargetError(f"output {out}: {ancestor} is a file, not a folder")
    _probe_writable(ancestor, out.name)


def check_apart(out: Path, folder: Path, what: str) -> None:
    """Refuse an `out` equal to, inside or containing `folder` (a folder the run reads from), naming both."""
    a, b = _absolute(Path(out)), _absolute(Path(folder))
    if a == b or b in a.parents or a in b.parents:
        how = "is" if a == b else ("is inside" if b in a.parents else "contains")
        raise TargetError(f"output {out} {how} {what} {folder}; write the artifact somewhere else")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers come from an earlier run in this process that did not finish
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(out: Path) -> list[str]:
    """Repair what dead runs left beside `out`: restore an old artifact that an interrupted replacement moved aside
    (when `out` is missing), remove their temporary folders. Returns one message per thing done."""
    out = Path(out)
    parent = _absolute(out).parent
    if not parent.is_dir():
        return []
    name = re.escape(out.name)
    old_re, tmp_re = re.compile(rf"\.{name}\.old-(\d+)"), re.compile(rf"\.{name}\.tmp-(\d+)-\w{{{_TMP_RANDOM}}}")
    done = []
    for p in sorted(parent.iterdir()):
        m = old_re.fullmatch(p.name)
        if not m or _alive(int(m.group(1))) or p.is_symlink():
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
        if m and not _alive(int(m.group(1))) and p.is_dir() and not p.is_symlink():
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
