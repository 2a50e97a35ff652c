"""export.write: the one entry point that turns a compressed model's tensors, its plan and its report into an
artifact folder. Everything that decides what lands on disk is here: the config (stock where the structure allows),
packed quantized tensors, tied embeddings, zero biases a stock config implies, the compressed-tensors / GPTQ /
block_configs / remote-code views, the manifest, the report and the model card, and the atomic commit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from export.format import ATTN
from export.interop import (
    REMOTE_CODE_FILE,
    artifact_config,
    block_configs,
    gptq_tensors,
    quantized_tensors,
    remote_code_auto_map,
    remote_code_source,
)
from export.records import BlockWidths, QuantRecord
from export.target import check_apart, check_target, recover_leftovers
from export.writer import ArtifactWriter, source_files

QuantFormat = Literal["compressed-tensors", "gptq"]


class UnwritableError(ValueError):
    """The model cannot be stored in the format the recipe asks for; the message names the field and why."""


class ArtifactPlan(Protocol):
    """What export reads of the plan: each block's widths, each quantized linear's record, and the plan's own
    informational form (plan.json)."""

    @property
    def widths(self) -> list[BlockWidths]: ...

    @property
    def quantized(self) -> Mapping[str, QuantRecord]: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class ExportSettings:
    """How the artifact stores weights: dtype of plain weights and scales, quantization format, shard size (bytes),
    and whether to ship the remote-code modeling file for per-layer widths."""

    dtype: torch.dtype
    quant_format: QuantFormat = "compressed-tensors"
    shard_bytes: int = 2000 * 2**20
    remote_code: bool = False

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype quantization scales are stored in (the GPTQ format stores fp16 scales)."""
        return torch.float16 if self.quant_format == "gptq" else self.dtype


@dataclass(frozen=True)
class Provenance:
    """Where the model came from and how it was made: the source folder (tokenizer files are copied from it), its
    manifest record (name, identity, path, sha256 of its weight files), its config (config.json as a dict), and the
    recipe (as data, as YAML text, and its seed)."""

    folder: Path
    source: dict
    config: dict
    recipe: dict
    recipe_yaml: str
    seed: int


def check_out(out: Path, overwrite: bool, say: Callable[[str], None]) -> None:
    """Before any work: repair what interrupted runs left beside `out`, passing `say` a note on each thing done,
    then refuse an `out` that must not be written (TargetError naming why)."""
    for message in recover_leftovers(out):
        say(f"note: {message}")
    check_target(out, overwrite)


def check_source(out: Path, source: Path) -> None:
    """The artifact never lands in, on or around the model folder it is made from, and copies nothing from outside
    it (TargetError naming the file)."""
    check_apart(out, source, "the source model folder")
    source_files(source)


