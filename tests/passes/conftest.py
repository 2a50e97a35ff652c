"""The pass tier: one pass on a tiny in-memory Llama, without the pipeline (no `compress run`, no export).

The model: hidden 64, 8 query heads of 8 dims over 4 key-value heads (grouped-query attention, 2 query heads per
group), MLP 128, 3 blocks, vocabulary 384; weights N(0, 0.08) from a seeded generator (the caller's global streams are
left alone). Calibration: 8 windows of 32 random token ids, seeded. A pass is built from recipe data
(`{"pass": "flap", ...}`) the way `compress run` builds it, then `make_pass(config).run(model, ctx)`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import pytest
import torch
from torch import nn

from compress.models import llama
from compress.passes import PassContext, make_pass
from compress.plan import Plan
from compress.recipe import load_recipe
from compress.report import PassReport
from tests.tiny import VOCAB, tiny_config

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 64, 8, 4, 8, 128, 3
WINDOWS, SEQ, BATCH = 8, 32, 4


def build_model(seed: int = 0, embed_rank: int | None = None) -> nn.Module:
    """The tiny Llama in fp32 eval mode. embed_rank: token embeddings of that rank (strongly correlated inputs)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, intermediate_size=MLP, num_hidden_layers=LAYERS)
    with torch.random.fork_rng(devices=[]):  # from_config draws its init from the global stream: restore it after
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        if embed_rank is not None:  # (vocab, r) @ (r, hidden): every token's embedding in one r-dim subspace
            emb = model.get_input_embeddings().weight
            emb.copy_(torch.randn(VOCAB, embed_rank, generator=g) @ torch.randn(embed_rank, HIDDEN, generator=g)
                      * 0.08 / embed_rank**0.5)
    return model.eval().requires_grad_(False)


def calibration(seed: int = 0, windows: int = WINDOWS, seq: int = SEQ) -> torch.Tensor:
    """(windows, seq) int64 random token ids."""
    return torch.randint(0, VOCAB, (windows, seq), generator=torch.Generator().manual_seed(seed))


def pass_config(spec: dict, windows: int = WINDOWS):
    """The pass config `compress run` would build from recipe data `spec` (validated with the whole recipe)."""
    recipe = {"name": "pass-tier", "calibration": {"windows": windows, "seq_len": SEQ}, "passes": [spec]}
    return load_recipe(recipe).passes[0]


@dataclass
class Ran:
    """A pass's result: the model it changed, the plan it filled, its report, and a dense copy from before."""

    model: nn.Module
    dense: nn.Module
    plan: Plan
    report: PassReport


def run_pass(spec: dict, model: nn.Module | None = None, seed: int = 0, calib: torch.Tensor | None = None) -> Ran:
    """Run the pass given as recipe data on (a fresh tiny model or) `model`, seed `seed`."""
    model = build_model() if model is None else model
    dense = copy.deepcopy(model)
    plan = Plan.of(model)
    calib = calibration() if calib is None else calib
    ctx = PassContext(calibration=calib, plan=plan, batch_size=BATCH, seed=seed)
    plan.passes.append(spec["pass"])
    report = make_pass(pass_config(spec, len(calib))).run(model, ctx)
    return Ran(model, dense, plan, report)


def scalars(summary: dict) -> set[str]:
    """The summary keys `compress run` prints on the pass's line (the scalar ones)."""
    return {k for k, v in summary.items() if not isinstance(v, (list, dict))}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def linear(model: nn.Module, name: str) -> nn.Linear:
    """The linear `name` (model.layers.0.mlp.down_proj), typed (get_submodule returns a plain Module)."""
    return cast(nn.Linear, model.get_submodule(name))


def weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight (out, in) of linear `name`."""
    return linear(model, name).weight


def projection_params(model: nn.Module) -> int:
    """Weights of every decoder projection (q/k/v/o, gate/up/down), biases not counted."""
    return sum(lin.weight.numel() for b in llama.blocks(model) for lin in llama.linears(b).values())


@pytest.fixture
def calib() -> torch.Tensor:
    return calibration()
