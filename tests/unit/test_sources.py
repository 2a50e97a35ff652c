"""Text sources and token windows: deterministic, disjoint splits; seeded windows drawn across the whole split;
chunked tokenization equal to one call on the whole text (so the packaged corpora give the windows they always gave);
bad rows and files named; the memory check's numbers, read from fake /proc and cgroup trees."""

import json
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import budget, readers, sources
from calibration.sources import (draw_windows, eval_windows, load_corpus, pool_tokens, sample_windows,
                                 tokenize)
from compress.errors import InputError
from tests.tiny import make_tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _family_tokenizer(kind: str):
    """A BPE of 2000 tokens trained on pydoc with the pre-tokenizer of a model family: SmolLM2 (the default model:
    digits apart, then GPT-2 byte-level), Llama-3 (its split regex, then bytes), sentencepiece-style Metaspace."""
    from pydoc_data.topics import topics
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = {
        "smollm2": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "metaspace": pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
    }[kind]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind != "metaspace" else []
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_tok():
    return make_tokenizer()


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


def _default_windows(tokens_cal, tokens_held):
    """What the default recipe (llama-30pct: 64 x 256, seed 0; evaluate 32 x 256) draws from two token streams."""
    return sample_windows(tokens_cal, 64, 256, 0, "c"), eval_windows(tokens_held, 256, 32, "h")


def test_packaged_corpora_give_the_windows_one_whole_text_call_gives(tiny_tok):
    """The measured numbers depend on these windows: chunked, early-stopping tokenization must not move a token."""
    pydoc, licenses = load_corpus("pydoc"), load_corpus("licenses")
    assert len(pydoc.split("calibration")) > 4 * sources.CHUNK_CHARS  # several cuts happen
    old_cal, old_held = tokenize(tiny_tok, pydoc.split("calibration")), tokenize(tiny_tok, pydoc.split("heldout"))
    new_cal = pydoc.tokens(tiny_tok, "calibration", pool_tokens(64, 256))
    assert torch.equal(new_cal, old_cal)  # below the pool: the whole split, token for token
    for a, b in zip(_default_windows(old_cal, old_held),
                    _default_windows(new_cal, pydoc.tokens(tiny_tok, "heldout", 32 * 256))):
        assert torch.equal(a, b)
    drawn = draw_windows(pydoc, tiny_tok, 64, 256, 0, "c")  # what `compress run` calls
    assert torch.equal(drawn.windows, _default_windows(old_cal, old_held)[0])
    assert drawn.split_tokens == old_cal.numel() <= drawn.pool
    assert torch.equal(licenses.tokens(tiny_tok, "all"), tokenize(tiny_tok, licenses.split("all")))
    assert sum(len(d.encode()) for d in pydoc.documents) < sources.POOL_TOKENS  # any tokenizer: under the pool


def test_default_model_tokenizer_if_present():
    """The packaged default model's own tokenizer, when it was fetched before (never downloaded here)."""
    folder = os.path.expanduser("~/.cache/compress/models/smollm2-135m")
    if not os.path.isdir(folder):
        pytest.skip("default model not in the cache")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, pydoc = AutoTokenizer.from_pretrained(folder), load_corpus("pydoc")
    for which in ("calibration", "heldout"):
        assert torch.equal(pydoc.tokens(tok, which), tokenize(tok, pydoc.split(which)))


@pytest.mark.parametrize("kind", ["smollm2", "llama3", "metaspace"])
def test_many_cuts_tokenize_as_one_call(kind, monkeypatch):
    """Cut every ~400 characters (hundreds of seams, at paragraph ends, inside sentences, after punctuation): the
    stream still equals one call on the whole text for every pre-tokenizer family."""
    tok = _family_tokenizer(kind)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 400)
    pydoc = load_corpus("pydoc")
    text = pydoc.split("heldout")
    assert torch.equal(pydoc.tokens(tok, "heldout"), tokenize(tok, text))


