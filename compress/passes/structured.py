"""Structured pruning orchestration shared by FLAP and the Wanda-sp baseline: collect o_proj / down_proj input
statistics block by block, score key-value groups and MLP channels, decide what each layer keeps, cut."""

from __future__ import annotations

import time

import torch
from torch import nn

from calibration.capture import LinearStats, for_each_block
from compress.errors import CompressError
from compress.models import llama
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
    """Scores of a layer's key-value groups and MLP channels.

    standardize_at: None (raw scores), or where attention scores are standardized within the layer (kv_group_scores:
    "head", "group", or "channel" as the FLAP reference does); MLP channel scores are standardized unless None."""
    shape = llama.block_shape(block)
    lin = llama.linears(block)
    attn_ch = channel_scores(metric, lin["o_proj"].weight, o.sq_norm / o.n, o.var)  # (heads * head_dim,)
    mlp_ch = channel_scores(metric, lin["down_proj"].weight, down.sq_norm / down.n, down.var)  # (intermediate,)
    groups = kv_group_scores(attn_ch, shape.num_attention_heads, shape.num_key_value_heads, standardize_at)  # (G,)
    return LayerScores(
        groups=groups,
        channels=standardize(mlp_ch) if standardize_at else mlp_ch,
        group_cost=llama.group_params(shape, hidden),
        channel_cost=llama.channel_params(hidden),
    )


def structured_prune(model: nn.Module, ctx: PassContext, *, name: str, metric: Metric, standardize_at: StandardizeAt,
                     structure: str, target: float, round_to: int, compensate: bool) -> PassReport:
    """Score, decide and physically remove key-value groups and MLP channels; returns the per-layer table."""
    t0 = time.perf_counter()
    layers = llama.blocks(model)
    hidden = llama.hidden_size(model)
    stats: list[tuple[LinearStats, LinearStats]] = []

    def watch(_i, block):
        lin = llama.linears(block)
        return {"o_proj": lin["o_proj"], "down_proj": lin["down_proj"]}

    def visit(_i, _block, _inputs, _outputs, s):
        stats.append((s["o_proj"], s["down_proj"]))

    for_each_block(model, layers, ctx.calibration, visit, watch, batch_size=ctx.batch_size, device=ctx.device,
                   desc=f"{name}: statistics")
    for i, (o, down) in enumerate(stats):
        for what, s in (("o_proj", o), ("down_proj", down)):
            if not (torch.isfinite(s.mean).all() and torch.isfinite(s.sq_norm).all()):
                raise CompressError(f"layer {i} {what}: non-finite calibration activations; stopping")
    scores = [_layer_scores(b, o, d, metric, hidden, standardize_at) for b, (o, d) in zip(layers, stats, strict=True)]
    keeps: list[LayerKeep] = (global_threshold(scores, target, round_to) if structure == "adaptive"
                              else uniform(scores, target, round_to))

    report = PassReport(name=name)
    dense_total = kept_total = 0
    for i, (block, keep, (o, down)) in enumerate(zip(layers, keeps, stats, strict=True)):
        before = llama.block_shape(block)
        dense = llama.block_params(before, hidden)
        lin = llama.linears(block)
        kept_groups = keep.groups.nonzero().flatten()
        kept_channels = keep.channels.nonzero().flatten()
        o_bias = down_bias = None
        if compensate:
            ch_per_group = before.group_size * before.head_dim
            removed_dims = (~keep.groups).repeat_interleave(ch_per_group).nonzero().flatten()
            o_bias = compensation_bias(lin["o_proj"].weight, o.mean, removed_dims) if removed_dims.numel() else None
            removed_ch = (~keep.channels).nonzero().flatten()
            down_bias = (compensation_bias(lin["down_proj"].weight, down.mean, removed_ch) if removed_ch.numel()
                         else None)
        llama.prune_attention_groups(block, kept_groups, o_bias)
        llama.prune_mlp_channels(block, kept_channels, down_bias)
        after = llama.block_shape(block)
        kept = llama.block_params(after, hidden)
        dense_total += dense
        kept_total += kept
        ctx.plan.prune(i, widths_of(before), Structure(kept_groups.tolist(), kept_channels.tolist(), compensate),
                       biased=tuple(n for n, b in (("o_proj", o_bias), ("down_proj", down_bias)) if b is not None))
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
