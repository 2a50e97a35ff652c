"""Artifacts after the fact: the typed manifest reads back what the writer wrote, Hugging Face cache layouts still
verify, and Llama-3-style configs (a list of end-of-text ids, no pad id) evaluate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import export
from compress import api
from compress.evaluate import pad_token_id
from export.format import MAX_LISTED, ArtifactError, Manifest
from tests.tiny import make_tiny_model

SMALL = ["calibration.windows=4", "calibration.seq_len=32", "evaluate.seq_len=32", "evaluate.max_windows=1",
         "evaluate.extra=[]"]


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory) -> Path:
    """A tiny model whose config lists two end-of-text ids and has no pad id, as Llama-3.x-Instruct ships."""
    folder = make_tiny_model(tmp_path_factory.mktemp("llama3-style"), "llama", eos_token_id=[0, 1], pad_token_id=None)
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == [0, 1] and config.get("pad_token_id") is None
    return folder


def test_eval_with_an_eos_list_and_no_pad(llama3_style, tmp_path):
    res = api.run({"name": "l3", "model": str(llama3_style), "passes": [{"pass": "flap", "target": 0.3}]},
                  out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    ev = api.eval(res.artifact, max_windows=1, new_tokens=4)
    dense, comp = ev.rows
    assert dense["tokens/s"] > 0 and comp["tokens/s"] > 0 and comp["params"] < dense["params"]
    assert pad_token_id(export.load(res.artifact)) == 0  # the first end-of-text id


def _snapshot_with_link(artifact: Path, repo: Path, aside: str) -> tuple[Path, Path]:
    """A copy of `artifact` at `repo/snapshots/0123abc` whose config.json links to `repo/<aside>/config.json`; the
    folder and the link's target."""
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(artifact, snapshot)
    target = repo / aside / "config.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").rename(target)
    os.symlink(target, snapshot / "config.json")
    return snapshot, target


@pytest.mark.parametrize("repo_name, aside, blobs", [
    ("work", "blobs", False),  # a folder merely named snapshots: no cache, whatever its neighbours are called
    ("work", "blobs", True),
    ("models--org--art", "files", False),  # cache-named, but no blobs folder: not a cache
    ("models--org--art", "refs", True),  # a real cache, but the link leaves its blobs
])
def test_a_folder_named_snapshots_is_not_a_cache(artifact, tmp_path, repo_name, aside, blobs):
    """Only a hub cache (`models--*` with a `blobs/` folder) lets links leave the snapshot, and only into `blobs/`;
    anything else that merely sits under `snapshots/` is refused by file (the old rule allowed all of the repo)."""
    if blobs:
        (tmp_path / repo_name / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot, target = _snapshot_with_link(artifact, tmp_path / repo_name, aside)
    expected = f"config.json: resolves to {target}, outside the artifact folder"
    assert export.verify(snapshot) == [expected]
    with pytest.raises(ArtifactError, match=expected):
        export.load(snapshot)


def test_load_lists_at_most_max_listed_tensors_and_counts_the_rest(artifact, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.unit.bad_inputs_artifact import WEIGHTS

    art = tmp_path / "nan"
    shutil.copytree(artifact, art)
    state = load_file(art / WEIGHTS)
    floats = sorted(k for k, t in state.items() if t.is_floating_point())
    assert len(floats) > MAX_LISTED + 2
    for name in floats:
        state[name].view(-1)[0] = float("nan")
    save_file(state, art / WEIGHTS, metadata={"format": "pt"})  # same sizes: only verify's hashes would see it
    with pytest.raises(ArtifactError) as err:
        export.load(art)
    message = str(err.value)
    assert f"non-finite values (NaN or Inf) in {len(floats)} tensor(s): " in message
    assert message.endswith(f" and {len(floats) - MAX_LISTED} more")
    assert message.count(" (1)") == MAX_LISTED


def test_pad_token_id_order():
    from transformers import GenerationConfig

    from tests.tiny import tiny_config

    class Model(torch.nn.Module):
        def __init__(self, config, generation=None):
            super().__init__()
            self.config, self.generation_config = config, generation

    assert pad_token_id(Model(tiny_config("llama", eos_token_id=[5, 1], pad_token_id=None))) == 5
    assert pad_token_id(Model(tiny_config("llama", eos_token_id=[5, 1], pad_token_id=7))) == 7
    assert pad_token_id(Model(tiny_config("llama", eos_token_id=[], pad_token_id=None))) == 0
    assert pad_token_id(Model(tiny_config("llama", eos_token_id=None, pad_token_id=None))) == 0
    assert pad_token_id(Model(tiny_config("llama", eos_token_id=3, pad_token_id=None),
                              GenerationConfig(pad_token_id=9))) == 9


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("art-checks") / "art"
    api.run({"name": "q", "model": str(tiny_llama), "passes": [{"pass": "rtn", "bits": 4, "group_size": 32}]},
            out=out, overrides=SMALL, log=lambda *_: None)
    return out


def test_manifest_reads_back_what_the_writer_wrote(artifact):
    raw = json.loads((artifact / "manifest.json").read_text())
    manifest = Manifest.model_validate(raw)
    assert manifest.model_dump() == raw  # nothing dropped or added: the typed view is the on-disk format
    assert len(manifest.quantization) == 21 and manifest.architecture.layers[0].num_key_value_heads == 3
    assert export.verify(artifact) == []


def test_a_hugging_face_cache_snapshot_verifies(artifact, tmp_path):
    """Files of a cache snapshot are links into the repository's blobs: inside, so allowed; a link elsewhere is not."""
    repo = tmp_path / "models--org--art"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in artifact.iterdir():
        shutil.copy(p, repo / "blobs" / f"blob-{p.name}")
        os.symlink(f"../../blobs/blob-{p.name}", snapshot / p.name)
    assert export.verify(snapshot) == []
    assert export.load(snapshot) is not None
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(artifact / "config.json", elsewhere)
    (snapshot / "config.json").unlink()
    os.symlink(elsewhere, snapshot / "config.json")
    assert export.verify(snapshot) == [f"config.json: resolves to {elsewhere}, outside the artifact folder"]
