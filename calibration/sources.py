"""Text sources (packaged corpora, local files) and seeded sampling into token windows.

Memory is bounded by what is sampled, not by the size of the source: files are read in blocks, a split's documents
are tokenized in chunks of at most CHUNK_CHARS characters, and reading stops once the tokens asked for exist. Rows
whose field is not text are refused by file, row and field; lists of chat messages are rendered with the
tokenizer's chat template (and the corpus notes it) or refused when the tokenizer has none."""

from __future__ import annotations

import codecs
import importlib.metadata
import io
import json
import re
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from compress.errors import InputError

Split = Literal["calibration", "heldout", "all"]
HELDOUT_SHARE = 0.2  # share of characters held out for evaluation, by whole documents, never in calibration
PACKAGED = ("pydoc", "licenses")
READ_BYTES = 1 << 20  # bytes read from a file at a time
MAX_DOC_CHARS = 1 << 20  # a longer paragraph, file or row is cut at whitespace into documents of at most this size
CHUNK_CHARS = 1 << 16  # characters per tokenizer call (the tokenizer takes about 150 bytes per character while it runs)
SEAM_CHARS = 64  # characters each side of a cut that must tokenize the same cut as whole
SEAM_TRIES = 32  # cut candidates checked per chunk before cutting blindly (text without tokenizable whitespace)
# calibration windows are drawn from the first max(POOL_TOKENS, POOL_FACTOR x windows x seq_len) tokens of the split;
# POOL_TOKENS exceeds the bytes of each packaged corpus, so their windows are those drawn from the whole split
POOL_TOKENS = 1 << 20
POOL_FACTOR = 2
ChatRender = Callable[[list], str]  # chat messages [{"role": ..., "content": ...}, ...] -> text


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

    def tokens(self, tokenizer, which: Split, max_tokens: int | None = None) -> torch.Tensor:
        """The split's text (documents joined by a blank line) as one token stream, 1-D int64 without special
        tokens, at most `max_tokens` long: tokenized CHUNK_CHARS at a time and read no further than needed. Token
        for token what one call on the whole text gives, wherever a cut passes the seam check (see `_cut`)."""
        parts: list[torch.Tensor] = []
        count, text = 0, ""
        for i, doc in enumerate(self.documents_of(which)):
            text += ("\n\n" if i else "") + doc
            while len(text) > CHUNK_CHARS:
                cut = _cut(tokenizer, text)
                parts.append(_encode(tokenizer, text[:cut]))
                count, text = count + parts[-1].numel(), text[cut:]
                if max_tokens is not None and count >= max_tokens:
                    return torch.cat(parts)[:max_tokens]
        parts.append(_encode(tokenizer, text))
        return torch.cat(parts)[:max_tokens]


def pool_tokens(windows: int, seq_len: int) -> int:
    """How many tokens of the calibration split `windows` windows of `seq_len` are drawn from (see POOL_TOKENS)."""
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


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _check_regular(path: Path) -> None:
    """Refuse what is not a regular file before opening it (opening a FIFO blocks until someone writes)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise InputError(f"{path}: not a regular file ({kind}); text sources are files or folders of files")


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None


def _binary_check(raw: bytes, path: Path, offset: int, line: int) -> None:
    """Refuse a NUL byte in `raw` (which starts at byte `offset`, on line `line` of the file): binary data."""
    nul = raw.find(b"\0")
    if nul >= 0:
        line += raw.count(b"\n", 0, nul)
        raise InputError(f"{path}: a NUL byte at byte {offset + nul} (line {line}): binary data, not UTF-8 text")


def _text_blocks(path: Path) -> Iterator[str]:
    """The file's text in blocks: strict UTF-8 (a leading byte-order mark dropped), newlines translated as open()
    does; refuses binary data and undecodable bytes naming the byte offset and line."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset, line, first = 0, 1, True
    with _open(path) as f:
        while True:
            raw = f.read(READ_BYTES)
            _binary_check(raw, path, offset, line)
            pending = len(utf8.buffer)  # undecoded bytes of the previous block, before `raw`
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                n = line + raw[: max(at - offset, 0)].count(b"\n")
                raise InputError(f"{path}: not UTF-8 text: byte {at} (line {n}) cannot be decoded ({err.reason}); "
                                 "a binary file?") from None
            offset, line = offset + len(raw), line + raw.count(b"\n")
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not raw:
                return


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _documents(blocks: Iterator[str], paragraphs: bool) -> Iterator[str]:
    """Documents from a stream of text blocks: its paragraphs (split at blank lines) or, if not `paragraphs`, the
    whole text; either cut at whitespace into pieces of at most MAX_DOC_CHARS. Paragraphs are those one split of the
    whole text gives: a break is taken only once text after it has arrived."""
    carry = ""
    for block in blocks:
        carry += block
        if paragraphs:
            end = len(carry.rstrip())  # breaks before the trailing whitespace are complete
            *done, rest = _PARAGRAPH_BREAK.split(carry[:end])
            yield from done
            carry = rest + carry[end:]
        while len(carry) > MAX_DOC_CHARS:
            space = max(carry.rfind(" ", 0, MAX_DOC_CHARS), carry.rfind("\n", 0, MAX_DOC_CHARS))
            cut = space if space > 0 else MAX_DOC_CHARS
            yield carry[:cut]
            carry = carry[cut:]
    yield from _PARAGRAPH_BREAK.split(carry) if paragraphs else [carry]


