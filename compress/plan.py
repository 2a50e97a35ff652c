"""Plan: the single record of what each pass decided per module; passes write it, the exporter reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PassReport:
    """What a pass did: one row per layer for the table, a summary, and any fallback it had to take."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "fallbacks": self.fallbacks,
                "seconds": round(self.seconds, 2), "rows": self.rows}


@dataclass
class QuantRecord:
    """A quantized linear as the artifact stores it (compressed-tensors pack-quantized layout).

    packed (out, ceil(in * bits / 32)) int32: unsigned codes as one little-endian bit stream per row;
    scale (out, G) float32; zero (out, G) int32 unsigned codes (w = scale * (code - zero)); g_idx (in,) int32."""

    bits: int
    group_size: int
    sym: bool
    shape: tuple[int, int]
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) float32 this record stands for."""
        from export.kernels.reference import dequantize_packed
        from export.packing import pack

        zero = None if self.sym else pack(self.zero, self.bits, dim=0)
        return dequantize_packed(self.packed, self.scale, zero, self.shape, self.bits,
                                 None if self.ordered_groups else self.g_idx).float()

    def scheme(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "ordered": self.ordered_groups,
                "shape": list(self.shape)}

    @property
    def ordered_groups(self) -> bool:
        """Whether every group is a contiguous run of columns (no gather needed)."""
        g = self.shape[1] if self.group_size == -1 else self.group_size
        return bool(torch.equal(self.g_idx, (torch.arange(self.shape[1]) // g).to(self.g_idx.dtype)))


@dataclass
class Plan:
    """Per-layer decisions, keyed by block index then by what was decided (e.g. kept groups, kept channels)."""

    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    passes: list[str] = field(default_factory=list)
    quantized: dict[str, QuantRecord] = field(default_factory=dict)  # full module name -> packed weight

    def record(self, layer: int, **decisions: Any) -> None:
        self.layers.setdefault(layer, {}).update(decisions)

    def to_dict(self) -> dict:
        return {"passes": self.passes, "layers": {str(k): v for k, v in sorted(self.layers.items())}}
