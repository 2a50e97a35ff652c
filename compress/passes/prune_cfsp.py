"""CFSP (Wang et al., 2024): coarse-to-fine structured pruning of MLP channels from one calibration pass.

Coarse: each block's importance is the mean angular distance arccos(cos(x_in, x_out)) / pi between its input and
output hidden states; a sigmoid of the standardized importances, rescaled to the global budget, gives each block's
MLP keep ratio (important blocks keep more). Fine: within a block, MLP channels are scored from the weights of
down/up/gate and the channel's activation norm; the top channels stay. Attention is left whole.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from calibration.capture import LinearStats, for_each_block
from compress.errors import CompressError, InputError
from compress.models import llama
from compress.ops.importance import angular_distance, cfsp_channel_scores, cfsp_keep_ratios, compensation_bias
from compress.passes.base import Earlier, PassContext
from compress.plan import Structure, widths_of
from compress.recipe import CfspConfig
from compress.report import PassReport


def _mlp_target(model: nn.Module, target: float, where: str) -> float:
    """The share of MLP parameters to remove so that `target` of the decoder-block parameters go; refuses a target
    that the MLPs alone cannot meet."""
    hidden = llama.hidden_size(model)
    shapes = [llama.block_shape(b) for b in llama.blocks(model)]
    dense_total = sum(llama.block_params(s, hidden) for s in shapes)
    mlp_total = sum(s.intermediate_size * llama.channel_params(hidden) for s in shapes)
    mlp_target = target * dense_total / mlp_total
    if mlp_target >= 1.0:
        raise InputError(f"{where}.target: CFSP removes MLP channels only; {target:.0%} of the decoder "
                         f"parameters is {mlp_target:.0%} of the MLP parameters")
    return mlp_target


class CfspPass:
    def __init__(self, config: CfspConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """A target the MLPs alone cannot meet, on the dense widths (after an earlier pruning pass, run checks it on
        the widths that pass leaves)."""
        if not any(p.role == "prune" for p, _ in earlier):
            _mlp_target(model, self.config.target, where)

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes.{ctx.index}"
        layers = llama.blocks(model)
        hidden = llama.hidden_size(model)
        shapes = [llama.block_shape(b) for b in layers]
        dense_total = sum(llama.block_params(s, hidden) for s in shapes)
        mlp_target = _mlp_target(model, cfg.target, where)
        distance: list[float] = []
        stats: list[LinearStats] = []

        def watch(_i, block):
            return {"down_proj": llama.linears(block)["down_proj"]}

        def visit(i, _block, inputs, outputs, s):
            total, count = 0.0, 0  # summed angular distance, tokens
            for x_in, x_out in zip(inputs, outputs, strict=True):
                t, c = angular_distance(x_in, x_out)
                total, count = total + t, count + c
            distance.append(total / count)
            if not torch.isfinite(s["down_proj"].total_sq).all():
                raise CompressError(f"layer {i} down_proj: non-finite calibration activations; stopping")
            stats.append(s["down_proj"])

        for_each_block(model, layers, ctx.calibration, visit, watch, batch_size=ctx.batch_size, device=ctx.device,
                       desc="cfsp: statistics")
        ratios = cfsp_keep_ratios(torch.tensor(distance), 1.0 - mlp_target, cfg.temperature, cfg.max_keep)
        report = PassReport(name="cfsp")
        kept_total = 0
        for i, (block, shape, s) in enumerate(zip(layers, shapes, stats, strict=True)):
            lin = llama.linears(block)
            C = shape.intermediate_size
            n_keep = int(round(float(ratios[i]) * C / cfg.round_to)) * cfg.round_to
            n_keep = min(max(n_keep, cfg.round_to, 1), C)
            scores = cfsp_channel_scores(lin["down_proj"].weight, lin["up_proj"].weight, lin["gate_proj"].weight,
                                         s.sq_norm.sqrt(), cfg.weight_power, cfg.activation_power)
            keep = scores.argsort(descending=True, stable=True)[:n_keep].sort().values
            down_bias = None
            if cfg.compensate and n_keep < C:
                removed = torch.ones(C, dtype=torch.bool)
                removed[keep] = False
                down_bias = compensation_bias(lin["down_proj"].weight, s.mean, removed.nonzero().flatten())
            llama.prune_mlp_channels(block, keep, down_bias)
            after = llama.block_shape(block)
            kept = llama.block_params(after, hidden)
            kept_total += kept
            ctx.plan.prune(i, widths_of(shape), Structure(kept_mlp_channels=keep.tolist(), compensated=cfg.compensate),
                           biased=("down_proj",) if down_bias is not None else ())
            report.rows.append({"layer": i, "angular distance": round(distance[i], 5),
                                "mlp keep (coarse)": round(float(ratios[i]), 4),
                                "mlp": f"{after.intermediate_size}/{C}",
                                "kept": round(kept / llama.block_params(shape, hidden), 4)})
        report.summary = {"target": cfg.target, "removed": round(1 - kept_total / dense_total, 4),
                          "mlp_target": round(mlp_target, 4), "decoder_params_before": dense_total,
                          "decoder_params_after": kept_total, "temperature": cfg.temperature,
                          "round_to": cfg.round_to, "compensated": cfg.compensate}
        report.seconds = time.perf_counter() - t0
        return report
