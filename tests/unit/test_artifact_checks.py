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
from export.format import Manifest
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
