"""Bad-input cases for manifests, verify, inspect, eval of artifacts; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing written).

Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model, artifact.
Each case works on its own copy of the good artifact (root/art-<case>), never on the artifact itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def _copy(f: dict, case: str) -> Path:
    dst = f["root"] / f"art-{case}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(f["artifact"], dst, symlinks=True)
    return dst


def _rehash(art: Path, manifest: dict, rel: str) -> None:
    """Record `rel`'s current sha256 and size in `manifest`, as a writer (or an attacker) consistent with it would."""
    from export.writer import sha256_file

    manifest["files"][rel] = {"sha256": sha256_file(art / rel), "bytes": (art / rel).stat().st_size}


def _edit(case: str, change: Callable[[dict, Path, dict], object], command: str = "verify") -> Callable:
    """build(): a copy whose manifest.json is `change(manifest, copy, folders)` applied in place (or its result, when
    it returns something other than None: raw text or bytes, a list...)."""

    def build(f: dict) -> list:
        art = _copy(f, case)
        manifest = json.loads((art / "manifest.json").read_text())
        result = change(manifest, art, f)
        data = manifest if result is None else result
        raw = data if isinstance(data, (str, bytes)) else json.dumps(data)
        (art / "manifest.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        return [command, art]

    return build


def _set(path: str, value) -> Callable[[dict, Path, dict], None]:
    """A change that sets manifest[a][b]... (path split on '/') to `value`, or deletes it when value is _DELETE."""

    def change(m: dict, art: Path, f: dict) -> None:
        *parents, last = path.split("/")
        node = m
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


_DELETE = object()


def _outside_weights(m: dict, art: Path, f: dict) -> None:
    """The weights moved next to the artifact and named by `..`: verify would read and hash a file outside it."""
    outside = art.parent / f"outside-{art.name}.safetensors"
    shutil.move(art / WEIGHTS, outside)
    rel = f"../{outside.name}"
    m["files"][rel] = m["files"].pop(WEIGHTS)
    for t in m["tensors"].values():
        t["file"] = rel


def _absolute_weights(m: dict, art: Path, f: dict) -> None:
    outside = art.parent / f"outside-{art.name}.safetensors"
    shutil.move(art / WEIGHTS, outside)
    m["files"][str(outside)] = m["files"].pop(WEIGHTS)
    for t in m["tensors"].values():
        t["file"] = str(outside)


def _linked_weights(m: dict, art: Path, f: dict) -> None:
    """The weights file replaced by a link to an identical copy outside: same bytes, same hash, not in the folder."""
    outside = art.parent / f"outside-{art.name}.safetensors"
    shutil.move(art / WEIGHTS, outside)
    os.symlink(outside, art / WEIGHTS)


def _linked_folder(m: dict, art: Path, f: dict) -> None:
    """A listed file inside a linked folder that points outside (the link is on the way, not the file itself)."""
    outside = art.parent / f"outside-{art.name}"
    outside.mkdir(exist_ok=True)
    (outside / "notes.txt").write_text("outside")
    os.symlink(outside, art / "extras")
    m["files"]["extras/notes.txt"] = {"sha256": "0" * 64, "bytes": 7}


def _unlisted_link(m: dict, art: Path, f: dict) -> None:
    os.symlink("/etc/hostname", art / "notes.txt")


def _poison(value: float, tensor: str = "model.norm.weight") -> Callable[[dict, Path, dict], None]:
    """One value of `tensor` set to NaN or Inf, and the manifest rehashed: the file is consistent with it."""

    def change(m: dict, art: Path, f: dict) -> None:
        state = load_file(art / WEIGHTS)
        state[tensor].view(-1)[3] = value
        save_file(state, art / WEIGHTS, metadata={"format": "pt"})
        _rehash(art, m, WEIGHTS)

    return change


def _changed_source(how: str) -> Callable[[dict, Path, dict], None]:
    """The artifact pointed at its own copy of the source model, and that copy changed after the run."""

    def change(m: dict, art: Path, f: dict) -> None:
        src = art.parent / f"model-{art.name}"
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(f["model"], src)
        if how == "altered":
            state = load_file(src / WEIGHTS)
            state["model.norm.weight"].mul_(1.01)
            save_file(state, src / WEIGHTS, metadata={"format": "pt"})
        else:  # a second weights file appeared
            shutil.copy(src / WEIGHTS, src / "extra.safetensors")
        m["source"].update(name=str(src), identity=str(src), path=str(src))

    return change


def _config(text: str) -> Callable[[dict, Path, dict], None]:
    def change(m: dict, art: Path, f: dict) -> None:
        (art / "config.json").write_text(text)
        _rehash(art, m, "config.json")

    return change


def _quantize_entry(scheme: dict, name: str = "model.layers.0.mlp.up_proj") -> Callable[[dict, Path, dict], None]:
    def change(m: dict, art: Path, f: dict) -> None:
        m.setdefault("quantization", {})[name] = {"bits": 4, "group_size": 32, "sym": True, "ordered": True,
                                                  "shape": [128, 96], "format": "compressed-tensors", **scheme}

    return change


def _linked_manifest(f: dict) -> list:
    """manifest.json a link to a manifest outside the folder, which could then describe anything."""
    art = _copy(f, "manifest-link-out")
    outside = art.parent / "outside-manifest.json"
    shutil.move(art / "manifest.json", outside)
    os.symlink(outside, art / "manifest.json")
    return ["inspect", art]


def _case(case: str, change, expected: str, command: str = "verify"):
    return (f"artifact-{case}", _edit(case, change, command), expected)


M = "manifest.json: "
CASES = [
    # a manifest that is not the shape the writer writes: each refused naming the field, in verify, inspect and eval
    _case("manifest-list", lambda m, a, f: [m], M + "a JSON object expected, got list"),
    _case("manifest-list-inspect", lambda m, a, f: [m], M + "a JSON object expected, got list", "inspect"),
    _case("manifest-not-json", lambda m, a, f: "{", M + "not valid JSON (JSONDecodeError"),
    _case("manifest-deep", lambda m, a, f: "[" * 100_000 + "]" * 100_000, M + "not valid JSON (RecursionError", "inspect"),
    _case("manifest-not-utf8", lambda m, a, f: b"\xff\xfe{}", M + "not valid JSON (UnicodeDecodeError"),
    _case("format-other", _set("format", "safetensors-zoo"), M + "format is 'safetensors-zoo'", "eval"),
    _case("version-text", _set("format_version", "one"), M + "format_version: 'one' is not an integer"),
    _case("version-float-inspect", _set("format_version", 1.5), M + "format_version: '1.5' is not an integer", "inspect"),
    _case("files-entry-string", _set("files/config.json", "abc"), M + "files.config.json: Input should be a valid dictionary"),
    _case("files-not-mapping-inspect", _set("files", ["config.json"]), M + "files: Input should be a valid dictionary",
          "inspect"),
    _case("bytes-negative", _set("files/config.json/bytes", -1), M + "files.config.json.bytes: Input should be greater than or equal to 0"),
    _case("sha-not-hex", _set("files/config.json/sha256", "xyz"), M + "files.config.json.sha256: String should match pattern"),
    _case("tensor-no-file", _set("tensors/model.norm.weight/file", _DELETE), M + "tensors.model.norm.weight.file: Field required"),
    _case("tensor-file-unlisted", _set("tensors/model.norm.weight/file", "other.safetensors"),
          M + "tensors.model.norm.weight.file: other.safetensors is not listed in files"),
    _case("tensor-shape-text", _set("tensors/model.norm.weight/shape", "96"),
          M + "tensors.model.norm.weight.shape: Input should be a valid list", "eval"),
    _case("no-tensors", _set("tensors", _DELETE), M + "tensors: Field required"),
    _case("no-source-inspect", _set("source", _DELETE), M + "source: Field required", "inspect"),
    _case("layers-not-list-inspect", _set("architecture/layers", {"0": {}}),
          M + "architecture.layers: Input should be a valid list", "inspect"),
    _case("layer-width", _set("architecture/layers/1/intermediate_size", 100),
          M + "architecture.layers.1: model.layers.1.mlp.gate_proj is [100, 96] (out, in) by these widths"),
    _case("layer-width-inspect", _set("architecture/layers/0/head_dim", 8),
          M + "architecture.layers.0: model.layers.0.self_attn.q_proj is [", "inspect"),
    _case("kv-heads-zero", _set("architecture/layers/0/num_key_value_heads", 0),
          M + "architecture.layers.0.num_key_value_heads: Input should be greater than or equal to 1", "eval"),
    _case("quant-group-zero", _quantize_entry({"group_size": 0}),
          M + "quantization.model.layers.0.mlp.up_proj: group_size 0 does not divide the 96 input columns"),
    _case("quant-unknown-module", _quantize_entry({"shape": [8, 96]}, "model.layers.0.mlp.nothing"),
          "manifest.json: quantization.model.layers.0.mlp.nothing: the model has no linear layer of that name", "eval"),
    # paths that leave the folder: verify would read and hash, and load would load, files outside the artifact
    _case("path-dotdot", _outside_weights,
          "'../outside-art-path-dotdot.safetensors' is not a plain path inside the artifact"),
    _case("path-absolute", _absolute_weights, "is not a plain path inside the artifact"),
    _case("path-dotdot-eval", _outside_weights, "is not a plain path inside the artifact", "eval"),
    _case("path-link-out", _linked_weights, "model.safetensors: resolves to "),
    _case("path-link-out-eval", _linked_weights, "outside the artifact folder", "eval"),
    _case("path-linked-folder", _linked_folder, "extras/notes.txt: resolves to "),
    _case("unlisted-link", _unlisted_link, "notes.txt: not listed in the manifest"),
    ("artifact-manifest-link-out", _linked_manifest, "manifest.json: resolves to "),
    # values: NaN or Inf weights are named by verify and refused by load (eval)
    _case("nan-weight", _poison(float("nan")), "model.safetensors: tensor model.norm.weight has 1 non-finite values"),
    _case("inf-weight", _poison(float("inf"), "model.layers.0.mlp.down_proj.weight"),
          "model.safetensors: tensor model.layers.0.mlp.down_proj.weight has 1 non-finite values"),
    _case("nan-weight-eval", _poison(float("nan")), "non-finite values (NaN or Inf) in 1 tensor(s): model.norm.weight (1)",
          "eval"),
    _case("recipe-broken-eval", _set("recipe/seed", 2**70),
          "manifest.json: recipe: seed: Input should be less than or equal to 9223372036854775807", "eval"),
    # the artifact's config and the source it is compared with
    _case("config-list-eval", _config("[]"), "config.json: a JSON object expected, got list", "eval"),
    _case("config-type-eval", _config('{"model_type": "no-such-model"}'), "config.json: cannot build a model from it",
          "eval"),
    _case("source-altered-eval", _changed_source("altered"),
          "model.safetensors: sha256 differs from the one recorded at run time", "eval"),
    _case("source-extra-eval", _changed_source("extra"), "extra.safetensors: not there at run time", "eval"),
]
