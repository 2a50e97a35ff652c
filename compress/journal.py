"""The run journal: what an unfinished run of an artifact was started with, so that `--resume` can check it.

A run writes its journal (recipe, model files, calibration tokens) before any pass starts and removes it once the
artifact is written. The passes' expensive work (variant databases, search states) is cached by content, so any
rerun reuses what matches; `--resume` additionally insists that nothing changed since the interrupted run and
refuses, naming what changed, when something did (a resumed search on other inputs is a different search).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from compress.atomic import write_text_atomic
from compress.errors import InputError


def journal_path(runs: Path, out: Path) -> Path:
    """One journal per artifact folder (by its absolute path)."""
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:20]
    return runs / "journal" / f"{key}.json"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def differences(saved: dict, now: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs (recipe fields by their dotted path)."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def start(path: Path, out: Path, entry: dict, resume: bool) -> str | None:
    """Check a resume against the journal (refusing with what changed), then record this run. Returns a line for
    the log when an earlier unfinished run of the same artifact is found."""
    try:
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None and not isinstance(saved.get("entry"), dict):
            raise ValueError("no entry")
    except (ValueError, AttributeError) as err:
        if resume:
            raise InputError(f"{path}: the run journal of {out} is unreadable ({err}); it cannot be checked, "
                             "run without --resume (cached work whose inputs match is still reused)") from None
        saved = None  # a fresh run replaces it
    if resume:
        if saved is None:
            raise InputError(f"--resume: no unfinished run of {out} is recorded (it finished, or never started); "
                             "run without --resume")
        changed = differences(saved["entry"], entry)
        if changed:
            raise InputError(f"--resume: {out} cannot be resumed, its inputs changed since the interrupted run "
                             f"(what changed: {'; '.join(changed)}); run without --resume to start over")
    note = None
    if saved is not None and not resume:
        note = (f"an unfinished run of {out} was found; cached work is reused where its inputs match "
                "(--resume also checks that nothing changed)")
    write_text_atomic(path, json.dumps({"out": str(out.resolve()), "entry": entry}, indent=1))
    return note


def finish(path: Path) -> None:
    path.unlink(missing_ok=True)
