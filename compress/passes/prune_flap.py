"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning with bias compensation."""

from __future__ import annotations

from torch import nn

from compress.passes.base import Earlier, PassContext
from compress.passes.structured import structured_prune
from compress.recipe import FlapConfig
from compress.report import PassReport


class FlapPass:
    def __init__(self, config: FlapConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """No model-dependent refusal: what each block keeps is decided from calibration statistics in run."""

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        c = self.config
        return structured_prune(model, ctx, name="flap", metric=c.metric, standardize_at=c.standardize,
                                structure=c.structure, target=c.target, round_to=c.round_to, compensate=c.compensate)
