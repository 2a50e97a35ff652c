"""Load an artifact as a torch model (`load`), or check it against its manifest (`verify`).

Kept light: torch, safetensors and transformers (for the stock module classes), nothing from the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from export.format import (
    CONFIG,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MAX_DETAIL,
    MAX_LISTED,
    MAX_QUOTED,
    PRUNED_MODEL_TYPE,
    ArtifactError,
    Manifest,
    manifest_errors,
)
from export.interop import gptq_to_packed
from export.kernels.reference import dequantized_dtype
from export.lowrank import LORA_PARTS, LoRALinear, wrap
from export.peft import tensor_names
from export.qlinear import Kernel, QuantLinear, use_kernel
from export.target import links_outside

_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
MAX_MANIFEST_BYTES = 256 * 2**20  # a 70B model's manifest is a few MB; json.loads needs ~10x the file in memory


class _Backbone(Protocol):
    embed_tokens: nn.Embedding
    rotary_emb: nn.Module


class _StockCausalLM(Protocol):
    """The parts of the skeleton (a transformers Llama-family causal LM) that `load` rewires after loading."""

    config: Any  # transformers' PretrainedConfig
    model: _Backbone
    lm_head: nn.Linear


def read_manifest(path: Path) -> tuple[Manifest | None, list[str]]:
    """(manifest, []) or (None, [why it cannot be read]): not a folder, no manifest, not JSON, another format, a
    newer version, or a field of the wrong shape (named), a path that leaves the folder, a tensor whose file is not
    listed, layer widths that disagree with the tensors."""
    path = Path(path)
    if not path.is_dir():
        return None, [f"{path}: no such artifact folder"]
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, [f"{MANIFEST}: missing (not an artifact written by compress?)"]
    if (real := links_outside(mpath, path)) is not None:
        return None, [f"{MANIFEST}: resolves to {real}, outside the artifact folder"]
    if (size := mpath.stat().st_size) > MAX_MANIFEST_BYTES:
        return None, [f"{MANIFEST}: {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}"]
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, [f"{MANIFEST}: not valid JSON ({type(err).__name__}: {str(err)[:MAX_DETAIL]})"]
    if not isinstance(raw, dict):
        return None, [f"{MANIFEST}: a JSON object expected, got {type(raw).__name__}"]
    if raw.get("format") != FORMAT_NAME:
        return None, [f"{MANIFEST}: format is {str(raw.get('format'))[:MAX_QUOTED]!r}, expected {FORMAT_NAME!r}"]
    version = raw.get("format_version")
    if type(version) is not int:
        return None, [f"{MANIFEST}: format_version: {str(version)[:MAX_QUOTED]!r} is not an integer"]
    if version > FORMAT_VERSION:
        return None, [f"{MANIFEST}: format_version {version} is newer than this runtime's {FORMAT_VERSION}"]
    try:
        return Manifest.model_validate(raw), []
    except ValidationError as err:
        return None, [f"{MANIFEST}: {line}" for line in manifest_errors(err)]


def _listed(items: list[str], sep: str = ", ") -> str:
    """`a, b, c` for at most MAX_LISTED items, then how many more."""
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return sep.join(items[:MAX_LISTED]) + more


def _non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN or Inf values of a floating tensor (0 for integer tensors: packed codes, shapes)."""
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def _check(path: Path, manifest: Manifest, hashes: bool) -> list[str]:
    """Problems of the folder against its manifest; with `hashes`, also every file's sha256 and every floating
    tensor's values (NaN or Inf), read one tensor at a time."""
    from export.writer import sha256_file

    problems = []
    files = manifest.files
    for rel, meta in files.items():
        p = path / rel
        if (real := links_outside(p, path)) is not None:
            problems.append(f"{rel}: resolves to {real}, outside the artifact folder")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta.bytes:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {meta.bytes} (truncated or altered)")
        elif hashes and sha256_file(p) != meta.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest (file altered)")
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in files:
            problems.append(f"{rel}: not listed in the manifest")
    by_file: dict[str, dict] = {}
    for name, record in manifest.tensors.items():
        by_file.setdefault(record.file, {})[name] = record
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
                    if shape != meta.shape:
                        problems.append(f"{fname}: tensor {name} has shape {shape}, manifest says {meta.shape}")
                    want = _ST_NAMES.get(meta.dtype, meta.dtype)
                    if dtype != want:
                        problems.append(f"{fname}: tensor {name} has dtype {dtype}, manifest says {meta.dtype}")
                    elif hashes and (bad := _non_finite(f.get_tensor(name))):
                        problems.append(f"{fname}: tensor {name} has {bad} non-finite values (NaN or Inf)")
                for name in sorted(set(found) - set(expected)):
                    problems.append(f"{fname}: tensor {name} not listed in the manifest")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            problems.append(f"{fname}: cannot be read as safetensors ({err})")
    return problems


