"""What every pass receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from compress.errors import CompressError
from compress.plan import Plan
from compress.report import PassReport


@dataclass
class PassContext:
    """Calibration windows (N, T) int64, the plan to record decisions in, and run settings."""

    calibration: torch.Tensor
    plan: Plan
    batch_size: int
    seed: int
    cache: Path | None = None
    index: int = 0  # position of the running pass in recipe.passes, for error messages


class Pass(Protocol):
    def __init__(self, config) -> None: ...

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport: ...


def check_finite(name: str, W: torch.Tensor, xtx: torch.Tensor | None) -> None:
    """Stop the run, naming the layer, when its weights or its calibration activations (X^T X) are not finite."""
    if not torch.isfinite(W).all():
        raise CompressError(f"{name}: non-finite weights; stopping")
    if xtx is not None and not torch.isfinite(xtx).all():
        raise CompressError(f"{name}: non-finite calibration activations; stopping")
