"""Plan: the single record of what each pass decided per module; passes write it, the exporter reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
class Plan:
    """Per-layer decisions, keyed by block index then by what was decided (e.g. kept groups, kept channels)."""

    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    passes: list[str] = field(default_factory=list)

    def record(self, layer: int, **decisions: Any) -> None:
        self.layers.setdefault(layer, {}).update(decisions)

    def to_dict(self) -> dict:
        return {"passes": self.passes, "layers": {str(k): v for k, v in sorted(self.layers.items())}}
