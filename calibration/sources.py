"""Text sources (packaged corpora, local files) and seeded sampling into token windows."""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compress.errors import InputError

Split = Literal["calibration", "heldout", "all"]
HELDOUT_SHARE = 0.2  # share of characters held out for evaluation, by whole documents, never in calibration
PACKAGED = ("pydoc", "licenses")


@dataclass(frozen=True)
class Corpus:
    """A named list of documents; splits are deterministic by document index."""

    name: str
    documents: tuple[str, ...]

    def heldout_mask(self) -> list[bool]:
        """Walking the documents in order, one is held out when that keeps the held-out characters within
        HELDOUT_SHARE of those seen so far: about 20% of the text, whatever the documents' sizes, deterministic."""
        mask, held, seen = [], 0, 0
        for d in self.documents:
            seen += len(d)
            mask.append(held + len(d) <= HELDOUT_SHARE * seen)
            held += len(d) if mask[-1] else 0
        return mask

    def split(self, which: Split) -> str:
        if which == "all":
            docs = self.documents
        else:
            want = which == "heldout"
            docs = tuple(d for d, h in zip(self.documents, self.heldout_mask()) if h == want)
        text = "\n\n".join(docs)
        if not text.strip():
            raise InputError(f"source {self.name!r}: the {which} split is empty ({len(self.documents)} documents)")
        return text


def _pydoc_corpus() -> Corpus:
    """The Python documentation topics that ship inside every CPython (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    return Corpus("pydoc", tuple(topics[k] for k in sorted(topics)))


def _licenses_corpus() -> Corpus:
    """License texts shipped in the pinned torch wheel: legal English, a domain far from the calibration text."""
    dist = importlib.metadata.distribution("torch")
    seen: set[str] = set()
    docs = []
    for f in sorted(dist.files or [], key=str):
        if "/licenses/" not in f"/{f}" or not re.search(r"(LICEN[CS]E|COPYING|NOTICE)", f.name, re.I):
            continue
        text = Path(f.locate()).read_text(errors="replace").strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(text)
    if not docs:
        raise InputError("source 'licenses': no license files found in the installed torch distribution")
    return Corpus("licenses", tuple(docs))


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _table_texts(path: Path, field: str | None) -> list[str]:
    if field is None:
        raise InputError(f"{path}: calibration.field must name the text column of this table")
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "arrow"
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if field not in ds.column_names:
        raise InputError(f"{path}: no field {field!r}; columns are {ds.column_names}")
    return [str(t) for t in ds[field]]


def _jsonl_texts(path: Path, field: str | None) -> list[str]:
    if field is None:
        raise InputError(f"{path}: calibration.field must name the text field of each JSON line")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{n}: not valid JSON: {err}") from None
        if not isinstance(row, dict) or field not in row:
            raise InputError(f"{path}:{n}: no field {field!r}")
        out.append(str(row[field]))
    return out


def load_corpus(source: str, field: str | None = None) -> Corpus:
    """A packaged corpus by name ('pydoc', 'licenses') or a local .txt/.jsonl/.parquet/.arrow file or folder."""
    if source == "pydoc":
        return _pydoc_corpus()
    if source == "licenses":
        return _licenses_corpus()
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"calibration source {source!r}: no such file or folder (packaged sources: {', '.join(PACKAGED)})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise InputError(f"{path}: folder has no .txt or .md files")
        docs = [p.read_text(errors="replace") for p in files]
    elif path.suffix in (".txt", ".md"):
        docs = _paragraphs(path.read_text(errors="replace"))
    elif path.suffix == ".jsonl":
        docs = _jsonl_texts(path, field)
    elif path.suffix in (".parquet", ".arrow"):
        docs = _table_texts(path, field)
    else:
        raise InputError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .md, .jsonl, .parquet, .arrow)")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"calibration source {source!r} is empty: it has no text")
    return Corpus(str(path), tuple(docs))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (1-D int64), without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, windows: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """`windows` non-overlapping token windows drawn at random (seeded): (windows, seq_len) int64."""
    slots = tokens.numel() // seq_len
    if slots < windows:
        raise InputError(
            f"{what} has {tokens.numel()} tokens = {slots} windows of {seq_len}; "
            f"the recipe asks for {windows} (lower calibration.windows or seq_len, or give more text)"
        )
    gen = torch.Generator().manual_seed(seed)
    spare = tokens.numel() - slots * seq_len
    shift = int(torch.randint(0, spare + 1, (1,), generator=gen))
    chosen = torch.randperm(slots, generator=gen)[:windows].sort().values
    starts = shift + chosen * seq_len
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int, what: str) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream, at most `max_windows`: (n, seq_len) int64."""
    n = min(tokens.numel() // seq_len, max_windows)
    if n < 1:
        raise InputError(f"{what} has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)
