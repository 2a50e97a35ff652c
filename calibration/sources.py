"""Text sources (packaged corpora, local files) and seeded sampling into token windows.

Memory is bounded by what is sampled, not by the size of the source: files are read in blocks (calibration.readers),
a split's documents are tokenized in chunks of at most CHUNK_CHARS characters, and calibration windows are drawn in
one streaming pass over the whole split that holds only the windows kept so far (draw_windows); evaluation reads no
further than the tokens it needs."""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from calibration.readers import ChatRender, reader
from compress.errors import InputError

Split = Literal["calibration", "heldout", "all"]
HELDOUT_SHARE = 0.2  # share of characters held out for evaluation, by whole documents, never in calibration
PACKAGED = ("pydoc", "licenses", "news")
LEE_CORPUS = "gensim/test/test_data/lee_background.cor"  # inside the gensim wheel
CHUNK_CHARS = 1 << 16  # characters per tokenizer call (the tokenizer takes about 150 bytes per character while it runs)
SEAM_CHARS = 64  # characters each side of a cut that must tokenize the same cut as whole
SEAM_TRIES = 32  # cut candidates checked per chunk before cutting blindly (text without tokenizable whitespace)
# a calibration split of at most max(POOL_TOKENS, POOL_FACTOR x windows x seq_len) tokens is held whole and sampled by
# sample_windows; POOL_TOKENS exceeds the bytes of each packaged corpus, so their windows stay those one call on the
# whole split gave. A longer split is sampled by a seeded reservoir over all of it (draw_windows).
POOL_TOKENS = 1 << 20
POOL_FACTOR = 2
KEY_BLOCK = 1 << 12  # reservoir keys are drawn this many slots at a time, whatever the chunks: chunks cannot move them


@dataclass(frozen=True)
class Corpus:
    """A named stream of documents, read afresh from the source on each use; splits are deterministic by document
    index. `notes` says what was done to the text on the way (chat messages rendered), once each."""

    name: str
    read: Callable[[], Iterator[str]]  # the non-blank documents, in order
    notes: list[str] = field(default_factory=list, compare=False)

    def marked(self) -> Iterator[tuple[str, bool]]:
        """(document, held out) in order. Walking the documents, one is held out when that keeps the held-out
        characters within HELDOUT_SHARE of those seen so far: about 20% of the text, whatever the documents'
        sizes, decided from the documents seen so far only (so a stream can stop early)."""
        held = seen = 0
        for d in self.read():
            seen += len(d)
            is_held = held + len(d) <= HELDOUT_SHARE * seen
            held += len(d) if is_held else 0
            yield d, is_held

    @property
    def documents(self) -> tuple[str, ...]:
        """Every document in memory (small corpora and tests)."""
        return tuple(self.read())

    def heldout_mask(self) -> list[bool]:
        """Per document: held out (see `marked`)."""
        return [h for _, h in self.marked()]

    def documents_of(self, which: Split) -> Iterator[str]:
        """The documents of one split, in order, read as they are asked for; InputError when it has none."""
        seen = found = 0
        for d, held in self.marked():
            seen += 1
            if which == "all" or held == (which == "heldout"):
                found += 1
                yield d
        if not found:
            raise InputError(f"source {self.name!r}: the {which} split is empty ({seen} documents)")

    def split(self, which: Split) -> str:
        """The whole split as one text, documents joined by a blank line (small corpora and tests)."""
        return "\n\n".join(self.documents_of(which))

    def token_chunks(self, tokenizer, which: Split) -> Iterator[torch.Tensor]:
        """The split's text (documents joined by a blank line) as consecutive 1-D int64 token pieces, without
        special tokens, each from at most CHUNK_CHARS characters. Joined, token for token what one call on the whole
        text gives, wherever a cut passes the seam check (see `_cut`); read only as far as the pieces are taken."""
        text = ""
        for i, doc in enumerate(self.documents_of(which)):
            text += ("\n\n" if i else "") + doc
            while len(text) > CHUNK_CHARS:
                cut = _cut(tokenizer, text)
                yield _encode(tokenizer, text[:cut])
                text = text[cut:]
        yield _encode(tokenizer, text)

    def tokens(self, tokenizer, which: Split, max_tokens: int | None = None) -> torch.Tensor:
        """The split as one token stream (see token_chunks), 1-D int64, at most `max_tokens` long, read no
        further than needed."""
        parts: list[torch.Tensor] = []
        count = 0
        for part in self.token_chunks(tokenizer, which):
            parts.append(part)
            count += part.numel()
            if max_tokens is not None and count >= max_tokens:
                break
        return torch.cat(parts)[:max_tokens]


