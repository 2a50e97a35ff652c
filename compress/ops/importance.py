"""Structured importance scores for the input channels of o_proj and down_proj (FLAP, Wanda-sp)."""

from __future__ import annotations

from typing import Literal

import torch

Metric = Literal["wifv", "ifv", "wifn", "wanda"]
# where attention scores are standardized within a layer: query heads, key-value groups, o_proj input channels
StandardizeAt = Literal["head", "group", "channel"] | None


def channel_scores(metric: Metric, W: torch.Tensor, mean_sq: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Score per input channel j of W (out, in) from its input statistics (each (in,)); returns (in,) float64.

    wifv  (FLAP default): var_j * sum_i W_ij^2   -- fluctuation of the input, weighted by the column's energy
    ifv:                  var_j
    wifn:                 mean_i |W_ij| * sqrt(E[x_j^2])
    wanda (Wanda-sp):     sum_i |W_ij| * sqrt(E[x_j^2])
    """
    W = W.to(torch.float64)
    if metric == "wifv":
        return var * W.pow(2).sum(0)
    if metric == "ifv":
        return var.clone()
    if metric == "wifn":
        return (W.abs() * mean_sq.sqrt()[None, :]).mean(0)
    if metric == "wanda":
        return (W.abs() * mean_sq.sqrt()[None, :]).sum(0)
    raise ValueError(f"unknown metric {metric!r}")


def group_scores(channel: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean channel score of each of `n_groups` equal, contiguous groups: (in,) -> (n_groups,)."""
    return channel.view(n_groups, -1).mean(1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std within one layer's scores (FLAP); a constant or single score maps to 0."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def kv_group_scores(channel: torch.Tensor, n_heads: int, n_groups: int, at: StandardizeAt) -> torch.Tensor:
    """Score of each key-value group of one layer from o_proj's per-input-channel scores: (heads * head_dim,) ->
    (n_groups,), the mean over the group's channels, standardized within the layer at level `at`:

    "channel" (the FLAP reference's axis): standardize the channels, then average per group;
    "head": average per query head, standardize the heads, average per group;
    "group": average per group, standardize the groups;  None: the raw mean.
    The mean of standardized channels is (group mean - channel mean) / channel std: groups spread less than under
    "head" or "group", whose std is taken over a few means."""
    if at == "channel":
        return group_scores(standardize(channel), n_groups)
    heads = group_scores(channel, n_heads)  # (heads,)
    if at == "head":
        return group_scores(standardize(heads), n_groups)
    if at == "group":
        return standardize(group_scores(heads, n_groups))
    return group_scores(heads, n_groups)


def compensation_bias(W: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The output shift removing input channels `removed` causes, W[:, R] @ mean[R]: (out,) float64.

    Adding it as a bias restores the mean output (FLAP's baseline bias compensation)."""
    return W.to(torch.float64)[:, removed] @ mean.to(torch.float64)[removed]


def lim_score(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Layer input modification (LIM): sum over tokens of 1 - cos(x_in, x_out), and the token count.
    x_in, x_out: (..., hidden). More change = more important."""
    cos = torch.nn.functional.cosine_similarity(x_in.reshape(-1, x_in.shape[-1]).double(),
                                                x_out.reshape(-1, x_out.shape[-1]).double(), dim=-1)
    return float((1 - cos).sum()), int(cos.numel())


def zd_score(weights: list[torch.Tensor], threshold: float) -> float:
    """Z-score distribution (ZD): share of a layer's weights whose z-score (over all its weights) exceeds
    `threshold`. Fewer outliers = less sensitive to quantization."""
    w = torch.cat([t.detach().reshape(-1).double() for t in weights])
    z = (w - w.mean()) / w.std()
    return float((z.abs() > threshold).double().mean())


def angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """CFSP's block importance: sum over tokens of arccos(cos(x_in, x_out)) / pi, and the token count."""
    cos = torch.nn.functional.cosine_similarity(x_in.reshape(-1, x_in.shape[-1]).double(),
                                                x_out.reshape(-1, x_out.shape[-1]).double(), dim=-1)
    return float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).sum()), int(cos.numel())


def cfsp_keep_ratios(block_scores: torch.Tensor, keep: float, temperature: float = 1.0,
                     max_keep: float = 1.0) -> torch.Tensor:
    """CFSP's coarse allocation: per-block keep ratios from block importance (more important keeps more).

    sigmoid(temperature * standardized score), scaled so the mean keep ratio is `keep`; if that pushes a block above
    `max_keep`, the spread around the mean is shrunk until it does not (the mean is unchanged)."""
    z = standardize(block_scores.double())
    s = torch.sigmoid(temperature * z)
    r = s / s.mean() * keep
    if r.max() > max_keep:
        mean = r.mean()
        r = mean + (r - mean) * ((max_keep - mean) / (r.max() - mean))
    return r.clamp(0.0, max_keep)


def cfsp_channel_scores(W_down: torch.Tensor, W_up: torch.Tensor, W_gate: torch.Tensor, act_norm: torch.Tensor,
                        b: float = 1.0, c: float = 1.0) -> torch.Tensor:
    """CFSP's fine score of each MLP channel j: the channel's share of each matrix's total |weight| (down_proj's
    column weighted by ||x_j||^b; up/gate's rows), summed over the three matrices, times ||x_j||^c.
    W_down (hidden, C), W_up and W_gate (C, hidden), act_norm (C,) = ||x_j|| over calibration tokens."""
    a = act_norm.double()
    down = W_down.double().abs() * a[None, :] ** b
    terms = down.sum(0) / down.sum() + W_up.double().abs().sum(1) / W_up.double().abs().sum() \
        + W_gate.double().abs().sum(1) / W_gate.double().abs().sum()
    return terms * a**c
