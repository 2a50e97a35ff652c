"""export.write: the one entry point that turns a compressed model's tensors, its plan and its report into an
artifact folder. Everything that decides what lands on disk is here: the config (stock where the structure allows),
packed quantized tensors, tied embeddings, zero biases a stock config implies, the compressed-tensors / GPTQ /
block_configs / remote-code views, the manifest, the report and the model card, and the atomic commit."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from export import medusa
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
from export.kernels.reference import dequantized_dtype
from export.lowrank import LORA_PARTS
from export.peft import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, peft_config, peft_tensors
from export.records import BlockWidths, QuantRecord
from export.target import check_apart, check_target, recover_leftovers
from export.writer import ArtifactWriter, source_files

QuantFormat = Literal["compressed-tensors", "gptq"]
LM_HEAD = "lm_head"  # the output projection's module name in the Llama family
BLOCK_MODULE = re.compile(r"model\.layers\.(\d+)\.")  # a module of decoder block i


class UnwritableError(ValueError):
    """The model cannot be stored in the format the recipe asks for; the message names the field and why."""


class LowRankRecord(Protocol):
    """A low-rank correction y += B A x: A (rank, in), B (out, rank)."""

    @property
    def A(self) -> torch.Tensor: ...

    @property
    def B(self) -> torch.Tensor: ...


class HeadsPlan(Protocol):
    """Medusa drafter heads: their tensors by export.medusa.block_names, and how many heads of how many layers."""

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def num_layers(self) -> int: ...


class ArtifactPlan(Protocol):
    """What export reads of the plan: each block's widths, each quantized linear's record, each corrected linear's
    low-rank pair, the drafter heads (None: none), and the plan's own informational form (plan.json)."""

    @property
    def widths(self) -> list[BlockWidths]: ...

    @property
    def quantized(self) -> Mapping[str, QuantRecord]: ...

    @property
    def adapters(self) -> Mapping[str, LowRankRecord]: ...

    @property
    def heads(self) -> HeadsPlan | None: ...

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
        """The dtype quantization scales are stored in: 16 bits, as the formats' kernels read them (Marlin,
        exllama, compressed-tensors' own) and as bits-per-weight figures count them. GPTQ stores float16; compressed-
        tensors the export dtype when it is 16-bit, else float16 (a float32 export keeps float32 weights, not scales:
        a scale's float16 rounding, 2^-11 relative, is far below the quantization step it scales)."""
        if self.quant_format == "gptq" or self.dtype not in (torch.float16, torch.bfloat16):
            return torch.float16
        return self.dtype

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype low-rank corrections are stored in: the export dtype when it is 16-bit, else float16 (the
        adapter counts in the artifact's bytes, and its values, products of small factors, sit well inside float16's
        range)."""
        return self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16

    @property
    def dequantized_dtype(self) -> torch.dtype:
        """What a quantized weight is rounded to (export.kernels.reference.dequantized_dtype)."""
        return dequantized_dtype(self.quant_format, self.dtype) or self.dtype


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
    """Bytes of the *.safetensors files in a folder and in its adapter/ folder (a low-rank correction's tensors)."""
    path = Path(path)
    return sum(p.stat().st_size for p in [*path.glob("*.safetensors"), *path.glob(f"{ADAPTER_DIR}/*.safetensors")])


def write(out: Path, tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], plan: ArtifactPlan, report: dict,
          provenance: Provenance, settings: ExportSettings, *, check: Callable[[Path], dict],
          card: Callable[[dict], str], overwrite: bool = False) -> list[str]:
    """Write the artifact to `out` atomically; returns notes on what the commit could not tidy.

    tensors: the model's tensors module by module, (module name, {full tensor name: tensor}), in state-dict order.
    report: completed in place with what export decided (stock config or why not, views, export dtype, stored bits
    per weight, weights bytes, the adapter) and with what `check` returns; written as report.json, and as the model
    card by `card(report)`. check: runs on the complete temporary folder before anything is committed (the pipeline
    reloads it and compares); it raises to abort, leaving nothing behind.
    Raises UnwritableError when the asked quantization format cannot store the model, ArtifactExistsError when
    `out` may not be written."""
    layers = [w.to_dict() for w in plan.widths]
    schemes = {n: {**q.scheme(), "format": settings.quant_format} for n, q in plan.quantized.items()}
    config, layers, why_not_stock = artifact_config(provenance.config, layers, schemes, settings.quant_format)
    if settings.quant_format == "gptq" and why_not_stock:
        raise UnwritableError(f"export.quant_format: gptq cannot store this model: {why_not_stock}")
    config["dtype"] = str(settings.dtype).removeprefix("torch.")
    views = _non_uniform_views(config, layers, why_not_stock, settings.remote_code)
    bits = _BitsTally()
    lm_head: dict[str, torch.Tensor] = {}  # the lm_head's weight as it streams by, for the drafter folder
    if plan.heads is not None:
        tensors = _keeping(tensors, LM_HEAD, lm_head)
    report.update({"stock_config": why_not_stock is None, "stock_config_reason": why_not_stock or "", **views,
                   "export_dtype": str(settings.dtype).removeprefix("torch."), "bits_per_weight": None})
    with ArtifactWriter(out, overwrite=overwrite) as w:
        w.write_json("config.json", config)
        if views["remote_code"]:
            w.write_text(REMOTE_CODE_FILE, remote_code_source())
        w.write_weights(_stored_tensors(tensors, plan, layers, provenance.config, settings, bits),
                        settings.shard_bytes)
        adapter = _write_adapter(w, plan, settings, bits, out)
        report["bits_per_weight"] = bits.summary()
        if adapter is not None:
            report["adapter"] = adapter.pop("report")
        heads = _write_heads(w, plan.heads, lm_head.get(f"{LM_HEAD}.weight"), settings.dtype)
        if heads is not None:
            report["heads"] = heads.pop("report")
        w.copy_tokenizer(provenance.folder)
        w.write_text("recipe.yaml", provenance.recipe_yaml)
        w.write_json("plan.json", plan.to_dict())
        w.write_manifest(source=provenance.source,
                         architecture={"base_model_type": provenance.config["model_type"], "layers": layers},
                         quantization=schemes, recipe=provenance.recipe, seed=provenance.seed,
                         **({} if adapter is None else {"adapter": adapter}),
                         **({} if heads is None else {"heads": heads}))
        report.update(check(w.tmp))
        report["weights_bytes"] = {"dense": weights_bytes(provenance.folder), "compressed": weights_bytes(w.tmp)}
        w.write_json("report.json", report)
        w.write_text("README.md", card(report))
        w.write_manifest()
        w.commit()
    return w.notes