def pool_tokens(windows: int, seq_len: int) -> int:
    """The longest calibration split (tokens) that draw_windows holds whole and samples by sample_windows for
    `windows` windows of `seq_len`; a longer one is sampled by a reservoir (see POOL_TOKENS)."""
    return max(POOL_TOKENS, POOL_FACTOR * windows * seq_len)


def chat_renderer(tokenizer) -> ChatRender | None:
    """Chat messages -> text with the tokenizer's chat template; None when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)


def _encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_WS_START = re.compile(r"(?<=\S)\s")  # the start of a whitespace run


def _cut(tokenizer, text: str) -> int:
    """Where to end the next chunk of `text` (longer than CHUNK_CHARS): the last start of a whitespace run in the
    chunk's second half whose SEAM_CHARS either side tokenize the same cut as joined (byte-level BPE tokenizers never
    merge across it); CHUNK_CHARS itself when SEAM_TRIES candidates fail (a token or two at that cut may then differ
    from one call on the whole text)."""
    starts = [m.start() for m in _WS_START.finditer(text, CHUNK_CHARS // 2, CHUNK_CHARS)]
    for c in reversed(starts[-SEAM_TRIES:]):
        lo, hi = max(c - SEAM_CHARS, 0), c + SEAM_CHARS
        if torch.equal(_encode(tokenizer, text[lo:hi]),
                       torch.cat([_encode(tokenizer, text[lo:c]), _encode(tokenizer, text[c:hi])])):
            return c
    return CHUNK_CHARS


def _pydoc_corpus() -> Corpus:
    """The Python documentation topics that ship inside every CPython (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    docs = tuple(topics[k] for k in sorted(topics))
    return Corpus("pydoc", lambda: iter(docs))


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
    return Corpus("licenses", lambda: iter(docs))


def _news_corpus() -> Corpus:
    """News prose: the 300 ABC news articles of the Lee background corpus (Lee, Pincombe and Welsh, 2005) that ship in
    gensim's wheel as test data, one article per line; a third domain, far from both code documentation and legal
    text. Needs gensim installed (the `corpora` extra), which is not imported: the file is read from its wheel."""
    try:
        path = Path(str(importlib.metadata.distribution("gensim").locate_file(LEE_CORPUS)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError("source 'news': it is read from the gensim package's test data, and gensim is not "
                         "installed: pip install -c constraints.txt -e '.[corpora]' (or pip install gensim)")
    docs = tuple(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip())
    return Corpus("news", lambda: iter(docs))


def load_corpus(source: str, field: str | None = None, chat: ChatRender | None = None) -> Corpus:
    """A packaged corpus by name ('pydoc', 'licenses', 'news') or a local .txt/.md/.jsonl/.parquet/.arrow file or a
    folder of .txt/.md files. `field` names the text field of .jsonl/.parquet/.arrow rows; rows holding chat messages
    are rendered by `chat` (see chat_renderer). The file is checked and its first document read now; the rest is
    read as the corpus is used, and bad rows are refused when reached."""
    if source == "pydoc":
        return _pydoc_corpus()
    if source == "licenses":
        return _licenses_corpus()
    if source == "news":
        return _news_corpus()
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"calibration source {source!r}: no such file or folder "
                         f"(packaged sources: {', '.join(PACKAGED)})")
    notes: list[str] = []
    read = reader(path, field, chat, notes)
    corpus = Corpus(str(path), lambda: (d for d in read() if d.strip()), notes)
    if next(corpus.read(), None) is None:
        raise InputError(f"calibration source {source!r} is empty: it has no text")
    return corpus


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (1-D int64), without special tokens, in one call (small texts; a corpus
    is tokenized in bounded chunks by Corpus.tokens)."""
    return _encode(tokenizer, text)


def _sample_starts(n_tokens: int, windows: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """Where `windows` non-overlapping windows of `seq_len` start in a stream of `n_tokens` (seeded): a random shift,
    then a random subset of the seq_len-token slots after it; (windows,) int64, ascending."""
    slots = n_tokens // seq_len
    if slots < windows:
        raise InputError(
            f"{what} has {n_tokens} tokens = {slots} windows of {seq_len}; "
            f"the recipe asks for {windows} (lower calibration.windows or seq_len, or give more text)"
        )
    gen = torch.Generator().manual_seed(seed)
    spare = n_tokens - slots * seq_len
    shift = int(torch.randint(0, spare + 1, (1,), generator=gen))
    chosen = torch.randperm(slots, generator=gen)[:windows].sort().values
    return shift + chosen * seq_len


def sample_windows(tokens: torch.Tensor, windows: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """`windows` non-overlapping token windows drawn at random (seeded): (windows, seq_len) int64."""
    starts = _sample_starts(tokens.numel(), windows, seq_len, seed, what)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@dataclass(frozen=True)
class Drawn:
    """Calibration windows and where they came from."""

    windows: torch.Tensor  # (windows, seq_len) int64
    starts: torch.Tensor  # (windows,) int64: each window's first token, as an offset into the split's token stream
    split_tokens: int  # tokens in the whole calibration split (all of it was read)
    pool: int  # pool_tokens(windows, seq_len): a split up to this size is held whole and sampled by sample_windows

    def describe(self, what: str) -> str:
        """One line for the log: how many windows, from how many tokens of `what`, and how."""
        n, seq_len = self.windows.shape
        how = ("held whole" if self.split_tokens <= self.pool
               else f"a seeded reservoir: more than the {self.pool:,} tokens held whole")
        return f"{n} windows of {seq_len} tokens drawn across all {self.split_tokens:,} tokens of {what} ({how})"


class _Reservoir:
    """A seeded uniform sample of `windows` slots of `seq_len` tokens from a token stream fed in pieces: after a
    random shift (< seq_len) the stream is cut into consecutive slots, slot k gets the k-th of a run of uniform keys
    (drawn KEY_BLOCK at a time), and the `windows` slots of least key are kept. Holds the kept slots and one piece."""

    def __init__(self, windows: int, seq_len: int, seed: int):
        self.windows, self.seq_len = windows, seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.shift = int(torch.randint(0, seq_len, (1,), generator=self.gen))  # tokens before slot 0
        self.skip = self.shift  # of those, still to drop
        self.pending = torch.zeros(0, dtype=torch.long)  # tokens after the last whole slot
        self.next_slot, self.total = 0, 0
        self.unused_keys = torch.zeros(0, dtype=torch.float64)
        self.keys = torch.zeros(0, dtype=torch.float64)  # (kept,) the kept slots' keys
        self.slots = torch.zeros(0, dtype=torch.long)  # (kept,) their indices
        self.kept = torch.zeros(0, seq_len, dtype=torch.long)  # (kept, seq_len) their tokens

    def _next_keys(self, n: int) -> torch.Tensor:
        while self.unused_keys.numel() < n:
            block = torch.rand(KEY_BLOCK, generator=self.gen, dtype=torch.float64)
            self.unused_keys = torch.cat([self.unused_keys, block])
        keys, self.unused_keys = self.unused_keys[:n], self.unused_keys[n:]
        return keys

    def add(self, tokens: torch.Tensor) -> None:
        """Feed the next piece of the stream (1-D int64)."""
        self.total += tokens.numel()
        drop = min(self.skip, tokens.numel())
        self.skip -= drop
        stream = torch.cat([self.pending, tokens[drop:]])
        n = stream.numel() // self.seq_len
        self.pending = stream[n * self.seq_len :].clone()
        keys = torch.cat([self.keys, self._next_keys(n)])
        slots = torch.cat([self.slots, torch.arange(self.next_slot, self.next_slot + n)])
        kept = torch.cat([self.kept, stream[: n * self.seq_len].view(n, self.seq_len)])
        self.next_slot += n
        best = keys.topk(min(self.windows, keys.numel()), largest=False).indices
        self.keys, self.slots, self.kept = keys[best], slots[best], kept[best]

    def result(self, pool: int) -> Drawn:
        order = self.slots.argsort()
        return Drawn(self.kept[order], self.shift + self.slots[order] * self.seq_len, self.total, pool)


def draw_windows(corpus: Corpus, tokenizer, windows: int, seq_len: int, seed: int, what: str) -> Drawn:
    """`windows` seeded, non-overlapping calibration windows of `seq_len` tokens from the whole calibration split,
    in one streaming pass. A split of at most pool_tokens(windows, seq_len) tokens is held whole and sampled by
    sample_windows (the windows the packaged corpora always gave); a longer one goes through a seeded reservoir
    (_Reservoir) over all its slots, so a file sorted by source or domain is sampled from end to end while memory
    stays the pool, the kept windows and one chunk. Deterministic given the text, the tokenizer and the seed."""
    pool = pool_tokens(windows, seq_len)
    held: list[torch.Tensor] = []
    count = 0
    pieces = corpus.token_chunks(tokenizer, "calibration")
    for piece in pieces:
        held.append(piece)
        count += piece.numel()
        if count > pool:
            break
    else:
        tokens = torch.cat(held)
        starts = _sample_starts(tokens.numel(), windows, seq_len, seed, what)
        return Drawn(torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]), starts, count, pool)
    reservoir = _Reservoir(windows, seq_len, seed)
    reservoir.add(torch.cat(held))
    del held
    for piece in pieces:
        reservoir.add(piece)
    return reservoir.result(pool)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int, what: str) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream, at most `max_windows`: (n, seq_len) int64."""
    n = min(tokens.numel() // seq_len, max_windows)
    if n < 1:
        raise InputError(f"{what} has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)