def test_stops_reading_once_enough_tokens(tmp_path, tiny_tok, monkeypatch):
    """A bad row far past what is needed is never read: memory and time follow what is sampled, not the file."""
    monkeypatch.setattr(sources, "CHUNK_CHARS", 2000)
    rows = [json.dumps({"text": f"row {i} " + "words of text " * 20}) for i in range(5000)] + ['{"text": null}']
    (tmp_path / "big.jsonl").write_text("\n".join(rows))
    corpus = load_corpus(str(tmp_path / "big.jsonl"), "text")
    assert corpus.tokens(tiny_tok, "calibration", 1000).shape == (1000,)
    with pytest.raises(InputError, match=r"big.jsonl: line 5001: field 'text' is null"):
        corpus.tokens(tiny_tok, "calibration")


def test_long_line_is_cut_into_bounded_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_DOC_CHARS", 1000)
    monkeypatch.setattr(readers, "READ_BYTES", 300)
    line = " ".join(f"w{i}" for i in range(3000))  # one paragraph of ~17k characters
    (tmp_path / "line.txt").write_text(line)
    docs = load_corpus(str(tmp_path / "line.txt")).documents
    assert max(map(len, docs)) <= 1000 and len(docs) > 15 and "".join(docs) == line


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab \n\r\t\u00e9", max_size=120), block=st.integers(1, 9))
def test_streamed_paragraphs_equal_one_split(tmp_path_factory, text, block):
    """Read in blocks of any size, a .txt gives the paragraphs one split of the whole file gives."""
    path = tmp_path_factory.mktemp("p") / "t.txt"
    path.write_bytes(text.encode())
    whole = path.read_text()  # universal newlines, as the file was read before
    want = [p for p in re.split(r"\n\s*\n", whole) if p.strip()]
    old = readers.READ_BYTES
    readers.READ_BYTES = block
    try:
        if want:
            assert list(load_corpus(str(path)).documents) == want
        else:
            with pytest.raises(InputError, match="is empty"):
                load_corpus(str(path))
    finally:
        readers.READ_BYTES = old


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
    with pytest.raises(InputError, match="d.jsonl: line 1: no field 'body'"):
        load_corpus(str(tmp_path / "d.jsonl"), field="body")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_corpus(str(tmp_path / "d.parquet"), field="text").documents[6] == "row 6"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_corpus(str(arrow), field="text").documents[5] == "row 5"
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(InputError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize("value, kind", [(None, "null"), (3, "a number"), (2.5, "a number"), (True, "a bool"),
                                         ({"a": 1}, "an object"), (["x", "y"], "a list"), ([], "a list")])
def test_rows_that_are_not_text_are_refused_by_file_row_and_field(tmp_path, value, kind):
    rows = [{"text": "fine"}, {"text": "fine too"}, {"text": value}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InputError, match=rf"r.jsonl: line 3: field 'text' is {kind} \("):
        load_corpus(str(tmp_path / "r.jsonl"), "text").documents
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([value, value])}), tmp_path / "r.parquet")
    with pytest.raises(InputError, match=rf"r.parquet: row 1: field 'text' is {kind}"):
        load_corpus(str(tmp_path / "r.parquet"), "text")


def test_chat_messages_are_rendered_with_the_template_and_noted(tmp_path, tiny_tok):
    chat = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat}))
    with pytest.raises(InputError, match="c.jsonl: line 1: field 'messages' holds chat messages and the tokenizer "
                                         "has no chat template"):
        load_corpus(str(tmp_path / "c.jsonl"), "messages", sources.chat_renderer(tiny_tok))
    tiny_tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    try:
        corpus = load_corpus(str(tmp_path / "c.jsonl"), "messages", sources.chat_renderer(tiny_tok))
        assert corpus.documents == ("<user>What is a list?\n<assistant>A sequence.\n",) * 2
        assert corpus.notes == [f"{tmp_path / 'c.jsonl'}: field 'messages' holds chat messages, rendered with the "
                                "tokenizer's chat template"]
    finally:
        tiny_tok.chat_template = None


