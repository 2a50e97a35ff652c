"""Passes: `check(model, earlier, where)` before any pass runs, then `run(model, ctx) -> PassReport`. The registry
maps each config class to its pass class; a new pass is a config class (with its role), a pass class and an entry."""

from __future__ import annotations

from compress.passes.base import Pass, PassContext
from compress.passes.lora import LoraPass
from compress.passes.medusa import MedusaPass
from compress.passes.prune_cfsp import CfspPass
from compress.passes.prune_flap import FlapPass
from compress.passes.prune_tyr import TyrPass
from compress.passes.prune_wanda import WandaSpPass
from compress.passes.quantize import QuantizePass
from compress.recipe import (
    CfspConfig,
    FlapConfig,
    GptqConfig,
    LoraConfig,
    MedusaConfig,
    RtnConfig,
    TyrConfig,
    WandaSpConfig,
)

PASSES: dict[type, type[Pass]] = {FlapConfig: FlapPass, WandaSpConfig: WandaSpPass, CfspConfig: CfspPass,
                                  TyrConfig: TyrPass, GptqConfig: QuantizePass, RtnConfig: QuantizePass,
                                  LoraConfig: LoraPass, MedusaConfig: MedusaPass}


def make_pass(config) -> Pass:
    return PASSES[type(config)](config)


__all__ = ["PASSES", "Pass", "PassContext", "make_pass"]
