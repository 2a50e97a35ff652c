"""`compress generate --draft` / api.generate(draft=...): every drafter gives --draft none's greedy tokens with its
counts in --json, a compressed artifact drafts for its dense source, and bad drafts exit 2 naming the field or file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from compress import api
from compress.cli import cli
from export import medusa
from export.medusa import MedusaHeads

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.enabled=false"]
PROMPT = "import os import os import"


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "w4"
    passes = [{"pass": "gptq", "bits": 4, "group_size": 32, "sym": True}]
    return api.run({"name": "w4", "model": str(tiny_llama), "passes": passes}, out=out, overrides=SMALL,
                   log=lambda *_: None).artifact


def _generate(*args: str) -> dict:
    res = CliRunner().invoke(cli, ["generate", *args, "--prompt", PROMPT, "-n", "24", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _heads(hidden: int) -> MedusaHeads:
    torch.manual_seed(0)
    heads = MedusaHeads(hidden, 4)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    return heads


def test_every_draft_gives_plain_greedy_tokens_and_counts(quantized, tiny_llama, monkeypatch):
    monkeypatch.setattr(medusa, "load_heads", lambda path: _heads(96))  # random heads: drafts kept and refused
    plain = _generate(str(quantized), "--kernel", "dense")
    assert plain["draft"] == "none" and "drafted" not in plain
    for draft in ("heads", "ngram", f"model:{quantized}"):
        out = _generate(str(quantized), "--kernel", "dense", "--draft", draft)
        assert out["token_ids"] == plain["token_ids"], draft
        assert out["draft"] == draft
        assert 0 <= out["accepted"] <= out["drafted"] and out["steps"] >= 1
        assert out["mean_accepted_length"] == pytest.approx(out["accepted"] / out["steps"], abs=1e-4)
    res = CliRunner().invoke(cli, ["generate", str(quantized), "--prompt", PROMPT, "-n", "8", "--draft", "ngram"])
    assert res.exit_code == 0 and "draft ngram:" in res.output and "drafted tokens accepted" in res.output


def test_compressed_artifact_drafts_for_its_dense_source(quantized, tiny_llama):
    """The dense source (a Hugging Face folder, no manifest) with its 4-bit artifact drafting: the dense model's own
    greedy tokens, most drafts accepted (the artifact agrees with its source on most tokens)."""
    dense = _generate(str(tiny_llama))
    out = _generate(str(tiny_llama), "--draft", f"model:{quantized}")
    assert out["token_ids"] == dense["token_ids"]
    assert out["accepted"] > 0
    assert api.generate(tiny_llama, PROMPT, 24, draft=f"model:{quantized}").token_ids == dense["token_ids"]


def test_bad_drafts_exit_2_naming_field_or_file(quantized, tiny_llama, tmp_path):
    assert medusa.load_heads(quantized) is None  # an artifact without heads
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    cases = [(["--draft", "heads"], f"draft: heads: {quantized} has no drafter heads"),
             (["--draft", "medusa"], "draft: 'medusa'; expected heads, ngram, none or model:PATH"),
             (["--draft", "model:"], "draft: 'model:'; expected"),
             (["--draft", f"model:{tmp_path / 'nope'}"], f"draft: model:{tmp_path / 'nope'}: no such folder"),
             (["--draft", f"model:{other}"], f"draft: {other / 'tokenizer.json'}: another tokenizer than")]
    for args, message in cases:
        res = CliRunner().invoke(cli, ["generate", str(quantized), "--prompt", "x", "-n", "2", *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
    with pytest.raises(api.InputError, match="draft: 'medusa'"):
        api.generate(quantized, "x", 2, draft="medusa")


def test_heads_stored_by_a_medusa_pass_draft_exactly(tiny_llama, tmp_path):
    """An artifact from a recipe with a medusa pass (heads trained briefly, stored in the artifact): --draft heads
    reads them and gives --draft none's tokens, some drafts accepted."""
    passes = [{"pass": "medusa", "held_out": 2, "train": {"steps": 20, "batch_size": 64}}]
    art = api.run({"name": "heads", "model": str(tiny_llama), "passes": passes}, out=tmp_path / "heads",
                  overrides=SMALL, log=lambda *_: None).artifact
    assert medusa.load_heads(art) is not None
    plain = _generate(str(art))
    out = _generate(str(art), "--draft", "heads")
    assert out["token_ids"] == plain["token_ids"]
    assert out["accepted"] > 0
