"""Model resolution and loading: the packaged default by name, or a local Hugging Face folder of safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from compress.errors import InputError
from compress.models.checks import check_checkpoint, check_dense_source, check_finite
from compress.models.default import DEFAULT_MODELS, packaged_model_path
from compress.models.llama import check_supported

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: the name the recipe used, the local folder, and a human identity."""

    name: str
    path: Path
    identity: str


def read_config(cfg_path: Path) -> object:
    """The parsed config.json (any JSON value; check_supported says what is wrong with it)."""
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise InputError(f"{cfg_path}: not valid JSON: {err}") from None


def resolve_model(name: str) -> ModelSource:
    """A packaged model name or a local folder; checks the config and the checkpoint's headers (a dense source, sane
    sizes, every tensor present with its shape, files undamaged) before any weight is read."""
    if name in DEFAULT_MODELS:
        path, identity = packaged_model_path(name), DEFAULT_MODELS[name]["identity"]
    else:
        path, identity = local_folder(name), None
    cfg_path = path / "config.json"
    config = read_config(cfg_path)
    if isinstance(config, dict):
        check_dense_source(path, config, str(cfg_path))
    config = check_supported(config, str(cfg_path))
    check_checkpoint(path, config)
    return ModelSource(name, path.resolve(), identity or str(config.get("_name_or_path") or path.resolve()))


def local_folder(name: str) -> Path:
    """The local model folder `name`, checked by kind only (a folder with config.json and .safetensors weights,
    no pickle-only checkpoint); reads no file. InputError naming the model."""
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
    return path


def load_model(source: ModelSource, trust_remote_code: bool = False) -> tuple[torch.nn.Module, object]:
    """(model in fp32 eval mode, tokenizer) from a resolved source; safetensors only. Refuses keys transformers
    reports missing, unexpected or misshapen, and NaN or Inf in any weight, naming the tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    cfg_path = source.path / "config.json"
    check_supported(read_config(cfg_path), str(cfg_path))
    loaded = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    # output_loading_info=True returns (model, {"missing_keys": [...], ...}); transformers types the model alone
    model, info = cast(tuple[PreTrainedModel, dict[str, list]], loaded)
    wrong = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if wrong:
        raise InputError(f"{source.path}: transformers reports {wrong} loading the checkpoint")
    model.eval().requires_grad_(False)
    check_finite(model.named_parameters(), str(source.path))
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    return model, tokenizer
