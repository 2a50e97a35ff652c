"""Checks of a source model before any pass runs: a dense (not quantized, not compressed) source, safetensors headers
that describe their file exactly, a checkpoint that holds every tensor its config implies and nothing else, finite
weights, and weights the export dtype can hold. Every refusal names config.json and the field, or the file and tensor.

Headers are read and checked here, byte by byte, before safetensors or transformers open a file, so a damaged file is
named instead of ending in a traceback, and a missing tensor is refused instead of being filled with random values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import InputError
from export.format import (
    DTYPES,
    FORMAT_NAME,
    MANIFEST,
    MAX_LISTED,
    PRUNED_MODEL_TYPE,
    SINGLE_WEIGHTS,
    WEIGHTS_INDEX,
)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# bits per element of every dtype the safetensors format defines
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}
DENSE_DTYPES = ("F16", "BF16", "F32", "F64")  # what a dense source stores its weights in
# names transformers drops on load: per-layer rotary frequencies of old checkpoints (now one computed buffer)
IGNORED_UNEXPECTED = re.compile(r"rotary_emb\.inv_freq$")
# configs implying more than this many times the parameters the files hold are refused by count, before the model
# is built; nearer ones are built (on the meta device) and compared tensor by tensor, naming what is missing
IMPLIED_RATIO = 2
CHUNK = 1 << 22  # elements per finiteness / magnitude check: 16 MB of fp32 scratch at most, whatever the tensor


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_json_int(value: object, least: int) -> bool:
    """Whether a parsed JSON value is an integer of at least `least` (true, false and 2.0 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry from a safetensors file, checked against the file: an 8-byte little-endian header length
    within the file, a JSON object header, known dtypes, and data offsets that tile the data section exactly (in
    range, no overlap, no gap, byte counts equal to shape x dtype)."""
    size = path.stat().st_size
    if size < 8:
        raise InputError(f"{path}: {size} bytes, too short for a safetensors file (it starts with an 8-byte header "
                         "length); an interrupted download?")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path}: header length {n} bytes is beyond the {size - 8} bytes that follow it "
                             f"(limit {MAX_HEADER_BYTES}); damaged or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as err:  # UnicodeDecodeError, JSONDecodeError and duplicate keys are all ValueErrors
        raise InputError(f"{path}: header is not valid JSON ({err}); damaged or not a safetensors file") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is a JSON {type(header).__name__}, not an object of tensors")
    data_bytes = size - 8 - n
    entries, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            raise InputError(f"{where}: header entry {meta!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise InputError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(is_json_int(d, 0) for d in shape):
            raise InputError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_json_int(o, 0) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise InputError(f"{where}: data_offsets {offsets!r} are not [begin, end] byte positions")
        begin, end = offsets
        want = -(-math.prod(shape) * DTYPE_BITS[dtype] // 8)
        if end - begin != want:
            raise InputError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, {dtype} {shape} needs {want}")
        if end > data_bytes:
            raise InputError(f"{where}: data ends at byte {end} but the file holds {data_bytes} bytes of data "
                             "(truncated?)")
        entries[name] = TensorEntry(path, dtype, tuple(shape))
        spans.append((begin, end, name))
    position, previous = 0, "the header"
    for begin, end, name in sorted(spans):
        if begin < position:
            raise InputError(f"{path}: tensor {name} (bytes {begin}..{end}) overlaps {previous}")
        if begin > position:
            raise InputError(f"{path}: bytes {position}..{begin} before tensor {name} belong to no tensor")
        position, previous = end, f"tensor {name}"
    if position != data_bytes:
        raise InputError(f"{path}: {data_bytes - position} bytes after {previous} belong to no tensor")
    return entries


def _read_index(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name from a model.safetensors.index.json."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(f"{index}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: weight_map: not a mapping of tensor name -> shard file")
    for name, shard in weight_map.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise InputError(f"{index}: weight_map.{name}: {shard!r} is not a file name in the model folder")
    return weight_map


def checkpoint_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint transformers loads (model.safetensors, else the shards the index names), from
    checked headers; a shard the folder lacks, an index that disagrees with its shards, a tensor in two files are
    refused."""
    if (folder / SINGLE_WEIGHTS).is_file():
        return read_header(folder / SINGLE_WEIGHTS)
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        found = ", ".join(sorted(p.name for p in folder.glob("*.safetensors")))
        raise InputError(f"{folder}: neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX} (found {found}); transformers "
                         "loads only those")
    weight_map = _read_index(index)
    tensors: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            names = sorted(k for k, v in weight_map.items() if v == shard)
            raise InputError(f"{index}: shard {shard} (tensor {names[0]} and {len(names) - 1} more) is missing "
                             "from the folder")
        for name, entry in read_header(folder / shard).items():
            if name in tensors:
                raise InputError(f"{folder / shard}: tensor {name} is also in {tensors[name].file.name}")
            tensors[name] = entry
    for name, shard in weight_map.items():
        if name not in tensors or tensors[name].file.name != shard:
            held = f"it is in {tensors[name].file.name}" if name in tensors else "no shard holds it"
            raise InputError(f"{index}: names tensor {name} in {shard}, but {held} (a stale index?)")
    for name, entry in tensors.items():
        if name not in weight_map:
            raise InputError(f"{entry.file}: tensor {name} is not in {index.name} (a stale index?)")
    return tensors


def implied_parameters(config: dict) -> int:
    """A lower bound on the parameters a Llama-family config implies (config sizes already checked): embeddings and an
    lm_head when the config says it is untied, per layer the q/k/v/o and gate/up/down projections and two norms, the
    final norm; biases and q/k norms are not counted (exact for Llama, Mistral)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = (2 * heads + 2 * kv_heads) * head_dim * hidden
    layer = attention + 3 * config["intermediate_size"] * hidden + 2 * hidden
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + config["num_hidden_layers"] * layer + hidden


def expected_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Name -> shape of every tensor the model that config.json describes holds (built on the meta device: no memory),
    and the tied names (lm_head.weight) a checkpoint may omit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"{folder / 'config.json'}: transformers cannot build the model it describes: {err}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, set(model.get_expanded_tied_weights_keys())


def check_checkpoint(folder: Path, config: dict) -> dict[str, TensorEntry]:
    """Refuse a checkpoint that does not hold exactly what its (checked) config implies: sizes far beyond what the
    files hold (before building anything), missing, unexpected or misshapen tensors, non-float weights. Returns the
    tensors."""
    tensors = checkpoint_tensors(folder)
    held, implied = sum(e.numel for e in tensors.values()), implied_parameters(config)
    if implied > IMPLIED_RATIO * held:
        sizes = ", ".join(f"{k}={config.get(k)}" for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                           "vocab_size", "num_attention_heads", "num_key_value_heads"))
        raise InputError(f"{folder / 'config.json'}: sizes ({sizes}) imply at least {implied:,} parameters, but the "
                         f"checkpoint holds {held:,}; wrong sizes, or most of the weights are missing")
    shapes, tied = expected_tensors(folder)
    problems = [f"missing tensor {k}" for k in shapes if k not in tensors and k not in tied]
    for name, entry in sorted(tensors.items()):
        where = f"{entry.file.name}: tensor {name}"
        if name not in shapes:
            if not IGNORED_UNEXPECTED.search(name):
                problems.append(f"{where} is not part of the model config.json describes")
        elif entry.shape != shapes[name]:
            problems.append(f"{where} has shape {list(entry.shape)}, config.json implies {list(shapes[name])}")
        elif entry.dtype not in DENSE_DTYPES:
            problems.append(f"{where} is stored as {entry.dtype}; a dense source stores {', '.join(DENSE_DTYPES)}")
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        listed = "; ".join(problems[:MAX_LISTED])
        raise InputError(f"{folder}: the checkpoint does not match config.json: {listed}{more}")
    return tensors


def check_dense_source(folder: Path, config: dict, where: str) -> None:
    """Refuse a source that is already compressed in a way a pass cannot start from: one of our artifacts that is
    quantized or has per-layer widths, or any config with a quantization_config. A pruned artifact with a stock
    config holds plain dense weights and may be compressed further (prune now, quantize in a later run)."""
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            manifest = None
        if (isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME
                and (manifest.get("quantization") or config.get("model_type") == PRUNED_MODEL_TYPE)):
            source = manifest.get("source")
            made_from = f" made from {source.get('identity')}" if isinstance(source, dict) else ""
            raise InputError(f"{folder}: a compress artifact ({MANIFEST} format {FORMAT_NAME!r}){made_from}, already "
                             "compressed; give the dense source model")
    if config.get("model_type") == PRUNED_MODEL_TYPE:
        raise InputError(f"{where}: model_type {PRUNED_MODEL_TYPE!r} is a compress artifact's config, already "
                         "compressed; give the dense source model")
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unnamed method") if isinstance(quant, dict) else repr(quant)
        raise InputError(f"{where}: quantization_config ({method}): these weights are already quantized; give the "
                         "dense (unquantized) model")


def _chunks(tensor: torch.Tensor) -> Iterable[torch.Tensor]:
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK].float()


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse NaN or Inf in any floating tensor, naming it; one tensor, one chunk at a time (no copy of the model)."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in _chunks(tensor)):
            nan = sum(int(torch.isnan(c).sum()) for c in _chunks(tensor))
            inf = sum(int(torch.isinf(c).sum()) for c in _chunks(tensor))
            raise InputError(f"{where}: tensor {name} holds {nan} NaN and {inf} Inf values; the source weights must be "
                             "finite")


def check_export_dtype(model: nn.Module, dtype_name: str) -> None:
    """Refuse `export.dtype` (float16, bfloat16) when a weight's magnitude exceeds that dtype's finite range, naming
    the tensor, before any pass runs; "auto" keeps the source's own dtype and always fits."""
    if dtype_name not in DTYPES:
        return
    limit = torch.finfo(DTYPES[dtype_name]).max
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.numel():
            peak = max(float(c.abs().max()) for c in _chunks(param))
            if peak > limit:
                raise InputError(f"export.dtype: {dtype_name} cannot hold tensor {name} (max |w| {peak:.4g} > "
                                 f"{limit:.4g}); use float32 or bfloat16")
