"""What every pass receives and returns, and the pre-flight check every pass makes against the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from calibration.teacher import TeacherTargets
from compress.device import CPU
from compress.errors import CompressError
from compress.plan import Plan
from compress.recipe import HasRole
from compress.report import PassReport


@dataclass
class PassContext:
    """Calibration windows (N, T) int64, the plan to record decisions in, and run settings. `device` is where the
    block under work computes (compress.device; the model itself stays on the CPU)."""

    calibration: torch.Tensor
    plan: Plan
    batch_size: int
    seed: int
    cache: Path | None = None
    index: int = 0  # position of the running pass in recipe.passes, for error messages
    device: torch.device = CPU
    # the dense model's next-token distributions on the calibration windows, computed before any pass when a pass
    # trains against them (role correct); None otherwise
    teacher: TeacherTargets | None = None
    # what a quantization pass found before it quantized each module, kept when a later correction fits its error
    # (None: not kept)
    originals: dict[str, Original] | None = None


@dataclass
class Original:
    """A module's weight (out, in) as the quantization pass received it, and the sum of its inputs' x x^T (in, in)
    over n calibration tokens (None for round-to-nearest, which reads no inputs); on the CPU."""

    weight: torch.Tensor
    xtx: torch.Tensor | None
    n: int


# the passes before the one checking itself: each config with its recipe path (passes.0)
Earlier = Sequence[tuple[HasRole, str]]


class Pass(Protocol):
    def __init__(self, config) -> None: ...

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """Refuse (InputError naming `where` and the earlier pass's path) what this pass would refuse only after the
        passes before it ran; called for every pass before any text is tokenized or any pass runs."""
        ...

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport: ...


def check_finite(name: str, W: torch.Tensor, xtx: torch.Tensor | None) -> None:
    """Stop the run, naming the layer, when its weights or its calibration activations (X^T X) are not finite."""
    if not torch.isfinite(W).all():
        raise CompressError(f"{name}: non-finite weights; stopping")
    if xtx is not None and not torch.isfinite(xtx).all():
        raise CompressError(f"{name}: non-finite calibration activations; stopping")