def check_files(path: Path, manifest: Manifest) -> list[str]:
    """Problems of the folder against its manifest without reading the files' contents (listed, present, sizes,
    tensor names, shapes and dtypes); [] if none."""
    return _check(path, manifest, hashes=False)


def verify(path: str | Path) -> list[str]:
    """Every problem with an artifact folder (a malformed manifest, a path leaving the folder, a missing, truncated or
    altered file, a missing or extra tensor, NaN or Inf values), each naming the field, file or tensor; [] if none."""
    path = Path(path)
    manifest, problems = read_manifest(path)
    if manifest is None:
        return problems
    return _check(path, manifest, hashes=True)


def _build_skeleton(config: dict, manifest: Manifest) -> nn.Module:
    """The model with every weight on the meta device and each block's widths as the manifest says; a config or a
    quantized module name that cannot make one is refused naming config.json or the manifest field."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from export.remote.modeling_compress_pruned import PER_LAYER_KEYS, resize_blocks  # imports transformers

    cfg = dict(config)
    cfg.pop("quantization_config", None)  # our loader builds QuantLinear itself, from the manifest
    model_dtype = DTYPES.get(str(config.get("dtype")))  # what compressed-tensors weights are rounded to
    if cfg.get("model_type") == PRUNED_MODEL_TYPE:
        cfg["model_type"] = cfg.get("base_model_type")
        for key in PER_LAYER_KEYS:
            cfg.pop(key, None)
    model_type = cfg.pop("model_type", None)
    cfg.pop("architectures", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = f"{type(err).__name__}: {str(err)[:MAX_DETAIL]}"
        raise ArtifactError(f"{CONFIG}: cannot build a model from it ({detail})") from None
    layers = manifest.architecture.layers
    if len(layers) != len(model.model.layers):
        raise ArtifactError(f"{MANIFEST}: {len(layers)} layers described, config has {len(model.model.layers)}")
    resize_blocks(model.model.layers, [layer.model_dump() for layer in layers], hf_config.hidden_size, device="meta")
    for name, scheme in manifest.quantization.items():  # packed linears keep their compressed-tensors buffers
        parent_name, _, short = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        old = getattr(parent, short, None)
        if not isinstance(old, nn.Linear):
            raise ArtifactError(f"{MANIFEST}: quantization.{name}: the model has no linear layer of that name")
        if [old.out_features, old.in_features] != scheme.shape:
            raise ArtifactError(f"{MANIFEST}: quantization.{name}.shape: {scheme.shape}, but the model's layer is "
                                f"{[old.out_features, old.in_features]} (out, in)")
        setattr(parent, short, QuantLinear(old.in_features, old.out_features, scheme.bits, scheme.group_size,
                                           scheme.sym, bias=old.bias is not None, g_idx=not scheme.ordered,
                                           device="meta",
                                           weight_dtype=dequantized_dtype(scheme.format, model_dtype)))
    if manifest.adapter is not None:  # LoRALinear around each corrected linear, its A and B still to load
        modules = manifest.adapter.modules
        try:
            wrap(model, list(modules), {n: torch.empty(m.rank, m.shape[1], device="meta") for n, m in modules.items()},
                 {n: torch.empty(m.shape[0], m.rank, device="meta") for n, m in modules.items()})
        except (ValueError, AttributeError) as err:
            raise ArtifactError(f"{MANIFEST}: adapter.modules: {str(err)[:MAX_DETAIL]}") from None
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         check_hashes: bool = False, kernel: Kernel = "reference") -> nn.Module:
    """A ready-to-run model (eval mode) from an artifact folder; refuses one that does not match its manifest, and
    one with NaN or Inf in any floating tensor (named). `kernel` computes the quantized linears: "reference" (the
    oracle), "cpu" (torch's int4 kernel, bfloat16), "auto" (the fastest for the device); see QuantLinear.use_kernel."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest, problems = read_manifest(path)
    if manifest is None or (problems := _check(path, manifest, hashes=check_hashes)):
        raise ArtifactError(f"{path}: " + "; ".join(problems))
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as err:
        raise ArtifactError(f"{path}: {CONFIG}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: {CONFIG}: a JSON object expected, got {type(config).__name__}")
    try:
        model = _build_skeleton(config, manifest)
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    state: dict[str, torch.Tensor] = {}
    adapter = _adapter_names(manifest)  # PEFT name -> the name LoRALinear loads
    heads_folder = None if manifest.heads is None else f"{manifest.heads.path}/"  # read by export.medusa.load_heads
    for fname in sorted({m.file for m in manifest.tensors.values()}):
        if heads_folder is not None and fname.startswith(heads_folder):
            continue
        state.update({adapter.get(k, k): t for k, t in load_file(path / fname).items()})
    bad = {name: n for name, t in state.items() if (n := _non_finite(t))}
    if bad:
        raise ArtifactError(f"{path}: non-finite values (NaN or Inf) in {len(bad)} tensor(s): "
                            + _listed([f"{k} ({n})" for k, n in bad.items()]))
    for name, scheme in manifest.quantization.items():
        if scheme.format == "gptq":
            try:
                gptq_to_packed(state, name, scheme.model_dump())
            except KeyError as err:
                raise ArtifactError(f"{path}: quantization.{name}: GPTQ tensor {err} missing") from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shapes that disagree with the skeleton; torch names one tensor a line after a title
        lines = str(err).splitlines() or [type(err).__name__]
        raise ArtifactError(f"{path}: {lines[0]} " + _listed([line.strip() for line in lines[1:]], "; ")) from None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{path}: tensors missing: {_listed(missing) or 'none'}; unexpected: "
                            f"{_listed(result.unexpected_keys) or 'none'}")
    stock = cast(_StockCausalLM, model)
    if tied:
        stock.lm_head.weight = stock.model.embed_tokens.weight
    rotary = stock.model.rotary_emb  # non-persistent buffers (inv_freq) are computed, not stored
    stock.model.rotary_emb = type(rotary)(config=stock.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ArtifactError(f"{path}: no values for {_listed(left)}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model.to(device=device)
    if dtype is None and adapter and (model_dtype := DTYPES.get(str(config.get("dtype")))):
        _cast_adapters(model, model_dtype)  # 16-bit corrections compute in the model's dtype, as the pipeline did
    if dtype is not None:
        _cast(model, dtype)
    use_kernel(model, kernel)
    return model.eval().requires_grad_(False)


def _adapter_names(manifest: Manifest) -> dict[str, str]:
    """{name in the PEFT adapter file: name LoRALinear loads (`<module>.lora_A.weight`)} for every corrected module."""
    if manifest.adapter is None:
        return {}
    return {peft: f"{module}.{part}.weight" for module in manifest.adapter.modules
            for part, peft in zip(LORA_PARTS, tensor_names(module), strict=True)}


def _cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """A and B of every LoRALinear to `dtype` (exact from the 16 bits they are stored in)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.to(dtype)
            m.lora_B.to(dtype)


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to `dtype`, except quantization scales: they keep the artifact's dtype
    because the weights are defined as scale * (code - zero) computed in it (see export.kernels.reference)."""
    keep = {id(m.weight_scale) for m in model.modules() if isinstance(m, QuantLinear)}
    # nn.Module._apply is what Module.to uses: it converts tied parameters once and keeps them tied
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() and id(t) not in keep else t)
