"""Structured pruning orchestration shared by FLAP and the Wanda-sp baseline: collect o_proj / down_proj input
statistics block by block and score key-value groups and MLP channels as each block passes, decide what each layer
keeps, cut. The cut goes through compress.models.streaming.prune_block, so a streamed model (issue 16) is cut the
same way, block by block, as its blocks are materialized."""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from calibration.capture import LinearStats, for_each_block
from compress.device import CPU
from compress.errors import CompressError
from compress.models import llama
from compress.models.streaming import prune_block
from compress.ops.importance import (
    Metric,
    StandardizeAt,
    channel_scores,
    compensation_bias,
    kv_group_scores,
    standardize,
)
from compress.ops.structure import LayerKeep, LayerScores, global_threshold, uniform
from compress.passes.base import PassContext
from compress.plan import Structure, widths_of
from compress.report import PassReport


def _layer_scores(block: nn.Module, o: LinearStats, down: LinearStats, metric: Metric, hidden: int,
                  standardize_at: StandardizeAt) -> LayerScores:
    """Scores of a layer's key-value groups and MLP channels, computed on the CPU (`o` and `down` there).

    standardize_at: None (raw scores), or where attention scores are standardized within the layer (kv_group_scores:
    "head", "group", or "channel" as the FLAP reference does); MLP channel scores are standardized unless None."""
    shape = llama.block_shape(block)
    lin = llama.linears(block)
    o_weight, down_weight = lin["o_proj"].weight.to(CPU), lin["down_proj"].weight.to(CPU)
    attn_ch = channel_scores(metric, o_weight, o.sq_norm / o.n, o.var)  # (heads * head_dim,)
    mlp_ch = channel_scores(metric, down_weight, down.sq_norm / down.n, down.var)  # (intermediate,)
    groups = kv_group_scores(attn_ch, shape.num_attention_heads, shape.num_key_value_heads, standardize_at)  # (G,)
    return LayerScores(
        groups=groups,
        channels=standardize(mlp_ch) if standardize_at else mlp_ch,
        group_cost=llama.group_params(shape, hidden),
        channel_cost=llama.channel_params(hidden),
    )


def _cut(block: nn.Module, keep: LayerKeep, o_mean: torch.Tensor | None, down_mean: torch.Tensor | None
         ) -> tuple[str, ...]:
    """Remove the key-value groups and MLP channels a block does not `keep`, compensating the removed inputs of
    o_proj / down_proj by a bias from their mean inputs (each (in,); None: no compensation); returns the projections
    that got a bias. Deterministic, so a streamed model can replay it on each materialization of the block."""
    shape = llama.block_shape(block)
    lin = llama.linears(block)
    o_bias = down_bias = None
    if o_mean is not None:
        removed_dims = (~keep.groups).repeat_interleave(shape.group_size * shape.head_dim).nonzero().flatten()
        o_bias = compensation_bias(lin["o_proj"].weight, o_mean, removed_dims) if removed_dims.numel() else None
    if down_mean is not None:
        removed_ch = (~keep.channels).nonzero().flatten()
        down_bias = compensation_bias(lin["down_proj"].weight, down_mean, removed_ch) if removed_ch.numel() else None
    llama.prune_attention_groups(block, keep.groups.nonzero().flatten(), o_bias)
    llama.prune_mlp_channels(block, keep.channels.nonzero().flatten(), down_bias)
    return tuple(n for n, b in (("o_proj", o_bias), ("down_proj", down_bias)) if b is not None)


def structured_prune(model: nn.Module, ctx: PassContext, *, name: str, metric: Metric, standardize_at: StandardizeAt,
                     structure: str, target: float, round_to: int, compensate: bool) -> PassReport:
    """Score, decide and physically remove key-value groups and MLP channels; returns the per-layer table."""
    t0 = time.perf_counter()
    layers = llama.blocks(model)
    hidden = llama.hidden_size(model)
    means: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: mean inputs of o_proj, down_proj (per channel)
    scores: list[LayerScores] = []

    def watch(_i, block):
        lin = llama.linears(block)
        return {"o_proj": lin["o_proj"], "down_proj": lin["down_proj"]}

    def visit(i, block, _inputs, _outputs, s):  # scored while the block is here (a streamed one is gone after)
        o, down = s["o_proj"].to_(CPU), s["down_proj"].to_(CPU)
        for what, st in (("o_proj", o), ("down_proj", down)):
            if not (torch.isfinite(st.mean).all() and torch.isfinite(st.sq_norm).all()):
                raise CompressError(f"layer {i} {what}: non-finite calibration activations; stopping")
        scores.append(_layer_scores(block, o, down, metric, hidden, standardize_at))
        means.append((o.mean, down.mean))

    for_each_block(model, layers, ctx.calibration, visit, watch, batch_size=ctx.batch_size, device=ctx.device,
                   desc=f"{name}: statistics")
    keeps: list[LayerKeep] = (global_threshold(scores, target, round_to) if structure == "adaptive"
                              else uniform(scores, target, round_to))

    report = PassReport(name=name)
    dense_total = kept_total = 0
    for i, (keep, (o_mean, down_mean)) in enumerate(zip(keeps, means, strict=True)):
        before = llama.block_shape(layers[i])
        dense = llama.block_params(before, hidden)
        kept_groups = keep.groups.nonzero().flatten()
        kept_channels = keep.channels.nonzero().flatten()
        biased = prune_block(model, i, partial(_cut, keep=keep, o_mean=o_mean if compensate else None,
                                               down_mean=down_mean if compensate else None))
        after = llama.block_shape(layers[i])
        kept = llama.block_params(after, hidden)
        dense_total += dense
        kept_total += kept
        ctx.plan.prune(i, widths_of(before), Structure(kept_groups.tolist(), kept_channels.tolist(), compensate),
                       biased=biased)
        report.rows.append({
            "layer": i,
            "q_heads": f"{after.num_attention_heads}/{before.num_attention_heads}",
            "kv_heads": f"{after.num_key_value_heads}/{before.num_key_value_heads}",
            "mlp": f"{after.intermediate_size}/{before.intermediate_size}",
            "kept": round(kept / dense, 4),
        })
    report.summary = {
        "target": target,
        "removed": round(1 - kept_total / dense_total, 4),
        "decoder_params_before": dense_total,
        "decoder_params_after": kept_total,
        "structure": structure,
        "metric": metric,
        "standardize_at": standardize_at,
        "compensated": compensate,
    }
    report.seconds = time.perf_counter() - t0
    return report
