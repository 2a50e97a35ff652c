"""Model resolution and loading: the packaged default by name, or a local Hugging Face folder of safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import InputError
from compress.models.default import DEFAULT_MODELS, packaged_model_path
from compress.models.llama import check_supported

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: the name the recipe used, the local folder, and a human identity."""

    name: str
    path: Path
    identity: str


def resolve_model(name: str) -> ModelSource:
    """A packaged model name or a local folder; checks the folder before any weight is read."""
    if name in DEFAULT_MODELS:
        return ModelSource(name, packaged_model_path(name), DEFAULT_MODELS[name]["identity"])
    path = Path(name).expanduser()
    if not path.is_dir():
        raise InputError(
            f"model {name!r}: no such folder (packaged models: {', '.join(DEFAULT_MODELS)}; "
            "hub downloads are not used, give a local Hugging Face folder)"
        )
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"model {name!r}: {cfg_path} is missing; a Hugging Face model folder has a config.json")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        why = (
            f"it has only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors first"
            if pickles
            else "it has no .safetensors weights"
        )
        raise InputError(f"model {name!r}: refused, {why}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{cfg_path}: not valid JSON: {err}") from None
    check_supported(config, str(cfg_path))
    return ModelSource(name, path.resolve(), str(config.get("_name_or_path") or path.resolve()))


def load_model(source: ModelSource, trust_remote_code: bool = False) -> tuple[torch.nn.Module, object]:
    """(model in fp32 eval mode, tokenizer) from a resolved source; safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_supported(json.loads((source.path / "config.json").read_text()), str(source.path / "config.json"))
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    return model, tokenizer
