"""Bad-input cases for source checkpoints and configs; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing written).

Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model, artifact.
Every case copies the tiny model into root/src-<tag>, damages one thing (config.json, a tensor, the file's bytes, the
shard index) and runs a good recipe on it; all are refused before any pass runs."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _copy(f: dict, tag: str) -> Path:
    dst = f["root"] / f"src-{tag}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(f["model"], dst)
    return dst


def _run(f: dict, model: Path, tag: str, **export) -> list:
    """`compress run` of a small good recipe on `model` (export fields as given)."""
    recipe = {"name": "t", "model": str(model), "calibration": {"windows": 8, "seq_len": 64},
              "evaluate": {"seq_len": 64, "max_windows": 2, "extra": []},
              "passes": [{"pass": "flap", "target": 0.3}], **({"export": export} if export else {})}
    path = f["root"] / f"source-{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["run", "-r", path]


def config(tag: str, edit: Callable[[dict], object]) -> Callable[[dict], list]:
    """A case whose config.json is `edit(config)` (the edit may change the dict in place and return None)."""
    def build(f):
        model = _copy(f, tag)
        cfg = json.loads((model / "config.json").read_text())
        new = edit(cfg)
        (model / "config.json").write_text(json.dumps(cfg if new is None else new))
        return _run(f, model, tag)
    return build


def weights(tag: str, edit: Callable[[dict], None], **export) -> Callable[[dict], list]:
    """A case whose model.safetensors holds `edit(state)` (in place), a well-formed file."""
    def build(f):
        model = _copy(f, tag)
        state = load_file(model / WEIGHTS)
        edit(state)
        save_file(state, model / WEIGHTS, metadata={"format": "pt"})
        return _run(f, model, tag, **export)
    return build


def raw(tag: str, edit: Callable[[bytes], bytes]) -> Callable[[dict], list]:
    """A case whose model.safetensors bytes are `edit(bytes)`: a damaged file."""
    def build(f):
        model = _copy(f, tag)
        (model / WEIGHTS).write_bytes(edit((model / WEIGHTS).read_bytes()))
        return _run(f, model, tag)
    return build


def header(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    """Rewrite a safetensors file's JSON header (in place edit of the parsed dict); data bytes unchanged."""
    def apply(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        head = json.loads(data[8:8 + n])
        edit(head)
        text = json.dumps(head).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + n:]
    return apply


def _last(head: dict) -> str:
    """The tensor whose data comes last in the file."""
    return max((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][1])


def _second(head: dict) -> str:
    return sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])[1]


def _overlap(head: dict) -> None:
    name = _second(head)
    begin, end = head[name]["data_offsets"]
    head[name]["data_offsets"] = [begin - 8, end - 8]


def _beyond(head: dict) -> None:
    name = _last(head)
    begin, end = head[name]["data_offsets"]
    head[name]["data_offsets"] = [begin + 64, end + 64]


