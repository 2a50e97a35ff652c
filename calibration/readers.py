"""Local text files in, documents out: .txt/.md (and folders of them), .jsonl, parquet and Arrow rows, streamed.

Files are read in blocks as strict UTF-8; what is not a regular file (a FIFO blocks forever when opened), binary
data and undecodable bytes are refused naming the file, byte and line. Rows whose field is not text are refused by
file, row and field; lists of chat messages are rendered by the caller's `ChatRender` and noted once."""

from __future__ import annotations

import codecs
import io
import json
import re
import reprlib
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from compress.errors import InputError

READ_BYTES = 1 << 20  # bytes read from a file at a time
MAX_DOC_CHARS = 1 << 20  # a longer paragraph, file or row is cut at whitespace into documents of at most this size
# rows a parquet file is decoded in at a time: memory follows a few hundred rows, not a row group (often millions of
# rows), and 256 rows already amortize pyarrow's per-batch cost. Arrow IPC files come in the batches they were written.
TABLE_BATCH_ROWS = 256
TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".parquet", ".arrow")
ChatRender = Callable[[list], str]  # chat messages [{"role": ..., "content": ...}, ...] -> text

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def check_regular(path: Path) -> None:
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


def text_blocks(path: Path) -> Iterator[str]:
    """The file's text in blocks of READ_BYTES: strict UTF-8 (a leading byte-order mark dropped), newlines translated
    as open() does; refuses binary data and undecodable bytes naming the byte offset and line."""
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


def documents(blocks: Iterator[str], paragraphs: bool) -> Iterator[str]:
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
    """The field `name` of each JSON line, as text (blank lines skipped); bad lines refused by line number."""
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
            batches = (table.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[name]) if name in columns
                       else iter(()))
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


def reader(path: Path, name: str | None, chat: ChatRender | None, notes: list[str]) -> Callable[[], Iterator[str]]:
    """A function that streams the documents of one local file or folder (checked now: regular files, a known
    type, a field for rows); `notes` collects what was done to the text (chat messages rendered), once each."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and not p.is_dir())
        for p in files:
            check_regular(p)
        if not files:
            raise InputError(f"{path}: folder has no .txt or .md files")
        return lambda: (d for p in files for d in documents(text_blocks(p), paragraphs=False))
    check_regular(path)
    if path.suffix in TEXT_SUFFIXES:
        return lambda: documents(text_blocks(path), paragraphs=True)
    if path.suffix not in ROW_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .md, .jsonl, .parquet, .arrow)")
    if name is None:
        what = "text field of each JSON line" if path.suffix == ".jsonl" else "text column of this table"
        raise InputError(f"{path}: calibration.field must name the {what}")
    rows = _jsonl_rows if path.suffix == ".jsonl" else _table_rows
    return lambda: (d for row in rows(path, name, chat, notes) for d in documents(iter([row]), paragraphs=False))
