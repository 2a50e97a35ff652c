"""Run state: the in-memory cache searches read variants through (bounded by bytes, least recently used dropped
first), files written whole or not at all, unreadable journals refused by name, and the whole-model KL scorer."""

import json
import os
from pathlib import Path

import pytest
import torch

from compress import journal
from compress.atomic import write_atomic, write_text_atomic
from compress.errors import CompressError, InputError
from compress.search.scoring import TailKL
from compress.search.supernet import LoadCache, VariantDB


def test_load_cache_is_bounded_by_bytes_and_drops_the_least_recently_used():
    loads = []

    def load(name, level):
        loads.append((name, level))
        return {"weight": torch.zeros(level, 256)}  # level KiB of float32

    cache = LoadCache(load, max_bytes=3 * 1024)
    a, b = cache("a", 1), cache("b", 1)
    assert cache("a", 1) is a and cache.hits == 1 and cache.misses == 2
    cache("c", 1)  # three KiB: all held
    assert cache.bytes == 3 * 1024 and len(cache.items) == 3
    cache("d", 1)  # over: drops b, the least recently used (a was read after it)
    assert list(cache.items) == [("a", 1), ("c", 1), ("d", 1)] and cache.bytes == 3 * 1024
    assert cache("b", 1) is not b and loads.count(("b", 1)) == 2
    big = cache("e", 5)  # larger than the bound on its own: kept (the caller needs it), everything else dropped
    assert list(cache.items) == [("e", 5)] and cache.bytes == 5 * 1024 and cache("e", 5) is big


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "state.json"
    write_text_atomic(path, '{"generation": 3}')

    def dies(tmp: Path):
        tmp.write_text('{"gener')  # half written, then the process fails
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies)
    assert json.loads(path.read_text()) == {"generation": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's owner-only mode


def test_two_writers_of_one_variant_use_their_own_temporary_files(tmp_path, monkeypatch):
    """A budget sweep run in parallel writes the same variant twice: each writer has its own temporary name, so the
    real file is always one writer's complete version."""
    db = VariantDB(tmp_path / "db")
    names = []
    import compress.atomic as atomic

    real = atomic.os.replace

    def record(src, dst):
        names.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", record)
    db.put("m", 3, {"w": torch.ones(2)})
    db.put("m", 3, {"w": torch.full((2,), 2.0)})
    assert len(set(names)) == 2 and all(n.startswith(".m@3.safetensors.") for n in names)
    assert torch.equal(db.get("m", 3)[0]["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("content", ["{not json", '{"out": "x"}', "[]"])
def test_an_unreadable_journal_is_refused_naming_its_file(tmp_path, content):
    path = journal.journal_path(tmp_path / "runs", tmp_path / "art")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(InputError, match=f"{path.name}: the run journal of .* is unreadable.*run without --resume"):
        journal.start(path, tmp_path / "art", {"recipe": {}}, resume=True)
    assert journal.start(path, tmp_path / "art", {"recipe": {"a": 1}}, resume=False) is None  # a fresh run replaces it
    assert json.loads(path.read_text())["entry"] == {"recipe": {"a": 1}}


def test_tail_kl_from_the_first_block_only_keeps_one_input_copy_and_scores_the_same(tiny_llama):
    from compress.models import llama, load_model, resolve_model

    torch.manual_seed(0)
    model, _ = load_model(resolve_model(str(tiny_llama)))
    windows = torch.randint(0, model.config.vocab_size, (3, 32))
    every, first = TailKL(model, windows, batch_size=2), TailKL(model, windows, batch_size=2, any_start=False)
    # positions in chunks that do not divide a batch (2 x 32): must score as a whole batch at once does
    ragged = TailKL(model, windows, batch_size=2, any_start=False, chunk_tokens=7)
    assert ragged.kl_from(0) == pytest.approx(0.0, abs=1e-6)
    assert len(every.inputs) == len(llama.blocks(model)) + 1 and len(first.inputs) == 1
    assert first.kl_from(0) == every.kl_from(0) == 0.0
    with torch.no_grad():
        llama.blocks(model)[1].mlp.down_proj.weight.mul_(0.5)
    kl = first.kl_from(0)
    assert kl > 1e-4 and kl == pytest.approx(every.kl_from(0), rel=1e-6) and kl == pytest.approx(every.kl_from(1), rel=1e-5)
    with pytest.raises(ValueError, match="keeps only the first block's inputs"):
        first.kl_from(1)
    assert ragged.kl_from(0) == pytest.approx(kl, rel=1e-5)


def test_a_damaged_variant_is_named_with_what_to_do(tmp_path):
    db = VariantDB(tmp_path / "db")
    db.put("model.layers.0.mlp.down_proj", 3, {"w": torch.ones(64)})
    path = tmp_path / "db" / "model.layers.0.mlp.down_proj@3.safetensors"
    path.write_bytes(path.read_bytes()[:-40])  # truncated on disk
    with pytest.raises(CompressError, match=r"down_proj@3.safetensors: unreadable variant .*delete .*db to rebuild"):
        db.get("model.layers.0.mlp.down_proj", 3)
