"""Bad-input cases for --out and --overwrite; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing
written). Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model,
artifact. The folders that a refused --overwrite must leave alone are checked file by file in test_output_target.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

GOOD = {"name": "t", "calibration": {"windows": 8, "seq_len": 64},
        "evaluate": {"seq_len": 64, "max_windows": 2, "extra": []},
        "passes": [{"pass": "flap", "target": 0.3}]}


def recipe(root: Path, model: Path, name: str) -> Path:
    p = root / f"output-{name}.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "model": str(model)}))
    return p


def _fresh(root: Path, name: str) -> Path:
    p = root / name
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)
    return p


def model_copy(f, name: str) -> Path:
    """A copy of the tiny model under root/name."""
    dst = _fresh(f["root"], name)
    shutil.copytree(f["model"], dst)
    return dst


def model_in_parent(f, name: str) -> Path:
    """root/name/model: a folder that contains a model."""
    parent = _fresh(f["root"], name)
    parent.mkdir()
    shutil.copytree(f["model"], parent / "model")
    return parent


def plain_folder(f, name: str, files: dict[str, str]) -> Path:
    dst = _fresh(f["root"], name)
    for rel, text in files.items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text(text)
    return dst


def artifact_plus(f, name: str, rel: str) -> Path:
    """A copy of the good artifact with one file of the user's added."""
    dst = _fresh(f["root"], name)
    shutil.copytree(f["artifact"], dst)
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    (dst / rel).write_text("my notes\n")
    return dst


def link(f, name: str, to: Path) -> Path:
    p = _fresh(f["root"], name)
    p.symlink_to(to, target_is_directory=True)
    return p


def model_with_file(f, name: str, rel: str, text: str | None = None, link_to: Path | None = None) -> Path:
    dst = model_copy(f, name)
    (dst / rel).unlink(missing_ok=True)
    if link_to is not None:
        (dst / rel).symlink_to(link_to)
    else:
        (dst / rel).write_text(text or "")
    return dst


def outside_file(f, name: str, text: str) -> Path:
    p = f["root"] / name
    p.write_text(text)
    return p


def run(f, out, *extra, model=None, name="r"):
    return ["run", "-r", recipe(f["root"], model or f["model"], name), "--out", out, *extra]


def _git_checkout(f, name):
    return plain_folder(f, name, {".git/HEAD": "ref: refs/heads/main\n", "README.md": "my project\n", "src/a.py": "x = 1\n"})