def test_bad_bytes_and_special_files_are_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok\n\nna\u00efve".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt: not UTF-8 text: byte 3 \(line 1\)"):
        load_corpus(str(tmp_path / "latin1.txt"))
    # the bad byte in a later block, after a multi-byte character cut by the block boundary
    (tmp_path / "late.txt").write_bytes(("a" + "\u00e9" * (readers.READ_BYTES // 2) + "\n\nab").encode() + b"\xff")
    with pytest.raises(InputError, match=rf"late.txt: not UTF-8 text: byte {readers.READ_BYTES + 5} \(line 3\)"):
        load_corpus(str(tmp_path / "late.txt")).documents
    (tmp_path / "bin.txt").write_bytes(b"text\nmore\x00\x01\x02")
    with pytest.raises(InputError, match=r"bin.txt: a NUL byte at byte 9 \(line 2\): binary data"):
        load_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: not UTF-8 text: byte 25"):
        load_corpus(str(tmp_path / "bad.jsonl"), "text").documents
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(InputError, match=r"pipe.txt: not a regular file \(a FIFO\)"):
        load_corpus(str(tmp_path / "pipe.txt"))
    with pytest.raises(InputError, match=r"/dev/null: not a regular file \(a character device\)"):
        load_corpus("/dev/null")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "folder" / "p.md")
    with pytest.raises(InputError, match=r"p.md: not a regular file \(a FIFO\)"):
        load_corpus(str(tmp_path / "folder"))


def _two_domains(path, paragraphs: int = 300) -> str:
    """A .txt sorted by domain: `paragraphs` about alpha, then as many about omega; returns its text."""
    text = "\n\n".join([f"alpha paragraph {i}: " + "the quick brown fox " * 6 for i in range(paragraphs)]
                       + [f"omega paragraph {i}: " + "lorem ipsum dolor sit amet " * 5 for i in range(paragraphs)])
    path.write_text(text)
    return text


def test_windows_are_drawn_across_the_whole_split_of_a_sorted_file(tmp_path, tiny_tok, monkeypatch):
    """A file sorted by domain, far beyond the pool: windows come from both ends, each is the whole-text tokens at
    its start, the draw is seeded, and chunk size cannot move it."""
    monkeypatch.setattr(sources, "POOL_TOKENS", 2000)
    monkeypatch.setattr(sources, "CHUNK_CHARS", 3000)
    _two_domains(tmp_path / "sorted.txt")
    corpus = load_corpus(str(tmp_path / "sorted.txt"))
    whole = tokenize(tiny_tok, corpus.split("calibration"))
    assert whole.numel() > 10 * sources.pool_tokens(16, 32)
    drawn = draw_windows(corpus, tiny_tok, 16, 32, 0, "c")
    assert drawn.windows.shape == (16, 32) and drawn.split_tokens == whole.numel()
    for window, start in zip(drawn.windows, drawn.starts.tolist()):
        assert torch.equal(window, whole[start : start + 32])
    assert (drawn.starts[1:] - drawn.starts[:-1]).min() >= 32  # ascending, no overlap
    assert drawn.starts.max() > whole.numel() // 2 > drawn.pool  # the second domain, past the pool, is reached
    assert drawn.starts.min() < whole.numel() // 2
    monkeypatch.setattr(sources, "CHUNK_CHARS", 7000)
    again = draw_windows(corpus, tiny_tok, 16, 32, 0, "c")
    assert torch.equal(again.windows, drawn.windows) and torch.equal(again.starts, drawn.starts)
    assert not torch.equal(draw_windows(corpus, tiny_tok, 16, 32, 1, "c").starts, drawn.starts)
    assert "16 windows of 32 tokens drawn across all" in drawn.describe("x") and "reservoir" in drawn.describe("x")


def test_reservoir_is_uniform_over_slots_and_ignores_piece_sizes():
    """200 seeds x 4 windows over 100 slots: each quarter of the stream gets a quarter of the windows (within 5
    points); feeding the stream whole or in pieces of 7 tokens keeps exactly the same windows."""
    stream, seq_len = torch.arange(1000), 10
    counts = torch.zeros(4)
    for seed in range(200):
        whole, pieces = sources._Reservoir(4, seq_len, seed), sources._Reservoir(4, seq_len, seed)
        whole.add(stream)
        for piece in stream.split(7):
            pieces.add(piece)
        a, b = whole.result(0), pieces.result(0)
        assert torch.equal(a.windows, b.windows) and torch.equal(a.starts, b.starts)
        assert torch.equal(a.windows[:, 0], a.starts) and a.split_tokens == 1000
        counts += torch.bincount(a.starts // 250, minlength=4)
    assert ((counts / counts.sum() - 0.25).abs() < 0.05).all(), counts


def test_context_and_activation_memory_are_checked_with_numbers():
    budget.check_context({"calibration.seq_len": 512, "evaluate.seq_len": 256}, 512)
    with pytest.raises(InputError, match="evaluate.seq_len 1024 exceeds the model's context length 512"):
        budget.check_context({"calibration.seq_len": 256, "evaluate.seq_len": 1024}, 512)
    # 64 windows x 256 x 576 (SmolLM2-135M) fp32: 3 copies (block inputs, outputs, a rerun's outputs) of 37.7 MB
    assert budget.activation_bytes(64, 256, 576, 4) == 3 * 64 * 256 * 576 * 4 == 113_246_208
    budget.check_activation_memory(64, 256, 576, 4, available=113_246_208)  # exactly fits: runs
    with pytest.raises(InputError, match=r"calibration.windows 65 x seq_len 256 x hidden size 576 x 4 bytes x 3 "
                                         r"copies = 0.1 GiB of activations, but 0.1 GiB"):
        budget.check_activation_memory(65, 256, 576, 4, available=113_246_208)
    assert budget.available_bytes() > 2**20


GIB = 2**30


def _fake_root(tmp_path, meminfo_gib: float | None, membership: str, cgroups: dict[str, dict[str, str]]):
    """A tree with proc/meminfo (MemAvailable), proc/self/cgroup and cgroup folders {relative folder: {file: text}}."""
    (tmp_path / "proc/self").mkdir(parents=True)
    if meminfo_gib is not None:
        (tmp_path / "proc/meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {int(meminfo_gib * 2**20)} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(membership)
    for folder, files in cgroups.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp_path / folder / name).write_text(text)
    return tmp_path


def _v2(limit: str, current: float, inactive: float) -> dict[str, str]:
    return {"memory.max": limit, "memory.current": str(int(current * GIB)),
            "memory.stat": f"anon 1\nactive_file 7\ninactive_file {int(inactive * GIB)}\n"}


def test_available_memory_counts_reclaimable_cache_in_cgroup_v2(tmp_path):
    """8 GiB limit, 7.5 GiB used of which 3 GiB is inactive page cache (the safetensors just read): 3.5 GiB left,
    not 0.5; a parent cgroup's tighter limit wins; no limit anywhere: MemAvailable."""
    root = _fake_root(tmp_path / "a", 64, "0::/job/step\n", {
        "sys/fs/cgroup": {"memory.stat": "inactive_file 0\n"},  # the root cgroup has no memory.max
        "sys/fs/cgroup/job": _v2("max", 7.5, 3),
        "sys/fs/cgroup/job/step": _v2(str(8 * GIB), 7.5, 3)})
    assert budget.available_bytes(root) == int(3.5 * GIB)
    # 3 copies of 1 GiB fit in the 3.5 GiB left; 4 copies (the former count) or 0.5 GiB (cache counted as used) did not
    assert budget.activation_bytes(2**7, 2**10, 2**11, 4) == 3 * GIB
    budget.check_activation_memory(2**7, 2**10, 2**11, 4, available=budget.available_bytes(root))
    with pytest.raises(InputError, match="= 4.5 GiB of activations, but 3.5 GiB of memory is available"):
        budget.check_activation_memory(3 * 2**6, 2**10, 2**11, 4, available=budget.available_bytes(root))
    root = _fake_root(tmp_path / "b", 64, "0::/job/step\n", {
        "sys/fs/cgroup/job": _v2(str(10 * GIB), 9.9, 0.4),
        "sys/fs/cgroup/job/step": _v2(str(8 * GIB), 7.5, 3)})
    assert budget.available_bytes(root) == int(0.5 * GIB)
    root = _fake_root(tmp_path / "c", 12.25, "0::/\n", {"sys/fs/cgroup": _v2("max", 7.5, 3)})
    assert budget.available_bytes(root) == int(12.25 * GIB)
    root = _fake_root(tmp_path / "d", 2, "0::/\n", {"sys/fs/cgroup": _v2(str(8 * GIB), 1, 0)})
    assert budget.available_bytes(root) == 2 * GIB  # MemAvailable below the cgroup's room


def test_available_memory_reads_cgroup_v1_and_tolerates_missing_files(tmp_path):
    v1 = {"memory.limit_in_bytes": str(6 * GIB), "memory.usage_in_bytes": str(5 * GIB),
          "memory.stat": f"cache 9\ninactive_file 1\ntotal_inactive_file {2 * GIB}\n"}
    root = _fake_root(tmp_path / "a", 64, "5:cpu,cpuacct:/x\n4:memory:/box\n0::/\n",
                      {"sys/fs/cgroup/memory/box": v1})
    assert budget.available_bytes(root) == 3 * GIB  # 6 - 5 + 2
    assert budget.available_bytes(_fake_root(tmp_path / "b", 5, "", {})) == 5 * GIB
    no_meminfo = _fake_root(tmp_path / "c", None, "0::/\n", {"sys/fs/cgroup": _v2(str(GIB), 0.25, 0)})
    assert budget.available_bytes(no_meminfo) == int(0.75 * GIB)
    assert budget.available_bytes(_fake_root(tmp_path / "d", None, "", {})) is None


def test_run_calibrates_on_chat_rows_and_evaluates_an_extra_jsonl(tmp_path, tiny_llama):
    """`compress run` on chat rows with a tokenizer that has a template: rendered, said so, and an evaluate.extra
    .jsonl read by calibration.field."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from compress.cli import cli

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    topics = load_corpus("pydoc").documents
    rows = [{"messages": [{"role": "user", "content": f"Explain topic {i}."},
                          {"role": "assistant", "content": topics[i][:1500]}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "other.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": topics[50][:3000]}]}))
    recipe = {"name": "chat", "model": str(model), "passes": [{"pass": "flap", "target": 0.2}],
              "calibration": {"source": str(tmp_path / "chat.jsonl"), "field": "messages", "windows": 4, "seq_len": 64},
              "evaluate": {"seq_len": 64, "max_windows": 2, "extra": [str(tmp_path / "other.jsonl")]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(cli, ["run", "-r", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    assert "chat.jsonl: field 'messages' holds chat messages, rendered with the tokenizer's chat template" in res.output
    # the evaluate.extra text's chat rows are rendered too, and said so (once each)
    assert res.output.count("other.jsonl: field 'messages' holds chat messages, rendered with the tokenizer's chat "
                            "template") == 1
    assert res.output.count("chat.jsonl: field 'messages' holds chat messages") == 1
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert [q["text"] for q in report["quality"]] == ["chat.jsonl-heldout", "other.jsonl"]


def test_news_corpus_is_a_third_domain_read_from_gensims_wheel():
    news = load_corpus("news")
    assert len(news.documents) == 300  # the Lee background corpus: 300 ABC news articles, one per line
    assert news.documents[0].startswith("Hundreds of people have been forced to vacate their homes")
    held, cal = news.split("heldout"), news.split("calibration")
    assert held and cal and held not in cal


def test_news_without_gensim_names_the_extra(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"source 'news'.*gensim is not installed.*\[corpora\]"):
        load_corpus("news")


@pytest.mark.parametrize("weights,windows,want", [
    ([1], 64, [64]), ([3, 1], 8, [6, 2]), ([1, 1, 1], 8, [3, 3, 2]), ([0.5, 0.25, 0.25], 10, [5, 3, 2]),
    ([2, 1], 7, [5, 2]),
])
def test_mixture_windows_follow_the_weights_and_sum_to_windows(weights, windows, want):
    from compress.recipe import CalibrationConfig

    names = ["pydoc", "licenses", "news"]
    cal = CalibrationConfig(source=[{"source": names[i], "weight": w} for i, w in enumerate(weights)],
                            windows=windows)
    assert cal.part_windows() == want and sum(want) == windows
    assert [p.source for p in cal.parts()] == names[: len(weights)]


@pytest.mark.parametrize("source,message", [
    ([], "List should have at least 1 item"),
    ([{"source": "pydoc"}, {"source": "pydoc"}], "a text appears twice in the mixture"),
    ([{"source": "pydoc", "weight": 100}, {"source": "licenses"}], r"source.1 \('licenses', weight 1.0\) gets no "
     r"window of the 8: raise its weight or calibration.windows"),
    ([{"source": "pydoc", "weight": 0}], "greater than 0"),
    ([{"source": "pydoc", "wieght": 1}], "wieght"),
])
def test_bad_mixtures_are_refused_by_field(source, message):
    from compress.errors import RecipeError
    from compress.recipe import load_recipe

    recipe = {"name": "m", "calibration": {"source": source, "windows": 8}, "passes": [{"pass": "rtn", "bits": 4}]}
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_run_calibrates_on_a_mixture_and_evaluates_each_held_out_split(tmp_path, tiny_llama):
    """Windows from each text in proportion, interleaved by the seed; each text's held-out split evaluated; a
    missing mixture file named by its index before any work."""
    from compress import api
    from compress.errors import InputError as ApiInputError

    docs = load_corpus("pydoc").documents
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:60]))
    recipe = {"name": "mix", "model": str(tiny_llama), "passes": [{"pass": "rtn", "bits": 4, "group_size": 16}],
              "calibration": {"source": [{"source": "licenses", "weight": 1}, {"source": str(tmp_path / "a.txt"),
                                                                               "weight": 3}],
                              "windows": 8, "seq_len": 32},
              "evaluate": {"seq_len": 32, "max_windows": 2, "extra": [], "prompts": []}}
    res = api.run(recipe, out=tmp_path / "art", log=lambda *_: None)
    assert [q["text"] for q in res.report["quality"]] == ["licenses-heldout", "a.txt-heldout"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.pipeline import _texts
    from compress.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    calib, _, name = _texts(load_recipe(recipe), model, tok, lambda *_: None)
    assert name == f"licenses 0.25 + {tmp_path / 'a.txt'} 0.75" and calib.shape == (8, 32)
    streams = [load_corpus(src).tokens(tok, "calibration").unfold(0, 32, 1)
               for src in ("licenses", str(tmp_path / "a.txt"))]
    origin = [[bool((st == w).all(1).any()) for st in streams].index(True) for w in calib]
    assert sorted(origin) == [0, 0, 1, 1, 1, 1, 1, 1] and origin != sorted(origin)  # 2 + 6 windows, interleaved
    bad = {**recipe, "calibration": {**recipe["calibration"], "source": [{"source": "licenses"},
                                                                         {"source": str(tmp_path / "nope.txt")}]}}
    with pytest.raises(ApiInputError, match=r"calibration.source.1.source: '.*nope.txt': no such file"):
        api.run(bad, out=tmp_path / "art2", log=lambda *_: None)
