"""FLAP's standardization axis (the reference's "channel" against our "head" and "group"), on hand-made scores whose
every number is worked out in the comments; and the benchmark's re-implementation of the reference's running
fluctuation estimate against its recurrence written out by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from compress.ops.importance import kv_group_scores, standardize
from compress.ops.structure import LayerScores, global_threshold
from compress.recipe import FlapConfig

# one layer: 2 key-value groups of 2 query heads of 2 channels; head means 1, 2 | 0, 9; group means 1.5 | 4.5
ATTN = torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0, 18.0], dtype=torch.float64)
# channel mean 3, deviations -3 -1 -3 1 -3 -3 -3 15: sum of squares 272, std sqrt(272 / 7)
CHANNEL_STD = math.sqrt(272 / 7)
# head means 1 2 0 9: mean 3, deviations -2 -1 -3 6: sum of squares 50, std sqrt(50 / 3)
HEAD_STD = math.sqrt(50 / 3)


def test_channel_standardizes_over_channels_then_averages_per_group():
    z = kv_group_scores(ATTN, n_heads=4, n_groups=2, at="channel")
    assert z.tolist() == pytest.approx([-1.5 / CHANNEL_STD, 1.5 / CHANNEL_STD], abs=1e-12)  # +-0.2406
    assert z.tolist() == pytest.approx(standardize(ATTN).view(2, 4).mean(1).tolist(), abs=1e-12)


def test_head_and_group_levels():
    head = kv_group_scores(ATTN, n_heads=4, n_groups=2, at="head")  # mean of (-2, -1) / HEAD_STD and of (-3, 6)
    assert head.tolist() == pytest.approx([-1.5 / HEAD_STD, 1.5 / HEAD_STD], abs=1e-12)  # +-0.3674
    group = kv_group_scores(ATTN, n_heads=4, n_groups=2, at="group")  # two values standardize to -+1/sqrt(2)
    assert group.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-12)
    assert kv_group_scores(ATTN, n_heads=4, n_groups=2, at=None).tolist() == [1.5, 4.5]


@pytest.mark.parametrize("at, groups, channels", [
    # ranked: g1 (forced), c5 (forced), c4 0.80, c3 0.27, c2 -0.27, g0 -0.37: cumulative cost 2 3 4 5 6 8;
    # the budget 6.6 is nearest 6: g0 goes, four channels stay
    ("head", [False, True], [False, False, True, True, True, True]),
    # ranked: g1, c5, c4, c3, g0 -0.24, c2: cumulative cost 2 3 4 5 7 8; nearest 6.6 is 7: both groups stay
    ("channel", [True, True], [False, False, False, True, True, True]),
])
def test_standardization_axis_decides_the_keep_masks(at, groups, channels):
    mlp = standardize(torch.arange(6, dtype=torch.float64))  # -1.34 -0.80 -0.27 0.27 0.80 1.34
    layer = LayerScores(groups=kv_group_scores(ATTN, 4, 2, at), channels=mlp, group_cost=2, channel_cost=1)
    (keep,) = global_threshold([layer], target=0.34, round_to=1)  # keep 0.66 of 2 * 2 + 6 = 10
    assert keep.groups.tolist() == groups
    assert keep.channels.tolist() == channels


def test_config_defaults_to_the_reference_axis_and_keeps_head():
    assert FlapConfig(target=0.3).standardize == "channel"
    assert FlapConfig(target=0.3, standardize="head").standardize == "head"
    with pytest.raises(ValidationError, match="standardize"):
        FlapConfig(target=0.3, standardize="layer")


def test_running_fluctuation_follows_the_reference_recurrence():
    """Window k (0-based) of the reference: m <- (k m + mean_k) / (k + 1); fluc <- fluc (k - 1) / k + sum_t (x_t -
    m)^2 / (k + 1), with window 0 adding nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        from _flap_ref import RunningStats
    finally:
        sys.path.pop(0)
    windows = [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [7.0]]), torch.tensor([[0.0], [0.0]])]
    s = RunningStats()
    for w in windows:
        s.add_window(w)
    # k=0: m = 2, fluc 0; k=1: m = (2 + 6) / 2 = 4, fluc = 0 + ((5-4)^2 + (7-4)^2) / 2 = 5;
    # k=2: m = (2 * 4 + 0) / 3 = 8/3, fluc = 5 * 1/2 + 2 * (8/3)^2 / 3 = 2.5 + 128/27
    assert s.windows == 3
    assert s.mean is not None and s.fluc is not None
    assert s.mean.tolist() == pytest.approx([8 / 3], abs=1e-12)
    assert s.fluc.tolist() == pytest.approx([2.5 + 128 / 27], abs=1e-12)
