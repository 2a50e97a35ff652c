"""Text sources and token windows: deterministic, disjoint splits; seeded windows; clear errors."""

import json

import pytest
import torch

from calibration.sources import eval_windows, load_corpus, sample_windows
from compress.errors import InputError


def test_pydoc_splits_are_disjoint_and_deterministic():
    c = load_corpus("pydoc")
    cal, held = c.split("calibration"), c.split("heldout")
    assert len(c.documents) > 50
    mask = c.heldout_mask()
    assert 0.15 < len(held) / (len(held) + len(cal)) <= 0.2
    for d, h in zip(c.documents, mask):
        if h:
            assert d in held and d not in cal
    assert load_corpus("pydoc").split("heldout") == held


def test_licenses_corpus_is_other_domain():
    text = load_corpus("licenses").split("all")
    assert "Permission is hereby granted" in text or "Redistribution and use" in text


def test_windows_are_seeded_and_non_overlapping():
    tokens = torch.arange(10_000)
    a = sample_windows(tokens, 16, 100, seed=3, what="t")
    b = sample_windows(tokens, 16, 100, seed=3, what="t")
    c = sample_windows(tokens, 16, 100, seed=4, what="t")
    assert a.shape == (16, 100) and torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0].sort().values
    assert (starts[1:] - starts[:-1]).min() >= 100  # no overlap
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 99, dtype=torch.long))  # contiguous


def test_too_small_corpus_says_how_much():
    with pytest.raises(InputError, match="has 950 tokens = 9 windows of 100; the recipe asks for 10"):
        sample_windows(torch.arange(950), 10, 100, seed=0, what="calibration source 'x'")
    with pytest.raises(InputError, match="has 5 tokens, fewer than one window of 8"):
        eval_windows(torch.arange(5), 8, 4, "held-out 'x'")


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} text" for i in range(10)))
    assert len(load_corpus(str(tmp_path / "a.txt")).documents) == 10
    rows = [{"text": f"row {i}", "other": 1} for i in range(7)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_corpus(str(tmp_path / "d.jsonl"), field="text").documents[3] == "row 3"
    with pytest.raises(InputError, match="d.jsonl:1: no field 'body'"):
        load_corpus(str(tmp_path / "d.jsonl"), field="body")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_corpus(str(tmp_path / "d.parquet"), field="text").documents[6] == "row 6"
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(InputError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
