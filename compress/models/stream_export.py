"""What a streamed run writes, kept off the heap as it grows with depth (issue 16): each finished block's quantized
records move from the plan to a spill file (`SpilledRecords`), read back one record at a time by the export and the
compressed model's forwards; and the written artifact is read back block by block for the reload check
(`ArtifactBlocks`), as export.load would build it, never whole. Nothing held here grows with the model's depth but
the record names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from calibration.capture import STREAM_ATTR
from compress.errors import CompressError
from compress.models.streaming import BlockDone, BlockSource, owned
from compress.plan import Plan
from export.records import BlockWidths, QuantRecord

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PARTS = ("packed", "scale", "zero", "g_idx")  # a QuantRecord's tensors, stored as "<module>.<part>"


class SpilledRecords(Mapping[str, QuantRecord]):
    """Quantized linears' records on disk, by full module name in record order: `take` moves the plan's records of
    a finished block into one safetensors file in `folder`; each lookup reads one record back (a fresh QuantRecord,
    its scale rounded to `scale_dtype` once that is set, as pipeline._round_to_export rounds it in memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}  # module name -> the file that holds its record
        self.schemes: dict[str, tuple[int, int, bool, tuple[int, int]]] = {}  # bits, group_size, sym, shape
        self.scale_dtype: torch.dtype | None = None

    def take(self, plan: Plan, block: int) -> None:
        """Move every record the plan holds now (those of block `block`, just finished) to a file; none: no file."""
        moving = {name: m for name, m in plan.modules.items() if m.quant is not None}
        if not moving:
            return
        path = self.folder / f"block-{block}-{len(self.files)}.safetensors"
        tensors = {}
        for name, module in moving.items():
            q = module.quant
            assert q is not None
            tensors.update({f"{name}.{part}": getattr(q, part).contiguous() for part in PARTS})
            self.schemes[name] = (q.bits, q.group_size, q.sym, q.shape)
        save_file(tensors, path)
        for name, module in moving.items():
            self.files[name] = path
            module.quant = None  # the plan's copy goes: the file holds it now

    def on_block_done(self, plan: Plan) -> BlockDone:
        """The StreamedModel.on_block_done callback that spills `plan`'s records as each block finishes."""
        return lambda i, _block: self.take(plan, i)

    def __getitem__(self, name: str) -> QuantRecord:
        bits, group_size, sym, shape = self.schemes[name]
        with safe_open(self.files[name], framework="pt") as f:
            parts = {part: owned(f.get_tensor(f"{name}.{part}")) for part in PARTS}
        if self.scale_dtype is not None:
            parts["scale"] = parts["scale"].to(self.scale_dtype)
        return QuantRecord(bits, group_size, sym, shape, **parts)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class SpilledPlan:
    """The plan as export.write reads it (export.write.ArtifactPlan), its quantized records from the spill."""

    plan: Plan
    records: SpilledRecords

    @property
    def widths(self) -> list[BlockWidths]:
        return self.plan.widths

    @property
    def quantized(self) -> SpilledRecords:
        return self.records

    @property
    def adapters(self) -> Mapping:
        return self.plan.adapters

    @property
    def heads(self):  # noqa: ANN201 (the plan's DrafterHeads | None)
        return self.plan.heads

    def to_dict(self) -> dict:
        return self.plan.to_dict()


class ArtifactBlocks(BlockSource):
    """A written artifact folder read back module by module: the skeleton export.load builds (QuantLinear where the
    manifest says packed, on meta), each module's stored tensors read from its shard for its turn and cast to float32
    as export.load(dtype=float32) casts them (scales keep the artifact's dtype). Raises CompressError naming the
    problems when the folder does not match its manifest (names, shapes, dtypes, sizes; not hashes)."""

    def __init__(self, folder: Path) -> None:
        from export.loader import _build_skeleton, check_files, read_manifest

        manifest, problems = read_manifest(folder)
        if manifest is None or (problems := check_files(folder, manifest)):
            raise CompressError(f"{folder}: the written artifact does not match its manifest: {'; '.join(problems)}")
        config = json.loads((folder / "config.json").read_text())
        self.model = cast("PreTrainedModel", _build_skeleton(config, manifest))  # transformers' model class
        self.model.eval().requires_grad_(False)
        backbone = self.model.get_submodule("model")
        rotary = backbone.get_submodule("rotary_emb")
        backbone.rotary_emb = type(rotary)(config=self.model.config)  # its tables are computed, not stored
        self.on_block_done = []
        self.folder = folder
        self.files = {name: folder / record.file for name, record in manifest.tensors.items()}
        self.schemes = {name: s.model_dump() for name, s in manifest.quantization.items() if s.format == "gptq"}
        self.tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.get("tie_word_embeddings") else {}
        setattr(self.model, STREAM_ATTR, self)

    def load(self, module: nn.Module) -> None:
        from export.interop import gptq_to_packed
        from export.loader import _cast

        prefix = self._prefix(module)
        names = [n for n in self.files if n.startswith(prefix)] + [n for n in self.tied if n.startswith(prefix)]
        state = {}
        for name in names:
            source = self.tied.get(name, name)
            with safe_open(self.files[source], framework="pt") as shard:
                state[name.removeprefix(prefix)] = owned(shard.get_tensor(source))
        for name, scheme in self.schemes.items():
            if name.startswith(prefix):
                gptq_to_packed(state, name.removeprefix(prefix), scheme)
        module.load_state_dict(state, strict=True, assign=True)
        _cast(module, torch.float32)