def weights_bytes(path: Path) -> int:
    """Bytes of the *.safetensors files in a folder."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def write(out: Path, tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], plan: ArtifactPlan, report: dict,
          provenance: Provenance, settings: ExportSettings, *, check: Callable[[Path], dict],
          card: Callable[[dict], str], overwrite: bool = False) -> list[str]:
    """Write the artifact to `out` atomically; returns notes on what the commit could not tidy.

    tensors: the model's tensors module by module, (module name, {full tensor name: tensor}), in state-dict order.
    report: completed in place with what export decided (stock config or why not, views, export dtype, stored bits
    per weight, weights bytes) and with what `check` returns; written as report.json, and as the model card by
    `card(report)`. check: runs on the complete temporary folder before anything is committed (the pipeline reloads
    it and compares); it raises to abort, leaving nothing behind.
    Raises UnwritableError when the asked quantization format cannot store the model, ArtifactExistsError when
    `out` may not be written."""
    layers = [w.to_dict() for w in plan.widths]
    schemes = {n: {**q.scheme(), "format": settings.quant_format} for n, q in plan.quantized.items()}
    config, layers, why_not_stock = artifact_config(provenance.config, layers, schemes, settings.quant_format)
    if settings.quant_format == "gptq" and why_not_stock:
        raise UnwritableError(f"export.quant_format: gptq cannot store this model: {why_not_stock}")
    config["dtype"] = str(settings.dtype).removeprefix("torch.")
    views = _non_uniform_views(config, layers, why_not_stock, settings.remote_code)
    state = _stored_tensors(tensors, plan, layers, provenance.config, settings)
    report.update({"stock_config": why_not_stock is None, "stock_config_reason": why_not_stock or "", **views,
                   "export_dtype": str(settings.dtype).removeprefix("torch."),
                   "bits_per_weight": stored_bits(state, plan.quantized)})
    with ArtifactWriter(out, overwrite=overwrite) as w:
        w.write_json("config.json", config)
        if views["remote_code"]:
            w.write_text(REMOTE_CODE_FILE, remote_code_source())
        w.write_weights(state, settings.shard_bytes)
        del state
        w.copy_tokenizer(provenance.folder)
        w.write_text("recipe.yaml", provenance.recipe_yaml)
        w.write_json("plan.json", plan.to_dict())
        w.write_manifest(source=provenance.source,
                         architecture={"base_model_type": provenance.config["model_type"], "layers": layers},
                         quantization=schemes, recipe=provenance.recipe, seed=provenance.seed)
        report.update(check(w.tmp))
        report["weights_bytes"] = {"dense": weights_bytes(provenance.folder), "compressed": weights_bytes(w.tmp)}
        w.write_json("report.json", report)
        w.write_text("README.md", card(report))
        w.write_manifest()
        w.commit()
    return w.notes


def _stored_tensors(tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], plan: ArtifactPlan, layers: list[dict],
                    config: dict, settings: ExportSettings) -> dict[str, torch.Tensor]:
    """The tensors as stored, in this order: plain ones in the export dtype (quantized weights left out, lm_head
    left out when tied to the embeddings), then each quantized linear's packed parts in plan order, then zero biases
    where the written config implies a bias the model does not have."""
    quantized = plan.quantized
    state: dict[str, torch.Tensor] = {}
    seen = set()
    for module, parts in tensors:
        for key, t in parts.items():
            if module in quantized and key == f"{module}.weight":
                seen.add(module)
                continue
            state[key] = t.to(settings.dtype)
    missing = [n for n in quantized if n not in seen]
    if missing:
        raise ValueError(f"quantized modules without a weight among the tensors: {missing[:3]}")
    for name, q in quantized.items():
        state.update(gptq_tensors(name, q) if settings.quant_format == "gptq"
                     else quantized_tensors(name, q, settings.dtype))
    if config.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    hidden = config["hidden_size"]
    for i, (widths, layer) in enumerate(zip(plan.widths, layers, strict=True)):
        for name, out_features in widths.out_features(hidden).items():
            key = f"model.layers.{i}.{'self_attn' if name in ATTN else 'mlp'}.{name}.bias"
            if key in state and name not in widths.bias:
                raise ValueError(f"{key}: a bias that the plan does not record (block {i} biases: {widths.bias})")
            if name in layer["bias"] and key not in state:
                state[key] = torch.zeros(out_features, dtype=settings.dtype)
    return state


def stored_bits(state: dict[str, torch.Tensor], quantized: Mapping[str, QuantRecord]) -> dict | None:
    """Bits per quantized weight as stored (codes, scales, zero points, group index) and as theory predicts."""
    if not quantized:
        return None
    n = stored = theory = 0
    for name, q in quantized.items():
        out_f, in_f = q.shape
        n += out_f * in_f
        parts = {k.removeprefix(f"{name}."): t for k, t in state.items()
                 if k.startswith(f"{name}.") and not k.endswith((".bias", ".weight_shape"))}
        stored += sum(t.numel() * t.element_size() * 8 for t in parts.values())
        g = in_f if q.group_size == -1 else q.group_size
        scale = parts.get("weight_scale", parts.get("scales"))
        assert scale is not None, name
        zeros_stored = "qzeros" in parts or not q.sym
        g_idx_stored = "g_idx" in parts or not q.ordered_groups
        per_group = scale.element_size() * 8 + (q.bits if zeros_stored else 0)  # a scale, and a zero point if stored
        theory += out_f * in_f * q.bits + out_f * (in_f // g) * per_group
        theory += 32 * in_f if g_idx_stored else 0
    return {"stored": round(stored / n, 4), "theory": round(theory / n, 4), "quantized_weights": n}


def _non_uniform_views(config: dict, layers: list[dict], why_not_stock: str | None, remote_code: bool) -> dict:
    """For a per-layer (non-stock) config, add in place the nemotron-nas `block_configs` view when the structure is
    expressible in it, and the remote-code `auto_map` when asked; return what the report says about both."""
    if why_not_stock is None:
        return {"block_configs": "not needed: stock config", "remote_code": False}
    views: dict = {}
    blocks, why = block_configs(config, layers)
    if blocks is not None:
        config["block_configs"] = blocks
        views["block_configs"] = "written (nemotron-nas / DeciLM per-block view in config.json)"
    else:
        views["block_configs"] = f"not written: {why}"
    if remote_code:
        config["auto_map"] = remote_code_auto_map()
    views["remote_code"] = remote_code
    return views
