"""The FLAP reference's decisions, re-implemented from reading github CASIA-IVA-Lab/FLAP (lib/prune.py `prune_flap`,
structure "AL-AM", metric WIFV; lib/layerwrapper.py `BiasGPT`), with grouped-query attention pruned as whole
key-value groups as our pass does; and the same decision with each of its factors switchable, for the ablation in
benchmarks/flap_reference.py.

What the reference does, factor by factor (ours in brackets):
- fluctuation: a running estimate fed one window at a time; window k (0-based) updates the mean of window means m,
  then fluc <- fluc * (k-1)/k + sum_t (x_t - m_new)^2 / (k+1), so window 0 adds nothing and each window's squared
  deviations are taken from the running mean [the sample variance over all tokens];
- metric: WIFV = fluc_j * sum_i W_ij^2, SQUARED for o_proj's channels only [not squared];
- standardization: per layer, over o_proj's input channels (heads x head_dim) and over down_proj's input channels,
  before the per-head mean [the 9 head means standardized among themselves];
- cost: a head weighs 4 * head_dim / 3 MLP channels (= its parameters; with groups: group params / channel params);
- threshold: the score whose cumulative cost is nearest (1 - ratio) of the total; units scoring strictly above it
  stay; no unit is forced to stay [each layer keeps its best group and channel; the unit at the cut stays];
- widths: not rounded [MLP drops in multiples of round_to = 8];
- compensation: bias W[:, removed] @ mean(x)[removed], mean = mean of the window means [mean over tokens].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from calibration.capture import LinearStats
from compress.ops.importance import channel_scores, group_scores, standardize
from compress.ops.structure import LayerKeep, LayerScores, global_threshold, uniform


@dataclass
class RunningStats:
    """The reference's BiasGPT statistics of one linear's inputs, fed one calibration window at a time."""

    windows: int = 0
    mean: torch.Tensor | None = None  # (in,) running mean of the window means ("baseline_inp")
    fluc: torch.Tensor | None = None  # (in,) the running fluctuation ("fluc_inp")

    def add_window(self, x: torch.Tensor) -> None:
        """x: (T, in), one window's inputs."""
        x = x.to(torch.float64)
        k = self.windows
        if self.mean is None or self.fluc is None:
            self.mean = torch.zeros(x.shape[1], dtype=torch.float64)
            self.fluc = torch.zeros(x.shape[1], dtype=torch.float64)
        self.mean = self.mean * k / (k + 1) + x.mean(0) / (k + 1)
        if k > 0:  # the reference sets fluc to 0 on the first window
            self.fluc = self.fluc * (k - 1) / k + (x - self.mean).pow(2).sum(0) / (k + 1)
        self.windows = k + 1


@dataclass
class LayerStats:
    """One dense block's statistics of o_proj's and down_proj's inputs, both ways; and its weights."""

    o: LinearStats
    down: LinearStats
    o_run: RunningStats
    down_run: RunningStats
    o_weight: torch.Tensor  # (hidden, heads * head_dim)
    down_weight: torch.Tensor  # (hidden, intermediate)
    n_heads: int  # query heads
    n_kv: int  # key-value groups
    group_cost: int  # parameters one group removes
    channel_cost: int  # parameters one MLP channel removes


@dataclass(frozen=True)
class Variant:
    """One setting of every factor in which the reference and our pass differ (defaults: our pass's)."""

    fluctuation: Literal["sample", "running"] = "sample"
    attn_power: int = 1  # o_proj channel scores raised to this power (the reference squares them)
    standardize: Literal["head", "group", "channel", "none"] = "head"
    threshold: Literal["ours", "reference"] = "ours"
    round_to: int = 8
    group_cost: Literal["params", "mha"] = "params"  # mha: a group costs its query heads with a k and v head each
    compensate: bool = True
    structure: Literal["adaptive", "uniform"] = "adaptive"


OURS = Variant()
REFERENCE = Variant(fluctuation="running", attn_power=2, standardize="channel", threshold="reference", round_to=1)


