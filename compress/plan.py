"""Plan: the single record of what each pass decided, per block and per module; passes write it, export reads it
(through export.write's ArtifactPlan: each block's widths, each quantized linear's record), and nothing downstream
infers a decision again from module shapes or tensor names.

Per block: its widths as the passes left them, and what each pruning pass kept (key-value groups, MLP channels,
indices into the widths before that pass). Per module (full name, `model.layers.3.mlp.up_proj`): its quantization
record and its low-rank correction. Per model: the drafter heads (compress/passes/medusa.py), or None."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.models import llama
from export.records import BlockWidths, QuantRecord


def widths_of(shape: llama.BlockShape) -> BlockWidths:
    """The adapter's block shape as the plan's widths."""
    return BlockWidths(shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, shape.intermediate_size,
                       shape.bias)


@dataclass
class Structure:
    """What one pruning pass kept of one block: sorted indices into the block's key-value groups and MLP channels
    before that pass (None: that part left whole), whether removed parts were compensated by a bias, and how the
    kept weights were refit (None: kept as they were)."""

    kept_kv_groups: list[int] | None = None
    kept_mlp_channels: list[int] | None = None
    compensated: bool = False
    refit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kept_kv_groups is not None:
            out["kept_kv_groups"] = self.kept_kv_groups
        if self.kept_mlp_channels is not None:
            out["kept_mlp_channels"] = self.kept_mlp_channels
        out["compensated"] = self.compensated
        if self.refit is not None:
            out["refit"] = self.refit
        return out


@dataclass
class LowRank:
    """A low-rank correction of one linear, y += B @ (A @ x): A (rank, in), B (out, rank)."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass
class DrafterHeads:
    """Medusa drafter heads over the final hidden states (export.medusa.MedusaHeads, filled by the medusa pass):
    their tensors by vLLM's names, blocks.{h}.layers.{l}.weight (hidden, hidden) and .bias (hidden,), float32 on the
    CPU; `num_heads` heads of `num_layers` residual layers each."""

    tensors: dict[str, torch.Tensor]
    num_heads: int
    num_layers: int


@dataclass
class ModulePlan:
    """What the passes decided for one linear."""

    quant: QuantRecord | None = None
    adapter: LowRank | None = None


@dataclass
class BlockPlan:
    """One decoder block: its widths now, and what each pruning pass kept, in pass order."""

    widths: BlockWidths
    pruned: list[Structure] = field(default_factory=list)


@dataclass
class Plan:
    """Every decision of a run: per block (widths, structure), per module (quantization, correction), drafter
    heads, and the passes in order."""

    blocks: dict[int, BlockPlan] = field(default_factory=dict)
    modules: dict[str, ModulePlan] = field(default_factory=dict)  # full module name -> decisions, in record order
    heads: DrafterHeads | None = None
    passes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> Plan:
        """A plan that starts from the model's widths as loaded."""
        return cls(blocks={i: BlockPlan(widths_of(llama.block_shape(b))) for i, b in enumerate(llama.blocks(model))})

    def prune(self, layer: int, before: BlockWidths, structure: Structure, biased: tuple[str, ...] = ()) -> BlockWidths:
        """Record what a pruning pass kept of block `layer` (whose widths it found to be `before`) and the
        projections it gave a bias (`biased`); returns the block's widths after."""
        block = self.blocks.setdefault(layer, BlockPlan(before))
        if block.widths != before:
            raise ValueError(f"plan: block {layer} is {block.widths} in the plan, but the pass found {before}")
        kv = before.num_key_value_heads if structure.kept_kv_groups is None else len(structure.kept_kv_groups)
        inter = before.intermediate_size if structure.kept_mlp_channels is None else len(structure.kept_mlp_channels)
        block.widths = BlockWidths(kv * before.group_size, kv, before.head_dim, inter, before.bias).with_bias(*biased)
        block.pruned.append(structure)
        return block.widths

    def quantize(self, name: str, record: QuantRecord) -> None:
        """Record the quantization of linear `name` (full module name)."""
        self.modules.setdefault(name, ModulePlan()).quant = record

    def correct(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Record the low-rank correction of linear `name`: A (rank, in), B (out, rank)."""
        self.modules.setdefault(name, ModulePlan()).adapter = LowRank(A, B)

    @property
    def adapters(self) -> dict[str, LowRank]:
        """Low-rank corrections by full module name, in the order they were recorded."""
        return {n: m.adapter for n, m in self.modules.items() if m.adapter is not None}

    @property
    def quantized(self) -> dict[str, QuantRecord]:
        """Quantized linears by full module name, in the order they were recorded."""
        return {n: m.quant for n, m in self.modules.items() if m.quant is not None}

    @property
    def widths(self) -> list[BlockWidths]:
        """Every block's widths, in block order."""
        if sorted(self.blocks) != list(range(len(self.blocks))):
            raise ValueError(f"plan: blocks {sorted(self.blocks)} are not every block from 0")
        return [self.blocks[i].widths for i in range(len(self.blocks))]

    def to_dict(self) -> dict:
        """plan.json: the passes, and per pruned block what its pruning passes kept (a later pass's keys win)."""
        layers = {}
        for i, block in sorted(self.blocks.items()):
            if block.pruned:
                layers[str(i)] = {k: v for s in block.pruned for k, v in s.to_dict().items()}
        return {"passes": self.passes, "layers": layers}
