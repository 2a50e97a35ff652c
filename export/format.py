"""The artifact layout shared by writer and loader.

An artifact folder holds:
  config.json            stock Hugging Face config when the structure is expressible in one, else the
                         `compress_pruned` form (see docs/format.md): base config + per-layer `layers`
  model.safetensors      or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the shard size
  tokenizer files, generation_config.json   copied from the source model
  manifest.json          format version, source identity, per-layer architecture, every tensor's file/dtype/shape,
                         sha256 and size of every other file, recipe, seed, package versions
  recipe.yaml, report.json, plan.json, README.md (model card)
  adapter/               only with a low-rank correction: a standard PEFT LoRA adapter (export/peft.py), which our
                         loader applies too; manifest `adapter` says which modules and ranks
  medusa/                only with drafter heads: a vLLM Medusa drafter folder (export/medusa.py: config.json,
                         model.safetensors with the heads and a copy of the lm_head); manifest `heads`;
                         export.medusa.load_heads reads it, export.load leaves it alone
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from export.medusa import MAX_HEADS, SHARED_LM_HEAD, block_names
from export.peft import tensor_names

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

FORMAT_NAME = "compress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PRUNED_MODEL_TYPE = "compress_pruned"
PRUNED_ARCHITECTURE = "CompressPrunedForCausalLM"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

# Which projections a stock config gives biases, per model_type and flag.
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def stock_bias(model_type: str, config: dict) -> tuple[str, ...]:
    """The projections a stock transformers model of this type builds with a bias, given its config flags."""
    if model_type == "llama":
        return (ATTN if config.get("attention_bias") else ()) + (MLP if config.get("mlp_bias") else ())
    if model_type == "qwen3":
        return ATTN if config.get("attention_bias") else ()
    if model_type == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    return ()


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ArtifactError(ValueError):
    """An artifact that is missing, altered or incomplete; the message names the file or tensor."""


# How much one message quotes: a field may hold megabytes and a checkpoint thousands of tensors, and a message is read
MAX_LISTED = 10  # problems or tensor names listed in one message; the rest are counted
MAX_QUOTED = 100  # characters of a value read from a file (a manifest field), quoted in a message
MAX_DETAIL = 300  # characters of a library's own error text (json, pydantic, transformers) appended to ours


# ---- the manifest, typed -----------------------------------------------------------------------------------------
# What manifest.json holds: the writer builds a Manifest and dumps it (Manifest.dumps), the loader reads one
# (Manifest.model_validate), so both sides check the same rules; every problem is refused naming the field, before
# verify, inspect or load touch a file. Unknown keys are kept (extra="allow") so that `model_dump()` gives back what
# was read.


def _inside(rel: str) -> str:
    """A path the manifest names: relative, '/'-separated, no empty, '.' or '..' part, no NUL or backslash, so that
    it stays inside the artifact folder (links are checked where the files are opened, in export.loader)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{rel!r} is not a plain path inside the artifact")
    return rel


ArtifactPath = Annotated[str, AfterValidator(_inside)]
Count = Annotated[int, Field(ge=0)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class FileRecord(_Record):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: Count


class TensorRecord(_Record):
    file: ArtifactPath
    dtype: str = Field(max_length=32)
    shape: list[Count]


class LayerRecord(_Record):
    """One decoder block's widths (export.remote.modeling_compress_pruned.resize_blocks builds them)."""

    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: Count
    bias: list[Literal[ATTN + MLP]]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _groups(self) -> LayerRecord:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        return self

    def projection_shapes(self, hidden: int) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of this block, for a model of width `hidden`."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        inter = self.intermediate_size
        return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                "mlp.down_proj": (hidden, inter)}


class Architecture(_Record):
    base_model_type: str
    layers: list[LayerRecord]


class QuantScheme(_Record):
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(ge=-1)
    sym: bool
    ordered: bool
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]  # (out, in)
    format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"

    @model_validator(mode="after")
    def _groups(self) -> QuantScheme:
        if self.group_size != -1 and (self.group_size < 1 or self.shape[1] % self.group_size):
            raise ValueError(f"group_size {self.group_size} does not divide the {self.shape[1]} input columns "
                             "(a positive divisor, or -1)")
        return self


class AdapterModule(_Record):
    rank: int = Field(ge=1)
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]  # (out, in) of the base


class AdapterRecord(_Record):
    """manifest.adapter: the low-rank correction y += B A x of some linears, stored once, as the PEFT LoRA adapter
    folder `path` (export/peft.py names its files and tensors), in `dtype`."""

    format: Literal["peft-lora"] = "peft-lora"
    path: ArtifactPath
    dtype: Literal["float16", "bfloat16", "float32"]
    modules: dict[str, AdapterModule]  # full module name -> rank and base shape, in plan order


class HeadsRecord(_Record):
    """manifest.heads: Medusa drafter heads over the final hidden states, stored once, as the vLLM Medusa drafter
    folder `path` (export/medusa.py names its files and tensors), in `dtype`."""

    format: Literal["vllm-medusa"] = "vllm-medusa"
    path: ArtifactPath
    dtype: Literal["float16", "bfloat16", "float32"]
    num_heads: int = Field(ge=1, le=MAX_HEADS)
    num_layers: int = Field(ge=1)