CASES = [
    # --overwrite of folders that are not artifacts
    ("output-overwrite-source-model", lambda f: run(f, m := model_copy(f, "src-a"), "--overwrite", model=m, name="a"),
     "is not a compress artifact"),
    ("output-overwrite-source-parent", lambda f: run(f, p := model_in_parent(f, "src-b"), "--overwrite", model=p / "model",
                                                     name="b"), "is not a compress artifact"),
    ("output-overwrite-model-folder", lambda f: run(f, model_copy(f, "other-model"), "--overwrite"), "is not a compress artifact"),
    ("output-overwrite-notes-folder", lambda f: run(f, plain_folder(f, "notes", {"notes.txt": "mine\n"}), "--overwrite"),
     "is not a compress artifact"),
    ("output-overwrite-git-checkout", lambda f: run(f, _git_checkout(f, "checkout"), "--overwrite"), "is not a compress artifact"),
    ("output-overwrite-only-hidden", lambda f: run(f, plain_folder(f, "hidden", {".env": "KEY=1\n"}), "--overwrite"),
     "is not a compress artifact"),
    ("output-overwrite-other-manifest", lambda f: run(f, plain_folder(f, "other-fmt", {"manifest.json": json.dumps({"format": "x"})}),
                                                      "--overwrite"), "is not a compress artifact"),
    ("output-overwrite-list-manifest", lambda f: run(f, plain_folder(f, "list-fmt", {"manifest.json": "[1, 2]"}), "--overwrite"),
     "is not a compress artifact"),
    ("output-overwrite-bad-manifest", lambda f: run(f, plain_folder(f, "bad-fmt", {"manifest.json": "{not json"}), "--overwrite"),
     "is not a compress artifact"),
    ("output-non-artifact-no-overwrite", lambda f: run(f, plain_folder(f, "notes2", {"a.txt": "mine\n"})), "is not a compress artifact"),
    # artifacts that hold a user's files
    ("output-overwrite-artifact-with-notes", lambda f: run(f, artifact_plus(f, "art-notes", "NOTES.md"), "--overwrite"),
     "holds files that are not part of the artifact (NOTES.md)"),
    ("output-overwrite-artifact-with-subfolder", lambda f: run(f, artifact_plus(f, "art-sub", "eval/run1.json"), "--overwrite"),
     "holds files that are not part of the artifact (eval/run1.json)"),
    # symbolic links
    ("output-symlink-to-artifact", lambda f: run(f, link(f, "ln-art", f["artifact"]), "--overwrite"), "is a symbolic link"),
    ("output-symlink-to-model", lambda f: run(f, link(f, "ln-model", f["model"]), "--overwrite"), "is a symbolic link"),
    ("output-symlink-to-parent", lambda f: run(f, link(f, "ln-parent", f["root"]), "--overwrite"), "is a symbolic link"),
    ("output-symlink-dangling", lambda f: run(f, link(f, "ln-none", f["root"] / "nowhere")), "is a symbolic link"),
    # inside or around the source model
    ("output-inside-source", lambda f: run(f, (m := model_copy(f, "src-c")) / "artifact", model=m, name="c"),
     "is inside the source model folder"),
    ("output-inside-source-deep", lambda f: run(f, (m := model_copy(f, "src-d")) / "a" / "b", "--overwrite", model=m, name="d"),
     "is inside the source model folder"),
    ("output-around-source", lambda f: run(f, p := plain_folder(f, "around", {}), model=model_copy(f, "around/m"),
                                           name="e"), "is not a compress artifact"),
    # places that cannot hold a folder
    ("output-is-file", lambda f: run(f, outside_file(f, "a-file", "x")), "exists and is not a folder"),
    ("output-parent-is-file", lambda f: run(f, outside_file(f, "b-file", "x") / "sub"), "is a file, not a folder"),
    ("output-grandparent-is-file", lambda f: run(f, outside_file(f, "c-file", "x") / "a" / "b"), "is a file, not a folder"),
    ("output-root", lambda f: run(f, "/", "--overwrite"), "name a new folder"),
    ("output-dot", lambda f: run(f, ".", "--overwrite"), "name a new folder"),
    ("output-dotdot", lambda f: run(f, "..", "--overwrite"), "name a new folder"),
    ("output-contains-cwd", lambda f: run(f, str(Path.cwd().parent), "--overwrite"), "is the current folder or contains it"),
    ("output-name-too-long", lambda f: run(f, f["root"] / ("x" * 250)), "is too long (250 bytes"),
    ("output-middle-name-too-long", lambda f: run(f, f["root"] / ("y" * 300) / "model"), "is too long (300 bytes"),
    ("output-path-too-long", lambda f: run(f, f["root"].joinpath(*["z" * 200] * 30)), "the path is too long"),
    ("output-read-only-place", lambda f: run(f, "/sys/compress-artifact"), "cannot write in /sys"),
    # files the artifact would copy from the source
    ("output-source-link-outside", lambda f: run(f, f["root"] / "o1", model=model_with_file(
        f, "src-f", "generation_config.json", link_to=outside_file(f, "secret.json", "{}")), name="f"),
     "outside the model folder"),
    ("output-source-template-link-outside", lambda f: run(f, f["root"] / "o2", model=model_with_file(
        f, "src-g", "chat_template.jinja", link_to=outside_file(f, "t.jinja", "{{ x }}")), name="g"),
     "chat_template.jinja: a symbolic link"),
    ("output-source-json-not-json", lambda f: run(f, f["root"] / "o3", model=model_with_file(
        f, "src-h", "generation_config.json", text="{not json"), name="h"), "generation_config.json: not valid JSON"),
    ("output-source-json-binary", lambda f: run(f, f["root"] / "o4", model=model_with_file(
        f, "src-i", "special_tokens_map.json", text="\x00\x01"), name="i"), "special_tokens_map.json: not valid JSON"),
]

assert os.sep == "/"  # the cases name POSIX places
