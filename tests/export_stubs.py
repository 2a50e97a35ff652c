"""Stand-ins for what export.write reads, so export's tests need nothing from compress."""

from __future__ import annotations

from dataclasses import dataclass, field

from export.records import BlockWidths, QuantRecord


@dataclass
class StubPlan:
    """export.write's ArtifactPlan without compress: widths per block, quantized linears in plan order."""

    widths: list[BlockWidths]
    quantized: dict[str, QuantRecord] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"passes": ["test"]}
