"""Load an artifact as a torch model (`load`), or check it against its manifest (`verify`).

Kept light: torch, safetensors and transformers (for the stock module classes), nothing from the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from export.format import DTYPES, ArtifactError, CONFIG, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PRUNED_MODEL_TYPE
from export.interop import gptq_to_packed
from export.qlinear import QuantLinear

_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def read_manifest(path: Path) -> tuple[dict | None, list[str]]:
    """(manifest, []) or (None, [why it cannot be read])."""
    if not path.is_dir():
        return None, [f"{path}: no such artifact folder"]
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, [f"{MANIFEST}: missing (not an artifact written by compress?)"]
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{MANIFEST}: not valid JSON ({err})"]
    if manifest.get("format") != FORMAT_NAME:
        return None, [f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}"]
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        return None, [f"{MANIFEST}: format_version {manifest['format_version']} is newer than this runtime's {FORMAT_VERSION}"]
    return manifest, []


def _check(path: Path, manifest: dict, hashes: bool) -> list[str]:
    from export.writer import sha256_file

    problems = []
    files = manifest.get("files", {})
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated or altered)")
        elif hashes and sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file altered)")
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"{rel}: not listed in the manifest")
    by_file: dict[str, dict] = {}
    for name, meta in manifest.get("tensors", {}).items():
        by_file.setdefault(meta["file"], {})[name] = meta
    for fname, expected in by_file.items():
        if any(m.startswith(f"{fname}:") for m in problems):
            continue
        try:
            with safe_open(path / fname, framework="pt") as f:
                found = {k: f.get_slice(k) for k in f.keys()}
                for name, meta in expected.items():
                    if name not in found:
                        problems.append(f"{fname}: tensor {name} missing")
                        continue
                    shape, dtype = list(found[name].get_shape()), found[name].get_dtype()
                    if shape != meta["shape"]:
                        problems.append(f"{fname}: tensor {name} has shape {shape}, manifest says {meta['shape']}")
                    want = _ST_NAMES.get(meta["dtype"], meta["dtype"])
                    if dtype != want:
                        problems.append(f"{fname}: tensor {name} has dtype {dtype}, manifest says {meta['dtype']}")
                for name in sorted(set(found) - set(expected)):
                    problems.append(f"{fname}: tensor {name} not listed in the manifest")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            problems.append(f"{fname}: cannot be read as safetensors ({err})")
    return problems


def verify(path: str | Path) -> list[str]:
    """Every problem with an artifact folder (missing, truncated or altered file, missing or extra tensor); [] if none."""
    path = Path(path)
    manifest, problems = read_manifest(path)
    if manifest is None:
        return problems
    return _check(path, manifest, hashes=True)


def _build_skeleton(config: dict, layers: list[dict], quantization: dict[str, dict]) -> nn.Module:
    """The model with every weight on the meta device and each block's widths as the manifest says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from export.remote.modeling_compress_pruned import PER_LAYER_KEYS, resize_blocks  # imports transformers

    cfg = dict(config)
    cfg.pop("quantization_config", None)  # our loader builds QuantLinear itself, from the manifest
    if cfg.get("model_type") == PRUNED_MODEL_TYPE:
        cfg["model_type"] = cfg["base_model_type"]
        for key in PER_LAYER_KEYS:
            cfg.pop(key, None)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    if len(layers) != len(model.model.layers):
        raise ArtifactError(f"{MANIFEST}: {len(layers)} layers described, config has {len(model.model.layers)}")
    resize_blocks(model.model.layers, layers, hf_config.hidden_size, device="meta")
    for name, scheme in quantization.items():  # packed linears keep their compressed-tensors buffers
        parent_name, short = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, short)
        setattr(parent, short, QuantLinear(old.in_features, old.out_features, scheme["bits"], scheme["group_size"],
                                           scheme["sym"], bias=old.bias is not None, g_idx=not scheme["ordered"],
                                           device="meta"))
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         check_hashes: bool = False) -> nn.Module:
    """A ready-to-run model (eval mode) from an artifact folder; refuses one that does not match its manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest, problems = read_manifest(path)
    if manifest is None or (problems := _check(path, manifest, hashes=check_hashes)):
        raise ArtifactError(f"{path}: " + "; ".join(problems))
    config = json.loads((path / CONFIG).read_text())
    model = _build_skeleton(config, manifest["architecture"]["layers"], manifest.get("quantization", {}))
    state: dict[str, torch.Tensor] = {}
    for fname in sorted({m["file"] for m in manifest["tensors"].values()}):
        state.update(load_file(path / fname))
    for name, scheme in manifest.get("quantization", {}).items():
        if scheme.get("format") == "gptq":
            gptq_to_packed(state, name, scheme)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{path}: tensors missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb  # non-persistent buffers (inv_freq) are computed, not stored
    model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ArtifactError(f"{path}: no values for {left[:5]}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model.to(device=device)
    if dtype is not None:
        _cast(model, dtype)
    return model.eval().requires_grad_(False)


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to `dtype`, except quantization scales: they keep the artifact's dtype
    because the weights are defined as scale * (code - zero) computed in it (see export.kernels.reference)."""
    keep = {id(m.weight_scale) for m in model.modules() if isinstance(m, QuantLinear)}
    # nn.Module._apply is what Module.to uses: it converts tied parameters once and keeps them tied
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() and id(t) not in keep else t)