class SourceRecord(_Record):
    name: str
    identity: str
    path: str
    sha256: dict[str, str] = {}  # safetensors file name -> sha256 at run time


class Manifest(_Record):
    """manifest.json: format and version, source identity, per-layer architecture, quantization schemes, recipe, and
    every tensor's file/dtype/shape and every file's sha256 and size. Validation also checks that each tensor's file
    is listed (so hashed) and that the layer widths agree with the tensor shapes."""

    format: Literal["compress-artifact"]
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    created: str = ""
    versions: dict[str, str] = {}
    source: SourceRecord
    architecture: Architecture
    quantization: dict[str, QuantScheme] = {}
    adapter: AdapterRecord | None = None  # absent from manifest.json when there is none
    heads: HeadsRecord | None = None  # absent from manifest.json when there is none
    recipe: dict[str, Any]
    seed: int = 0
    tensors: dict[str, TensorRecord]
    files: dict[ArtifactPath, FileRecord]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for name, t in self.tensors.items():
            if t.file not in self.files:
                raise ValueError(f"tensors.{name}.file: {t.file} is not listed in files (every file is hashed)")
        embed = self.tensors.get("model.embed_tokens.weight")
        if embed is None or len(embed.shape) != 2:
            raise ValueError("tensors: model.embed_tokens.weight (vocab, hidden) is missing or not 2-D")
        for i, layer in enumerate(self.architecture.layers):
            for proj, want in layer.projection_shapes(embed.shape[1]).items():
                name = f"model.layers.{i}.{proj}"
                got = (self.quantization[name].shape if name in self.quantization
                       else self.tensors[f"{name}.weight"].shape if f"{name}.weight" in self.tensors else None)
                if got is not None and tuple(got) != want:
                    raise ValueError(f"architecture.layers.{i}: {name} is {list(want)} (out, in) by these widths, "
                                     f"but its tensor is {list(got)}")
        if self.adapter is not None:
            self._adapter_consistent(self.adapter)
        if self.heads is not None:
            self._heads_consistent(self.heads, embed.shape)
        return self

    def _heads_consistent(self, heads: HeadsRecord, embed: list[int]) -> None:
        """Every head tensor (hidden, hidden) / (hidden,) and the shared lm_head (vocab, hidden), by the embeddings'
        (vocab, hidden), is listed in the heads' folder with the heads' dtype."""
        vocab, hidden = embed
        want = {name: [hidden, hidden] if name.endswith(".weight") else [hidden]
                for name in block_names(heads.num_heads, heads.num_layers)} | {SHARED_LM_HEAD: [vocab, hidden]}
        for name, shape in want.items():
            t = self.tensors.get(name)
            if t is None or t.file.rpartition("/")[0] != heads.path or (t.shape, t.dtype) != (shape, heads.dtype):
                raise ValueError(f"heads: tensors.{name} must be listed in {heads.path}/ with shape {shape} and "
                                 f"dtype {heads.dtype}")

    def _adapter_consistent(self, adapter: AdapterRecord) -> None:
        """Each corrected module's base shape is its layer's, and its A (rank, in) and B (out, rank) are listed in
        the adapter's folder with those shapes and the adapter's dtype."""
        hidden, layers = self.tensors["model.embed_tokens.weight"].shape[1], self.architecture.layers
        for name, m in adapter.modules.items():
            block, _, proj = name.removeprefix("model.layers.").partition(".")
            inside = block.isdigit() and int(block) < len(layers)
            shapes = layers[int(block)].projection_shapes(hidden) if inside else {}
            if tuple(m.shape) != shapes.get(proj):
                raise ValueError(f"adapter.modules.{name}: no projection of shape {m.shape} (out, in) by the layer "
                                 "widths")
            out_f, in_f = m.shape
            for tensor, shape in zip(tensor_names(name), ([m.rank, in_f], [out_f, m.rank]), strict=True):
                t = self.tensors.get(tensor)
                folder = None if t is None else t.file.rpartition("/")[0]
                if t is None or folder != adapter.path or (t.shape, t.dtype) != (shape, adapter.dtype):
                    raise ValueError(f"adapter.modules.{name}: tensors.{tensor} must be listed in {adapter.path}/ "
                                     f"with shape {shape} and dtype {adapter.dtype}")

    @model_serializer(mode="wrap")
    def _adapter_only_when_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No `adapter` key without a correction, no `heads` key without drafter heads: manifests of other artifacts
        stay as they were."""
        data = handler(self)
        for key in ("adapter", "heads"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def dumps(self) -> str:
        """manifest.json's text: the fields in declaration order, indented by 2, newline-terminated."""
        return json.dumps(self.model_dump(), indent=2, default=str) + "\n"


def manifest_errors(err: ValidationError, limit: int = MAX_LISTED) -> list[str]:
    """One line per problem, `<field path>: <what is wrong>`, at most `limit` (a damaged manifest can have
    thousands)."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p != "[key]")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}" if path else msg)  # a whole-manifest check names its fields itself
    more = len(lines) - limit
    return lines[:limit] + ([f"... and {more} more"] if more > 0 else [])