def _stored_tensors(tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], plan: ArtifactPlan, layers: list[dict],
                    config: dict, settings: ExportSettings, bits: _BitsTally) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors as stored, one at a time, holding no more than the module that arrives; in this order: plain ones
    in the export dtype as the modules arrive (quantized weights left out, lm_head left out when tied to the
    embeddings), then each quantized linear's packed parts in plan order (counted in `bits`), then zero biases where
    the written config implies a bias the model does not have.

    Modules must arrive in plan order: block by block, quantized linears in the order the plan records them, each
    module once, a quantized one with its weight. Raises ValueError naming the module otherwise, and naming a bias
    that the plan does not record. The low-rank parts of a corrected linear (`<module>.lora_A`, as LoRALinear
    names them) are not stored here: the adapter folder holds the plan's."""
    quantized = plan.quantized
    corrections = {f"{name}.{part}" for name in plan.adapters for part in LORA_PARTS}
    arrival = _Arrival(list(quantized))
    tied = config.get("tie_word_embeddings", False)
    stored: set[str] = set()
    for module, parts in tensors:
        if module in corrections:
            continue
        arrival.check(module, parts)
        for key, t in parts.items():
            if (module in quantized and key == f"{module}.weight") or (tied and key == "lm_head.weight"):
                continue
            stored.add(key)
            yield key, t.to(settings.dtype)
    arrival.check_complete()
    for name, q in quantized.items():
        packed = (gptq_tensors(name, q) if settings.quant_format == "gptq"
                  else quantized_tensors(name, q, settings.scale_dtype))
        bits.add(q, {k.removeprefix(f"{name}."): t for k, t in packed.items() if not k.endswith(".weight_shape")})
        yield from packed.items()
    hidden = config["hidden_size"]
    for i, (widths, layer) in enumerate(zip(plan.widths, layers, strict=True)):
        for name, out_features in widths.out_features(hidden).items():
            key = f"model.layers.{i}.{'self_attn' if name in ATTN else 'mlp'}.{name}.bias"
            if key in stored and name not in widths.bias:
                raise ValueError(f"{key}: a bias that the plan does not record (block {i} biases: {widths.bias})")
            if name in layer["bias"] and key not in stored:
                yield key, torch.zeros(out_features, dtype=settings.dtype)


