"""Wanda-sp, the structured baseline: channel score sum_i |W_ij| * ||x_j||, no standardization, no compensation."""

from __future__ import annotations

from torch import nn

from compress.passes.base import Earlier, PassContext
from compress.passes.structured import structured_prune
from compress.recipe import WandaSpConfig
from compress.report import PassReport


class WandaSpPass:
    def __init__(self, config: WandaSpConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """No model-dependent refusal: what each block keeps is decided from calibration statistics in run."""

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        c = self.config
        return structured_prune(model, ctx, name="wanda_sp", metric="wanda", standardize_at=None, structure=c.structure,
                                target=c.target, round_to=c.round_to, compensate=False)
