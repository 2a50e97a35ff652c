"""Where an artifact may go: refused --overwrite leaves every file as it was; leftovers of dead runs are repaired;
the commit works where folders cannot be exchanged; artifacts follow the umask."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import export.writer as writer
from compress.cli import cli
from export.target import TargetError, check_apart, check_target, hold, recover_leftovers

RECIPE = {"name": "t", "calibration": {"windows": 4, "seq_len": 32, "batch_size": 4},
          "evaluate": {"enabled": False, "extra": []}, "passes": [{"pass": "flap", "target": 0.3}]}


def _snapshot(folder: Path) -> dict:
    """Every path under `folder` (links not followed): kind, bytes, mode and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[p.relative_to(folder).as_posix()] = (p.is_symlink(), p.is_dir(), st.st_mode, st.st_mtime_ns,
                                                 None if p.is_dir() or p.is_symlink() else p.read_bytes())
    return out


def _recipe(tmp_path: Path, model: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**RECIPE, "model": str(model)}))
    return p


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def model(tiny_llama, tmp_path):
    import shutil

    dst = tmp_path / "parent" / "model"
    shutil.copytree(tiny_llama, dst)
    (dst / "NOTES.md").write_text("my notes on this model\n")
    return dst


@pytest.mark.parametrize("which", ["model", "parent", "link-to-model", "link-to-parent", "notes-folder"])
def test_refused_overwrite_changes_nothing(model, tmp_path, which):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    target = {"model": model, "parent": model.parent, "notes-folder": notes,
              "link-to-model": tmp_path / "ln-model", "link-to-parent": tmp_path / "ln-parent"}[which]
    if which.startswith("link"):
        target.symlink_to(model if which == "link-to-model" else model.parent, target_is_directory=True)
    recipe = _recipe(tmp_path, model)
    watched = [tmp_path]  # the whole tree: the model, its parent, the notes, the links
    before = [_snapshot(w) for w in watched]
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(target), "--overwrite"])
    assert res.exit_code == 2, res.output
    assert str(target) in res.output
    assert [_snapshot(w) for w in watched] == before


def test_overwrite_of_an_artifact_replaces_it_and_honours_the_umask(tiny_llama, tmp_path):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "art"
    old = os.umask(0o022)
    try:
        assert CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out)]).exit_code == 0
        first = json.loads((out / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
        res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out), "--overwrite",
                                       "--set", "passes.0.target=0.2"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"] != first
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "r.yaml"]


def test_an_empty_folder_is_written_into_without_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    res = CliRunner().invoke(cli, ["run", "-r", str(_recipe(tmp_path, tiny_llama)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file()


def test_commit_without_exchange_uses_two_renames(tiny_llama, tmp_path, monkeypatch):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "art"
    assert CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out)]).exit_code == 0
    seen = []
    monkeypatch.setattr(writer, "step", seen.append)

    def cannot(a, b):
        raise OSError(errno.EINVAL, "no exchange on this file system")

    monkeypatch.setattr(writer, "exchange", cannot)
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out), "--overwrite",
                                   "--set", "passes.0.target=0.2"])
    assert res.exit_code == 0, res.output
    assert seen[-3:] == ["moved the old artifact aside", "renamed into place", "removed the old artifact"]
    assert json.loads((out / "manifest.json").read_text())["recipe"]["passes"][0]["target"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "r.yaml"]


def test_an_unexpected_exchange_error_is_not_swallowed(tiny_llama, tmp_path, monkeypatch):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "art"
    assert CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out)]).exit_code == 0
    before = _snapshot(out)

    def broken(a, b):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(writer, "exchange", broken)
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out), "--overwrite"])
    assert res.exit_code != 0 and isinstance(res.exception, OSError)
    assert _snapshot(out) == before  # the old artifact is untouched, and the new one's folder was removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "r.yaml"]


def _fake_artifact(folder: Path, target: float) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "compress-artifact", "files": {}, "t": target}))
    return folder