def _write_adapter(w: ArtifactWriter, plan: ArtifactPlan, settings: ExportSettings, bits: _BitsTally,
                   out: Path) -> dict | None:
    """The plan's low-rank corrections as the PEFT adapter folder (export/peft.py), in settings.adapter_dtype,
    counted in `bits` on quantized linears; returns the manifest's adapter record with a `report` entry for
    report.json (popped by the caller), or None when the plan has none."""
    if not plan.adapters:
        return None
    dtype = settings.adapter_dtype
    pairs = {name: (a.A, a.B) for name, a in plan.adapters.items()}
    modules: dict[str, dict] = {}
    ranks: dict[str, int] = {}
    for name, (A, B) in pairs.items():
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}: a low-rank correction needs A (rank, in) and B (out, rank), got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        ranks[name] = A.shape[0]
        modules[name] = {"rank": A.shape[0], "shape": [B.shape[0], A.shape[1]]}
        if name in plan.quantized:
            bits.add_adapter(A.numel() + B.numel(), dtype)
    stored = w.write_tensors(ADAPTER_WEIGHTS, peft_tensors(pairs, dtype))
    w.write_json(ADAPTER_CONFIG, peft_config(ranks, str(Path(out).resolve())))
    dtype_name = str(dtype).removeprefix("torch.")
    return {"format": "peft-lora", "path": ADAPTER_DIR, "dtype": dtype_name, "modules": modules,
            "report": {"path": ADAPTER_DIR, "format": "peft-lora", "dtype": dtype_name, "modules": len(modules),
                       "ranks": sorted(set(ranks.values())),
                       "parameters": sum(A.numel() + B.numel() for A, B in pairs.values()), "bytes": stored}}


