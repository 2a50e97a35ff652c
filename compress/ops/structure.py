"""Which attention groups and MLP channels each layer keeps, under a global parameter budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerScores:
    """Scores of one layer's removable units and what each unit costs in parameters."""

    groups: torch.Tensor  # (G,) one score per key-value group
    channels: torch.Tensor  # (C,) one score per MLP channel
    group_cost: int
    channel_cost: int

    @property
    def total(self) -> int:
        return self.groups.numel() * self.group_cost + self.channels.numel() * self.channel_cost


@dataclass(frozen=True)
class LayerKeep:
    groups: torch.Tensor  # (G,) bool
    channels: torch.Tensor  # (C,) bool

    def kept_params(self, s: LayerScores) -> int:
        return int(self.groups.sum()) * s.group_cost + int(self.channels.sum()) * s.channel_cost


def global_threshold(layers: list[LayerScores], target: float, round_to: int = 1) -> list[LayerKeep]:
    """FLAP's adaptive structure: one threshold over all layers' (already standardized) scores.

    Units are taken best first until the kept cost is closest to (1 - target) of the total; every layer keeps at
    least its best group and its best channel, so no block loses a whole sub-layer. With `round_to` > 1 each layer's
    dropped MLP channels are then rounded to a multiple of it (as `uniform` does), so kept widths stay multiples of
    it when the dense width is: what quantization groups and GPU kernels need."""
    scores, costs, owner = [], [], []  # owner: (layer, kind, index)
    for li, s in enumerate(layers):
        for kind, vals, cost in (("g", s.groups, s.group_cost), ("c", s.channels, s.channel_cost)):
            forced = int(vals.argmax())
            for j, v in enumerate(vals.tolist()):
                scores.append(float("inf") if j == forced else v)
                costs.append(cost)
                owner.append((li, kind, j))
    order = torch.tensor(scores, dtype=torch.float64).argsort(descending=True, stable=True)
    cum = torch.tensor(costs, dtype=torch.float64)[order].cumsum(0)
    budget = (1.0 - target) * sum(s.total for s in layers)
    n_forced = 2 * len(layers)
    cut = max(int((cum - budget).abs().argmin()), n_forced - 1)
    keep = [LayerKeep(torch.zeros(s.groups.numel(), dtype=torch.bool),
                      torch.zeros(s.channels.numel(), dtype=torch.bool)) for s in layers]
    for k in order[: cut + 1].tolist():
        li, kind, j = owner[k]
        (keep[li].groups if kind == "g" else keep[li].channels)[j] = True
    return keep if round_to <= 1 else _round_drops(keep, layers, round_to)


def _round_drops(keep: list[LayerKeep], layers: list[LayerScores], r: int) -> list[LayerKeep]:
    """Round each layer's dropped channel count to a multiple of `r` (keeping at least one channel), up or down
    (largest remainders up first), so that the total dropped stays within r/2 channels of the threshold's; each layer
    keeps its best-scored channels."""
    drops = [s.channels.numel() - int(k.channels.sum()) for k, s in zip(keep, layers, strict=True)]
    caps = [(s.channels.numel() - 1) // r * r for s in layers]
    rounded = [min(d // r * r, cap) for d, cap in zip(drops, caps, strict=True)]
    short = sum(drops) - sum(rounded)  # channels the threshold dropped that the rounding keeps
    for i in sorted(range(len(layers)), key=lambda i: (-(drops[i] - rounded[i]), i)):
        if 2 * short <= r:  # one more step would overshoot by more than it fixes
            break
        if rounded[i] + r <= caps[i]:
            rounded[i] += r
            short -= r
    return [LayerKeep(k.groups, _keep_top(s.channels, s.channels.numel() - d))
            for k, s, d in zip(keep, layers, rounded, strict=True)]


def _keep_top(vals: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros(vals.numel(), dtype=torch.bool)
    mask[vals.argsort(descending=True, stable=True)[:n_keep]] = True
    return mask


def uniform(layers: list[LayerScores], target: float, round_to: int) -> list[LayerKeep]:
    """Same widths in every layer: remove round(target * G) groups (keeping at least one), then as many MLP channels
    (a multiple of `round_to`, keeping at least one) as bring the layer closest to `target`; best-scored units stay."""
    out = []
    for s in layers:
        G, C = s.groups.numel(), s.channels.numel()
        drop_g = min(round(target * G), G - 1)
        want = target * s.total - drop_g * s.group_cost
        drop_c = round(max(want, 0.0) / s.channel_cost / round_to) * round_to
        drop_c = min(max(drop_c, 0), (C - 1) // round_to * round_to)  # keeps >= 1 channel, steps of round_to
        out.append(LayerKeep(_keep_top(s.groups, G - drop_g), _keep_top(s.channels, C - drop_c)))
    return out