def test_recover_restores_an_old_artifact_when_out_is_missing(tmp_path):
    pid = _dead_pid()
    out = tmp_path / "art"
    _fake_artifact(tmp_path / f".art.old-{pid}", 0.2)
    (tmp_path / f".art.tmp-{pid}-abcd1234").mkdir()
    done = recover_leftovers(out)
    assert json.loads((out / "manifest.json").read_text())["t"] == 0.2
    assert len(done) == 2 and "restored" in done[0] and str(pid) in done[0] and "removed .art.tmp-" in done[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_recover_removes_an_old_artifact_when_out_exists(tmp_path):
    pid = _dead_pid()
    out = _fake_artifact(tmp_path / "art", 0.3)
    _fake_artifact(tmp_path / f".art.old-{pid}", 0.2)
    assert len(recover_leftovers(out)) == 1
    assert json.loads((out / "manifest.json").read_text())["t"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_recover_leaves_live_runs_and_other_folders_alone(tmp_path):
    out = tmp_path / "art"
    live = [f".art.tmp-{_dead_pid()}-abcd1234", f".art.old-{_dead_pid()}"]  # a live run holds them, whatever its id
    other = [".art.tmp-notapid", ".other.tmp-1-abcd1234", ".art.bak"]
    for name in live + other:
        (tmp_path / name).mkdir()
    locks = [hold(tmp_path / name) for name in live]
    try:
        assert recover_leftovers(out) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + other)
    finally:
        for fd in locks:
            os.close(fd)
    assert len(recover_leftovers(out)) == 2  # once their run is gone, they are cleaned
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(other)


def test_a_failed_removal_of_the_old_artifact_is_a_note_not_a_failure(tiny_llama, tmp_path, monkeypatch):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "art"
    assert CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out)]).exit_code == 0
    real_rmtree = writer.shutil.rmtree

    def refuse_old(path, *args, **kwargs):
        if ".art.tmp-" in str(path) and (Path(path) / "manifest.json").exists() and not kwargs.get("ignore_errors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(writer.shutil, "rmtree", refuse_old)
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out), "--overwrite",
                                   "--set", "passes.0.target=0.2"])
    assert res.exit_code == 0, res.output
    assert "note: the new artifact is in place, but the old one could not be removed" in res.output
    assert json.loads((out / "manifest.json").read_text())["recipe"]["passes"][0]["target"] == 0.2


def test_an_artifact_used_as_source_is_not_overwritten_by_its_own_run(tiny_llama, tmp_path):
    """A stock pruned artifact may be a source; --out on it with --overwrite passes the artifact rule and is stopped
    by the source rule, before anything changes."""
    src = tmp_path / "pruned"
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump({**RECIPE, "model": str(tiny_llama),
                                     "passes": [{"pass": "flap", "target": 0.3, "structure": "uniform"}]}))
    assert CliRunner().invoke(cli, ["run", "-r", str(first), "--out", str(src)]).exit_code == 0
    recipe = _recipe(tmp_path, src)
    before = _snapshot(tmp_path)
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(src), "--overwrite"])
    assert res.exit_code == 2 and "is the source model folder" in res.output, res.output
    assert _snapshot(tmp_path) == before


def test_check_target_and_apart_name_the_folder(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(TargetError, match="is inside the source model folder"):
        check_apart(tmp_path / "m" / "x", tmp_path / "m", "the source model folder")
    with pytest.raises(TargetError, match="contains the source model folder"):
        check_apart(tmp_path, tmp_path / "m", "the source model folder")
    with pytest.raises(TargetError, match=r"is the source model folder"):
        check_apart(tmp_path / "m" / ".." / "m", tmp_path / "m", "the source model folder")
    check_apart(tmp_path / "n", tmp_path / "m", "the source model folder")
    check_target(tmp_path / "new" / "deeper", overwrite=False)  # parents that do not exist yet are fine
    assert not (tmp_path / "new").exists()