def reference_keeps(layers: list[LayerStats], ratio: float) -> list[LayerKeep]:
    """The reference's "AL-AM" decision as it is written there: scores stacked (layers, channels), standardized
    along the channel axis, o_proj channels averaged per key-value group, one weighted threshold."""
    attn = torch.stack([s.o_run.fluc * s.o_weight.double().pow(2).sum(0) for s in layers if s.o_run.fluc is not None])
    mlp = torch.stack([s.down_run.fluc * s.down_weight.double().pow(2).sum(0)
                       for s in layers if s.down_run.fluc is not None])
    if attn.shape[0] != len(layers) or mlp.shape[0] != len(layers):
        raise ValueError("reference_keeps: a layer has no running statistics")
    attn = attn.pow(2)

    def per_row(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)

    attn = per_row(attn).reshape(len(layers), layers[0].n_kv, -1).mean(2)  # (L, groups)
    mlp = per_row(mlp)  # (L, C)
    metric = torch.cat([attn.reshape(-1), mlp.reshape(-1)])
    ordered, idx = metric.sort(descending=True)
    weight = torch.ones_like(metric)
    weight[idx < attn.numel()] = layers[0].group_cost / layers[0].channel_cost
    cum = weight.cumsum(0)
    threshold = ordered[(cum - weight.sum() * (1 - ratio)).abs().argmin()]
    return [LayerKeep(a > threshold, m > threshold) for a, m in zip(attn, mlp, strict=True)]


def layer_scores(s: LayerStats, v: Variant) -> LayerScores:
    """One layer's group and channel scores and costs under the variant's metric, fluctuation, standardization."""
    if v.fluctuation == "running":
        if s.o_run.fluc is None or s.down_run.fluc is None:
            raise ValueError("layer_scores: no running statistics")
        o_var, down_var = s.o_run.fluc, s.down_run.fluc
    else:
        o_var, down_var = s.o.var, s.down.var
    attn_ch = channel_scores("wifv", s.o_weight, s.o.sq_norm / s.o.n, o_var).pow(v.attn_power)  # (heads * hd,)
    mlp_ch = channel_scores("wifv", s.down_weight, s.down.sq_norm / s.down.n, down_var)  # (C,)
    n_heads = s.n_heads
    if v.standardize == "channel":
        groups = group_scores(standardize(attn_ch), s.n_kv)
    elif v.standardize == "head":
        groups = group_scores(standardize(group_scores(attn_ch, n_heads)), s.n_kv)
    elif v.standardize == "group":
        groups = standardize(group_scores(attn_ch, s.n_kv))
    else:
        groups = group_scores(attn_ch, s.n_kv)
    head_dim, hidden = s.o_weight.shape[1] // n_heads, s.o_weight.shape[0]
    group_cost = s.group_cost if v.group_cost == "params" else n_heads // s.n_kv * 4 * head_dim * hidden
    return LayerScores(groups=groups, channels=mlp_ch if v.standardize == "none" else standardize(mlp_ch),
                       group_cost=group_cost, channel_cost=s.channel_cost)


def keeps(layers: list[LayerStats], v: Variant, ratio: float) -> list[LayerKeep]:
    """What each layer keeps under variant `v` at `ratio` of the projection parameters removed."""
    scores = [layer_scores(s, v) for s in layers]
    if v.structure == "uniform":
        return uniform(scores, ratio, v.round_to)
    if v.threshold == "ours":
        return global_threshold(scores, ratio, v.round_to)
    if v.round_to != 1:
        raise ValueError("the reference threshold does not round widths; use round_to=1 with it")
    metric = torch.cat([torch.cat([s.groups, s.channels]) for s in scores])
    weight = torch.cat([torch.cat([torch.full_like(s.groups, s.group_cost / s.channel_cost),
                                   torch.ones_like(s.channels)]) for s in scores])
    order = metric.argsort(descending=True, stable=True)
    threshold = metric[order][(weight[order].cumsum(0) - weight.sum() * (1 - ratio)).abs().argmin()]
    return [LayerKeep(s.groups > threshold, s.channels > threshold) for s in scores]


def means(layers: list[LayerStats], v: Variant) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The input means that compensation uses: the reference's mean of window means, or the mean over tokens."""
    out = []
    for s in layers:
        if v.fluctuation == "running":
            if s.o_run.mean is None or s.down_run.mean is None:
                raise ValueError("means: no running statistics")
            out.append((s.o_run.mean, s.down_run.mean))
        else:
            out.append((s.o.mean, s.down.mean))
    return out


def with_(v: Variant, **changes) -> Variant:
    return replace(v, **changes)