def _keeping(tensors: Iterable[tuple[str, dict[str, torch.Tensor]]], module: str, kept: dict[str, torch.Tensor]
             ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The stream as it is, with the tensors of `module` also put in `kept` (references, no copy)."""
    for name, parts in tensors:
        if name == module:
            kept.update(parts)
        yield name, parts


def _write_heads(w: ArtifactWriter, heads: HeadsPlan | None, lm_head: torch.Tensor | None,
                 dtype: torch.dtype) -> dict | None:
    """The drafter heads as the vLLM Medusa folder (export/medusa.py), in the export `dtype`, with a copy of the
    model's lm_head (vocab, hidden); returns the manifest's heads record with a `report` entry for report.json
    (popped by the caller), or None when the plan has none. Raises ValueError when the lm_head never arrived."""
    if heads is None:
        return None
    if lm_head is None:
        raise ValueError(f"drafter heads: the model's tensors hold no {LM_HEAD}.weight for the heads to share")
    names = medusa.block_names(heads.num_heads, heads.num_layers)
    if sorted(heads.tensors) != sorted(names):
        raise ValueError(f"drafter heads: tensors {sorted(heads.tensors)[:4]}..., expected {names[:4]}... "
                         f"({heads.num_heads} heads of {heads.num_layers} layers)")
    tensors = medusa.drafter_tensors(dict(heads.tensors), lm_head, dtype)
    stored = w.write_tensors(medusa.DRAFTER_WEIGHTS, tensors)
    dtype_name = str(dtype).removeprefix("torch.")
    vocab, hidden = lm_head.shape
    w.write_json(medusa.DRAFTER_CONFIG, medusa.drafter_config(hidden, vocab, heads.num_heads, heads.num_layers,
                                                              dtype_name))
    record = {"format": "vllm-medusa", "path": medusa.DRAFTER_DIR, "dtype": dtype_name, "num_heads": heads.num_heads,
              "num_layers": heads.num_layers}
    return {**record, "report": {**record, "parameters": sum(t.numel() for t in heads.tensors.values()),
                                 "bytes": stored}}


class _Arrival:
    """Checks that modules arrive in plan order: block indices (model.layers.<i>.) never go back, quantized linears
    come in the plan's order, each with its weight, and no module comes twice."""

    def __init__(self, quantized: list[str]):
        self.quantized = {name: k for k, name in enumerate(quantized)}
        self.seen: set[str] = set()
        self.last: str | None = None  # the module before
        self.block = -1  # the highest block index so far
        self.next_quantized = 0  # plan index of the quantized linear expected next

    def check(self, module: str, parts: Mapping[str, torch.Tensor]) -> None:
        """Refuse `module` (ValueError naming it) when it breaks the plan order or lacks a quantized weight."""
        after = f" (after {self.last})" if self.last else ""
        if module in self.seen:
            raise ValueError(f"{module}: its tensors arrive twice{after}; each module's tensors must come together")
        block = _block_index(module)
        if block is not None and block < self.block:
            raise ValueError(f"{module}: block {block} arrives after block {self.block}{after}; modules must arrive "
                             "in plan order, block by block")
        if module in self.quantized:
            k = self.quantized[module]
            if k != self.next_quantized:
                expected = list(self.quantized)[self.next_quantized]
                raise ValueError(f"{module}: arrives out of plan order; the plan records {expected} next{after}")
            if f"{module}.weight" not in parts:
                raise ValueError(f"{module}: quantized in the plan, but its tensors hold no {module}.weight "
                                 f"(they hold {sorted(parts)})")
            self.next_quantized += 1
        self.seen.add(module)
        self.last = module
        self.block = max(self.block, -1 if block is None else block)

    def check_complete(self) -> None:
        """Refuse a stream that ended before every quantized linear arrived (ValueError naming them)."""
        missing = [n for n in self.quantized if n not in self.seen]
        if missing:
            raise ValueError(f"{missing[0]}: quantized in the plan, but the tensors ended before it arrived "
                             f"({len(missing)} quantized modules missing)")


def _block_index(module: str) -> int | None:
    """i of a module inside decoder block i (model.layers.<i>.*), None outside the blocks."""
    match = BLOCK_MODULE.match(module)
    return None if match is None else int(match.group(1))


class _BitsTally:
    """Bits per quantized weight, counted one quantized linear at a time as its packed parts are stored."""

    def __init__(self) -> None:
        self.weights = self.stored = self.theory = self.adapter = 0

    def add(self, q: QuantRecord, parts: Mapping[str, torch.Tensor]) -> None:
        """Count one linear; parts: its stored tensors by short name (weight_packed or qweight, ...), without the
        weight_shape."""
        out_f, in_f = q.shape
        self.weights += out_f * in_f
        self.stored += sum(t.numel() * t.element_size() * 8 for t in parts.values())
        g = in_f if q.group_size == -1 else q.group_size
        scale = parts.get("weight_scale", parts.get("scales"))
        assert scale is not None, parts.keys()
        zeros_stored = "qzeros" in parts or not q.sym
        g_idx_stored = "g_idx" in parts or not q.ordered_groups
        per_group = scale.element_size() * 8 + (q.bits if zeros_stored else 0)  # a scale, and a zero point if stored
        self.theory += out_f * in_f * q.bits + out_f * (in_f // g) * per_group
        self.theory += 32 * in_f if g_idx_stored else 0

    def add_adapter(self, numbers: int, dtype: torch.dtype) -> None:
        """Count the low-rank correction of a quantized linear: `numbers` values (A and B) stored in `dtype`."""
        extra = numbers * torch.finfo(dtype).bits
        self.stored += extra
        self.theory += extra
        self.adapter += extra

    def summary(self) -> dict | None:
        """{stored, theory: bits per weight, low-rank corrections included; quantized_weights: count; adapter: the
        corrections' share of stored, only when there are any}, or None when nothing was quantized."""
        if not self.weights:
            return None
        return {"stored": round(self.stored / self.weights, 4), "theory": round(self.theory / self.weights, 4),
                "quantized_weights": self.weights,
                **({"adapter": round(self.adapter / self.weights, 4)} if self.adapter else {})}


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
