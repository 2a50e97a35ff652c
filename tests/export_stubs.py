"""Stand-ins for what export.write reads, so export's tests need nothing from compress."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from export.records import BlockWidths, QuantRecord


@dataclass
class LowRankPair:
    """compress.plan.LowRank without compress: A (rank, in), B (out, rank)."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass
class StubPlan:
    """export.write's ArtifactPlan without compress: widths per block, quantized and corrected linears in plan order."""

    widths: list[BlockWidths]
    quantized: dict[str, QuantRecord] = field(default_factory=dict)
    adapters: dict[str, LowRankPair] = field(default_factory=dict)
    heads: None = None  # no drafter heads

    def to_dict(self) -> dict:
        return {"passes": ["test"]}