def _duplicate_key(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode().rstrip()
    first = text[1:text.index("},") + 2]  # the first entry, repeated
    text = "{" + first + text[1:]
    return len(text).to_bytes(8, "little") + text.encode() + data[8 + n:]


def sharded(tag: str, edit: Callable[[Path, dict], None]) -> Callable[[dict], list]:
    """A case whose checkpoint is two shards + index; `edit(folder, index)` damages them (the index is written after)."""
    def build(f):
        model = _copy(f, tag)
        state = load_file(model / WEIGHTS)
        (model / WEIGHTS).unlink()
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, model / shard, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        edit(model, index)
        (model / INDEX).write_text(json.dumps(index))
        return _run(f, model, tag)
    return build


def _set(state: dict, name: str, index: tuple, value: float) -> None:
    state[name][index] = value


def _untied_without_head(f: dict) -> list:
    model = _copy(f, "untied-no-head")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return _run(f, model, "untied-no-head")


def _renamed_weights(f: dict) -> list:
    model = _copy(f, "renamed")
    (model / WEIGHTS).rename(model / "weights.safetensors")
    return _run(f, model, "renamed")


def _bad_bytes_config(f: dict) -> list:
    model = _copy(f, "config-latin1")
    (model / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    return _run(f, model, "config-latin1")


CASES = [
    # config.json: shape of the file and every size field
    ("source-config-list", config("config-list", lambda c: [c]), "config.json: a config is a JSON object, this one is a list"),
    ("source-config-not-utf8", _bad_bytes_config, "config.json: not valid JSON"),
    ("source-hidden-negative", config("hidden-neg", lambda c: c.update(hidden_size=-96)), "config.json: hidden_size: -96 is not a positive integer"),
    ("source-intermediate-zero", config("inter-zero", lambda c: c.update(intermediate_size=0)), "config.json: intermediate_size: 0 is not a positive integer"),
    ("source-layers-fraction", config("layers-frac", lambda c: c.update(num_hidden_layers=2.5)), "config.json: num_hidden_layers: 2.5 is not a positive integer"),
    ("source-heads-string", config("heads-str", lambda c: c.update(num_attention_heads="6")), "config.json: num_attention_heads: '6' is not a positive integer"),
    ("source-vocab-bool", config("vocab-bool", lambda c: c.update(vocab_size=True)), "config.json: vocab_size: True is not a positive integer"),
    ("source-head-dim-zero", config("hd-zero", lambda c: c.update(head_dim=0)), "config.json: head_dim: 0 is not a positive integer"),
    ("source-kv-heads-negative", config("kv-neg", lambda c: c.update(num_key_value_heads=-3)), "config.json: num_key_value_heads: -3 is not a positive integer"),
    ("source-layers-missing", config("layers-missing", lambda c: c.pop("num_hidden_layers") and None), "config.json: num_hidden_layers: missing"),
    ("source-kv-heads-not-dividing", config("kv-4", lambda c: c.update(num_key_value_heads=4)), "config.json: num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ("source-hidden-not-dividing", config("hidden-9", lambda c: c.update(num_attention_heads=9, head_dim=None)), "config.json: hidden_size 96 is not a multiple of num_attention_heads 9"),
    ("source-model-type-unknown", config("type-unknown", lambda c: c.update(model_type="llama9")), "config.json: model_type: 'llama9' is not the 'llama'"),
    ("source-architectures-string", config("arch-str", lambda c: c.update(architectures="LlamaForCausalLM")), "config.json: architectures: 'LlamaForCausalLM' is not a list"),
    # config.json sizes against what the weights hold: refused from the headers, before building anything
    ("source-layers-billion", config("layers-1e9", lambda c: c.update(num_hidden_layers=1_000_000_000)), "config.json: sizes (num_hidden_layers=1000000000"),
    ("source-vocab-huge", config("vocab-huge", lambda c: c.update(vocab_size=10**7)), "vocab_size=10000000, num_attention_heads=6, num_key_value_heads=3) imply at least"),
    ("source-layers-one-more", config("layers-4", lambda c: c.update(num_hidden_layers=4)), "missing tensor model.layers.3.self_attn.q_proj.weight"),
    ("source-layers-fewer", config("layers-2", lambda c: c.update(num_hidden_layers=2)), "tensor model.layers.2.input_layernorm.weight is not part of the model config.json describes"),
    ("source-vocab-smaller", config("vocab-200", lambda c: c.update(vocab_size=200)), "tensor model.embed_tokens.weight has shape [384, 96], config.json implies [200, 96]"),
    ("source-intermediate-smaller", config("inter-120", lambda c: c.update(intermediate_size=120)), "tensor model.layers.0.mlp.down_proj.weight has shape [96, 128], config.json implies [96, 120]"),
    # already compressed sources
    ("source-gptq-config", config("gptq", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})), "config.json: quantization_config (gptq): these weights are already quantized"),
    ("source-bnb-config", config("bnb", lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})), "quantization_config (bitsandbytes)"),
    ("source-compress-artifact", lambda f: _run(f, f["artifact"], "artifact"), "a compress artifact (manifest.json format 'compress-artifact')"),
    ("source-pruned-config", config("pruned", lambda c: c.update(model_type="compress_pruned", architectures=["CompressPrunedForCausalLM"])), "config.json: model_type 'compress_pruned' is a compress artifact's config"),
    # incomplete or inconsistent checkpoints (a tied lm_head.weight is not missing: every case here omits it)
    ("source-missing-proj", weights("miss-proj", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")), "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("source-missing-norm", weights("miss-norm", lambda s: s.pop("model.norm.weight")), "missing tensor model.norm.weight"),
    ("source-missing-embed", weights("miss-embed", lambda s: s.pop("model.embed_tokens.weight")), "missing tensor model.embed_tokens.weight"),
    ("source-untied-missing-head", _untied_without_head, "missing tensor lm_head.weight"),
    ("source-extra-bias", weights("extra-bias", lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(96)})), "model.safetensors: tensor model.layers.0.self_attn.q_proj.bias is not part of the model"),
    ("source-wrong-shape", weights("shape", lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(40, 96)})), "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape [40, 96], config.json implies [48, 96]"),
    ("source-int-weight", weights("int8", lambda s: s.update({"model.norm.weight": torch.ones(96, dtype=torch.int8)})), "tensor model.norm.weight is stored as I8"),
    ("source-not-named-model", _renamed_weights, "neither model.safetensors nor model.safetensors.index.json (found weights.safetensors)"),
    ("source-shard-missing", sharded("shard-gone", lambda m, i: (m / "model-00002-of-00002.safetensors").unlink()), "model.safetensors.index.json: shard model-00002-of-00002.safetensors (tensor "),
    ("source-index-stale", sharded("index-stale", lambda m, i: i["weight_map"].update({"model.layers.7.mlp.up_proj.weight": "model-00001-of-00002.safetensors"})), "names tensor model.layers.7.mlp.up_proj.weight in model-00001-of-00002.safetensors, but no shard holds it"),
    ("source-index-wrong-shard", sharded("index-moved", lambda m, i: i["weight_map"].update({"model.norm.weight": "model-00001-of-00002.safetensors"})), "names tensor model.norm.weight in model-00001-of-00002.safetensors, but it is in model-00002-of-00002.safetensors"),
    ("source-index-unlisted", sharded("index-short", lambda m, i: i["weight_map"].pop("model.norm.weight")), "tensor model.norm.weight is not in model.safetensors.index.json"),
    ("source-index-escapes", sharded("index-escape", lambda m, i: i["weight_map"].update({"model.norm.weight": "../model.safetensors"})), "weight_map.model.norm.weight: '../model.safetensors' is not a file name in the model folder"),
    ("source-index-list", sharded("index-list", lambda m, i: i.update(weight_map=[])), "model.safetensors.index.json: weight_map: not a mapping"),
    # damaged safetensors files: named before safetensors or transformers read them
    ("source-st-empty", raw("st-empty", lambda b: b""), "model.safetensors: 0 bytes, too short for a safetensors file"),
    ("source-st-stub", raw("st-stub", lambda b: b[:5]), "model.safetensors: 5 bytes, too short"),
    ("source-st-random", raw("st-random", lambda b: random.Random(0).randbytes(4096)), "model.safetensors: header length"),
    ("source-st-absurd-length", raw("st-absurd", lambda b: (2**63).to_bytes(8, "little") + b[8:]), "model.safetensors: header length 9223372036854775808 bytes is beyond"),
    ("source-st-header-garbage", raw("st-garbage", lambda b: b[:8] + b"\x00\xff" * 8 + b[24:]), "model.safetensors: header is not valid JSON"),
    ("source-st-header-list", raw("st-list", lambda b: (2).to_bytes(8, "little") + b"[]" + b[8 + int.from_bytes(b[:8], "little"):]), "model.safetensors: header is a JSON list"),
    ("source-st-duplicate-name", raw("st-dup", _duplicate_key), "model.safetensors: header is not valid JSON (duplicate key"),
    ("source-st-overlap", raw("st-overlap", header(_overlap)), ") overlaps tensor "),
    ("source-st-beyond", raw("st-beyond", header(_beyond)), "but the file holds"),
    ("source-st-truncated", raw("st-truncated", lambda b: b[:-100]), "(truncated?)"),
    ("source-st-trailing", raw("st-trailing", lambda b: b + b"\x00" * 16), "model.safetensors: 16 bytes after tensor"),
    ("source-st-dtype", raw("st-dtype", header(lambda h: h["model.norm.weight"].update(dtype="F17"))), "model.safetensors: tensor model.norm.weight: unknown dtype 'F17'"),
    ("source-st-byte-count", raw("st-count", header(lambda h: h["model.norm.weight"].update(shape=[95]))), "model.safetensors: tensor model.norm.weight: data_offsets"),
    ("source-st-negative-shape", raw("st-negshape", header(lambda h: h["model.norm.weight"].update(shape=[-96]))), "tensor model.norm.weight: shape [-96] is not a list of sizes"),
    # weights that are not finite, or that the export dtype cannot hold
    ("source-nan-embedding", weights("nan-embed", lambda s: _set(s, "model.embed_tokens.weight", (3, 5), float("nan"))), "tensor model.embed_tokens.weight holds 1 NaN and 0 Inf values"),
    ("source-inf-norm", weights("inf-norm", lambda s: _set(s, "model.layers.0.input_layernorm.weight", (0,), float("inf"))), "tensor model.layers.0.input_layernorm.weight holds 0 NaN and 1 Inf values"),
    ("source-nan-proj", weights("nan-proj", lambda s: s["model.layers.2.mlp.down_proj.weight"][:, 7].fill_(float("nan"))), "tensor model.layers.2.mlp.down_proj.weight holds 96 NaN"),
    ("source-fp16-overflow", weights("f16-big", lambda s: _set(s, "model.layers.1.mlp.down_proj.weight", (0, 0), 1e5), dtype="float16"), "export.dtype: float16 cannot hold tensor model.layers.1.mlp.down_proj.weight (max |w| 1e+05 > 6.55e+04)"),
    ("source-fp16-overflow-embedding", weights("f16-embed", lambda s: _set(s, "model.embed_tokens.weight", (1, 1), -7e4), dtype="float16"), "export.dtype: float16 cannot hold tensor model.embed_tokens.weight"),
    ("source-bf16-overflow", weights("bf16-big", lambda s: _set(s, "model.norm.weight", (2,), 3.4e38), dtype="bfloat16"), "export.dtype: bfloat16 cannot hold tensor model.norm.weight"),
]