def _is_chat(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _row_text(value, where: str, name: str, chat: ChatRender | None, notes: list[str], path: Path) -> str:
    """The text of one row's field; refuses anything but a string or a list of chat messages (rendered by `chat`)."""
    if isinstance(value, str):
        return value
    if _is_chat(value):
        if chat is None:
            raise InputError(f"{where}: field {name!r} holds chat messages and the tokenizer has no chat template to "
                             "render them; give a field of plain text")
        note = f"{path}: field {name!r} holds chat messages, rendered with the tokenizer's chat template"
        if note not in notes:
            notes.append(note)
        return chat(value)
    kind = ("null" if value is None else "a bool" if isinstance(value, bool)
            else "a number" if isinstance(value, (int, float)) else "an object" if isinstance(value, dict)
            else "a list" if isinstance(value, list) else f"a {type(value).__name__}")
    raise InputError(f"{where}: field {name!r} is {kind} ({reprlib.repr(value)}), not text")


def _jsonl_rows(path: Path, name: str, chat: ChatRender | None, notes: list[str]) -> Iterator[str]:
    offset = 0
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            _binary_check(raw, path, offset, n)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}: line {n}: not UTF-8 text: byte {offset + err.start} cannot be decoded "
                                 f"({err.reason})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {n}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {n}: not a JSON object")
            if name not in row:
                raise InputError(f"{path}: line {n}: no field {name!r}")
            yield _row_text(row[name], f"{path}: line {n}", name, chat, notes, path)


def _table_rows(path: Path, name: str, chat: ChatRender | None, notes: list[str]) -> Iterator[str]:
    """Rows of a parquet file or an Arrow IPC file (stream or file format, as `datasets` saves), a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = "parquet" if path.suffix == ".parquet" else "arrow"
    try:
        if kind == "parquet":
            table = pq.ParquetFile(path)
            columns = table.schema_arrow.names
            batches = table.iter_batches(batch_size=256, columns=[name]) if name in columns else iter(())
        else:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(path)))
                columns, batches = reader.schema.names, iter(reader)
            except pa.ArrowInvalid:
                whole = pa.ipc.open_file(pa.memory_map(str(path)))
                columns = whole.schema.names
                batches = (whole.get_batch(i) for i in range(whole.num_record_batches))
        if name not in columns:
            raise InputError(f"{path}: no field {name!r}; columns are {columns}")
        row = 0
        for batch in batches:
            for value in batch.column(name).to_pylist():
                row += 1
                yield _row_text(value, f"{path}: row {row}", name, chat, notes, path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable {kind} file: {err}") from None


def _reader(path: Path, name: str | None, chat: ChatRender | None, notes: list[str]) -> Callable[[], Iterator[str]]:
    """A function that streams the documents of one local file or folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and not p.is_dir())
        for p in files:
            _check_regular(p)
        if not files:
            raise InputError(f"{path}: folder has no .txt or .md files")
        return lambda: (d for p in files for d in _documents(_text_blocks(p), paragraphs=False))
    _check_regular(path)
    if path.suffix in (".txt", ".md"):
        return lambda: _documents(_text_blocks(path), paragraphs=True)
    if path.suffix not in (".jsonl", ".parquet", ".arrow"):
        raise InputError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .md, .jsonl, .parquet, .arrow)")
    if name is None:
        what = "text field of each JSON line" if path.suffix == ".jsonl" else "text column of this table"
        raise InputError(f"{path}: calibration.field must name the {what}")
    rows = _jsonl_rows if path.suffix == ".jsonl" else _table_rows
    return lambda: (d for row in rows(path, name, chat, notes) for d in _documents(iter([row]), paragraphs=False))


def load_corpus(source: str, field: str | None = None, chat: ChatRender | None = None) -> Corpus:
    """A packaged corpus by name ('pydoc', 'licenses') or a local .txt/.md/.jsonl/.parquet/.arrow file or a folder
    of .txt/.md files. `field` names the text field of .jsonl/.parquet/.arrow rows; rows holding chat messages are
    rendered by `chat` (see chat_renderer). The file is checked and its first document read now; the rest is read
    as the corpus is used, and bad rows are refused when reached."""
    if source == "pydoc":
        return _pydoc_corpus()
    if source == "licenses":
        return _licenses_corpus()
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"calibration source {source!r}: no such file or folder (packaged sources: {', '.join(PACKAGED)})")
    notes: list[str] = []
    read = _reader(path, field, chat, notes)
    corpus = Corpus(str(path), lambda: (d for d in read() if d.strip()), notes)
    if next(corpus.read(), None) is None:
        raise InputError(f"calibration source {source!r} is empty: it has no text")
    return corpus


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (1-D int64), without special tokens, in one call (small texts; a corpus
    is tokenized in bounded chunks by Corpus.tokens)."""
    return _encode(tokenizer, text)


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
