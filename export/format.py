"""The artifact layout shared by writer and loader.

An artifact folder holds:
  config.json            stock Hugging Face config when the structure is expressible in one, else the
                         `compress_pruned` form (see docs/format.md): base config + per-layer `layers`
  model.safetensors      or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the shard size
  tokenizer files, generation_config.json   copied from the source model
  manifest.json          format version, source identity, per-layer architecture, every tensor's file/dtype/shape,
                         sha256 and size of every other file, recipe, seed, package versions
  recipe.yaml, report.json, plan.json, README.md (model card)
"""

from __future__ import annotations

import torch

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
