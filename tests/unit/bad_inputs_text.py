"""Bad-input cases for calibration and evaluation text; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing written).

Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model, artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

CHAT = [{"role": "user", "content": "What is a tuple?"}, {"role": "assistant", "content": "An immutable sequence."}]
GOOD_ROWS = [{"text": f"row {i}: " + "plain calibration text " * 8, "messages": CHAT} for i in range(4)]


def _recipe(f: dict, name: str, calibration: dict | None = None, evaluate: dict | None = None,
            model: Path | None = None) -> list:
    """`run` of a small good recipe with these calibration / evaluate keys changed, written to root/text-NAME.yaml."""
    data = {"name": "t", "model": str(model or f["model"]), "passes": [{"pass": "flap", "target": 0.3}],
            "calibration": {"windows": 8, "seq_len": 64, **(calibration or {})},
            "evaluate": {"seq_len": 64, "max_windows": 2, "extra": [], **(evaluate or {})}}
    path = f["root"] / f"text-{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["run", "-r", path]


def _jsonl(f: dict, name: str, bad_row: dict | str, at: int = 3) -> str:
    """root/text-NAME.jsonl: good rows, with `bad_row` (a dict, or raw line text) as line `at` (1-based)."""
    lines = [json.dumps(r) for r in GOOD_ROWS]
    lines.insert(at - 1, bad_row if isinstance(bad_row, str) else json.dumps(bad_row))
    path = f["root"] / f"text-{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _table(f: dict, name: str, values: list, suffix: str = ".parquet") -> str:
    """root/text-NAME.parquet (or .arrow, as `datasets` saves) whose column `text` holds `values`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = f["root"] / f"text-{name}{suffix}"
    table = pa.table({"text": pa.array(values)})
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    return str(path)


def _bytes(f: dict, name: str, data: bytes) -> str:
    path = f["root"] / f"text-{name}"
    path.write_bytes(data)
    return str(path)


def _fifo(f: dict, name: str) -> str:
    path = f["root"] / f"text-{name}"
    if not path.exists():
        os.mkfifo(path)
    return str(path)


def _folder_with_fifo(f: dict) -> str:
    folder = f["root"] / "text-folder-fifo"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("some text\n\nmore text\n")
    _fifo({"root": folder}, "b.txt")
    return str(folder)


def _long_context_model(f: dict) -> Path:
    """A tiny Llama whose config allows 2**20 positions: seq_len passes the context check, memory cannot."""
    from tests.tiny import make_tiny_model

    folder = f["root"] / "text-long-context-model"
    return folder if folder.exists() else make_tiny_model(folder, max_position_embeddings=2**20)


def _src(f, path: str, field: str | None = "text") -> dict:
    return {"source": path, **({"field": field} if field else {})}


