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


def global_threshold(layers: list[LayerScores], target: float) -> list[LayerKeep]:
    """FLAP's adaptive structure: one threshold over all layers' (already standardized) scores.

    Units are taken best first until the kept cost is closest to (1 - target) of the total; every layer keeps at
    least its best group and its best channel, so no block loses a whole sub-layer."""
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
    keep = [LayerKeep(torch.zeros(s.groups.numel(), dtype=torch.bool), torch.zeros(s.channels.numel(), dtype=torch.bool))
            for s in layers]
    for k in order[: cut + 1].tolist():
        li, kind, j = owner[k]
        (keep[li].groups if kind == "g" else keep[li].channels)[j] = True
    return keep


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
        drop_c = min(max(drop_c, 0), C - 1)
        out.append(LayerKeep(_keep_top(s.groups, G - drop_g), _keep_top(s.channels, C - drop_c)))
    return out