CASES = [
    # rows whose field is not text, in each row format
    ("text-jsonl-null", lambda f: _recipe(f, "a", _src(f, _jsonl(f, "null", {"text": None}))),
     "text-null.jsonl: line 3: field 'text' is null"),
    ("text-jsonl-number", lambda f: _recipe(f, "b", _src(f, _jsonl(f, "number", {"text": 42}, at=1))),
     "text-number.jsonl: line 1: field 'text' is a number (42)"),
    ("text-jsonl-float", lambda f: _recipe(f, "c", _src(f, _jsonl(f, "float", {"text": 0.5}, at=5))),
     "text-float.jsonl: line 5: field 'text' is a number (0.5)"),
    ("text-jsonl-bool", lambda f: _recipe(f, "d", _src(f, _jsonl(f, "bool", {"text": True}))),
     "text-bool.jsonl: line 3: field 'text' is a bool (True)"),
    ("text-jsonl-object", lambda f: _recipe(f, "e", _src(f, _jsonl(f, "object", {"text": {"body": "x"}}))),
     "text-object.jsonl: line 3: field 'text' is an object"),
    ("text-jsonl-list", lambda f: _recipe(f, "f", _src(f, _jsonl(f, "list", {"text": ["a", "b"]}))),
     "text-list.jsonl: line 3: field 'text' is a list"),
    ("text-jsonl-not-object", lambda f: _recipe(f, "g", _src(f, _jsonl(f, "array", "[1, 2]", at=2))),
     "text-array.jsonl: line 2: not a JSON object"),
    ("text-jsonl-chat-no-template", lambda f: _recipe(f, "h", _src(f, _jsonl(f, "chat", {"text": "x"}), "messages")),
     "text-chat.jsonl: line 1: field 'messages' holds chat messages and the tokenizer has no chat template"),
    ("text-parquet-null", lambda f: _recipe(f, "i", _src(f, _table(f, "null", ["good text"] * 3 + [None]))),
     "text-null.parquet: row 4: field 'text' is null"),
    ("text-parquet-number", lambda f: _recipe(f, "j", _src(f, _table(f, "number", [1, 2, 3]))),
     "text-number.parquet: row 1: field 'text' is a number (1)"),
    ("text-parquet-object", lambda f: _recipe(f, "k", _src(f, _table(f, "object", [{"body": "x"}]))),
     "text-object.parquet: row 1: field 'text' is an object"),
    ("text-parquet-list", lambda f: _recipe(f, "l", _src(f, _table(f, "list", [["a"], ["b"]]))),
     "text-list.parquet: row 1: field 'text' is a list"),
    ("text-parquet-chat-no-template", lambda f: _recipe(f, "m", _src(f, _table(f, "chat", [CHAT, CHAT]))),
     "text-chat.parquet: row 1: field 'text' holds chat messages and the tokenizer has no chat template"),
    ("text-parquet-no-field", lambda f: _recipe(f, "n", _src(f, _table(f, "nofield", ["a"]), "body")),
     "text-nofield.parquet: no field 'body'; columns are ['text']"),
    ("text-parquet-damaged", lambda f: _recipe(f, "o", _src(f, _bytes(f, "damaged.parquet", b"PAR1 not really"))),
     "text-damaged.parquet: not a readable parquet file"),
    ("text-arrow-null", lambda f: _recipe(f, "p", _src(f, _table(f, "null", ["ok", None], ".arrow"))),
     "text-null.arrow: row 2: field 'text' is null"),
    ("text-arrow-bool", lambda f: _recipe(f, "q", _src(f, _table(f, "bool", [False], ".arrow"))),
     "text-bool.arrow: row 1: field 'text' is a bool (False)"),
    # bytes that are not UTF-8 text
    ("text-txt-latin1", lambda f: _recipe(f, "r", _src(f, _bytes(f, "latin1.txt", "na\u00efve text".encode("latin-1")), None)),
     "text-latin1.txt: not UTF-8 text: byte 2 (line 1)"),
    ("text-txt-binary", lambda f: _recipe(f, "s", _src(f, _bytes(f, "binary.txt", (f["model"] / "model.safetensors").read_bytes()[:4096]), None)),
     "text-binary.txt: a NUL byte at byte "),
    ("text-txt-random-bytes", lambda f: _recipe(f, "t", _src(f, _bytes(f, "random.md", b"header\n\n" + bytes(range(128, 256))), None)),
     "text-random.md: not UTF-8 text: byte 8 (line 3)"),
    ("text-jsonl-bad-utf8", lambda f: _recipe(f, "u", _src(f, _bytes(f, "badutf8.jsonl", b'{"text": "ok"}\n{"text": "\xe9t\xe9"}\n'))),
     "text-badutf8.jsonl: line 2: not UTF-8 text: byte 25"),
    ("text-recipe-latin1", lambda f: ["run", "-r", _bytes(f, "latin1.yaml", "name: caf\u00e9\npasses: [{pass: flap, target: 0.3}]\n".encode("latin-1"))],
     "text-latin1.yaml: not UTF-8 text (byte 9)"),
    ("text-recipe-utf16", lambda f: ["validate", _bytes(f, "utf16.yaml", "name: x\n".encode("utf-16"))],
     "text-utf16.yaml: not UTF-8 text (byte 0)"),
    # files that are not regular files
    ("text-fifo", lambda f: _recipe(f, "v", _src(f, _fifo(f, "pipe.txt"), None)),
     "text-pipe.txt: not a regular file (a FIFO)"),
    ("text-device", lambda f: _recipe(f, "w", _src(f, "/dev/zero", None)),
     "/dev/zero: not a regular file (a character device)"),
    ("text-folder-with-fifo", lambda f: _recipe(f, "x", _src(f, _folder_with_fifo(f), None)),
     "b.txt: not a regular file (a FIFO)"),
    ("text-extra-fifo", lambda f: _recipe(f, "y", evaluate={"extra": [_fifo(f, "extra-pipe.txt")]}),
     "text-extra-pipe.txt: not a regular file (a FIFO)"),
    # evaluate.extra reads .jsonl rows by calibration.field
    ("text-extra-jsonl-bad-row", lambda f: _recipe(f, "z", {"field": "text"}, {"extra": [_jsonl(f, "extra", {"text": None}, at=2)]}),
     "text-extra.jsonl: line 2: field 'text' is null"),
    ("text-extra-jsonl-no-field", lambda f: _recipe(f, "aa", evaluate={"extra": [_jsonl(f, "extra2", {"text": "x"})]}),
     "text-extra2.jsonl: calibration.field must name the text field of each JSON line"),
    ("text-extra-binary", lambda f: _recipe(f, "ab", evaluate={"extra": [_bytes(f, "extra-bin.txt", b"abc\x00def")]}),
     "text-extra-bin.txt: a NUL byte at byte 3 (line 1)"),
    # windows the model or the machine cannot take
    ("text-calibration-seq-len-too-long", lambda f: _recipe(f, "ac", {"seq_len": 1024}),
     "calibration.seq_len 1024 exceeds the model's context length 512"),
    ("text-evaluate-seq-len-too-long", lambda f: _recipe(f, "ad", evaluate={"seq_len": 513}),
     "evaluate.seq_len 513 exceeds the model's context length 512"),
    ("text-windows-beyond-memory", lambda f: _recipe(f, "ae", {"windows": 2**16, "seq_len": 2**20}, model=_long_context_model(f)),
     "calibration.windows 65536 x seq_len 1048576 x hidden size 96 x 4 bytes x 3 copies"),
]
