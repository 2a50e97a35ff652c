"""Each pruning pass on the tiny model, without the pipeline: the model gets physically smaller by the pass's target
within the pass's rounding, the plan records the model's widths, kept key-value groups keep all their query heads,
the model still runs, the pass is deterministic, and its report has one row per layer and the summary the CLI prints.

Sizes (conftest): hidden 64; 4 key-value groups of 2 query heads of 8 dims; MLP 128; 3 blocks. One key-value group
is (2 * 2 + 2) * 8 * 64 = 3072 projection weights, one MLP channel 3 * 64 = 192; a block is 36864."""

from __future__ import annotations

import pytest
import torch

from compress.models import llama
from compress.plan import widths_of
from tests.passes.conftest import (
    BATCH,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    MLP,
    VOCAB,
    Ran,
    calibration,
    linear,
    logits,
    projection_params,
    run_pass,
    scalars,
    weight,
)

GROUP = HEADS // KV_HEADS  # query heads per key-value group
HIDDEN = 64
GROUP_COST = (2 * GROUP + 2) * HEAD_DIM * HIDDEN  # weights one key-value group removes
CHANNEL_COST = 3 * HIDDEN  # weights one MLP channel removes
TOTAL = LAYERS * ((2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN + 3 * MLP * HIDDEN)
SEARCH = {"generations": 4, "offspring": 4, "survivors": [2], "stage_windows": [2, 4]}

SPECS = {
    "flap": {"pass": "flap", "target": 0.3},
    "flap-uniform": {"pass": "flap", "target": 0.3, "structure": "uniform"},
    "wanda_sp": {"pass": "wanda_sp", "target": 0.3},
    "cfsp": {"pass": "cfsp", "target": 0.3},
    "tyr": {"pass": "tyr", "target": 0.3, "levels": 5, "rounds": 2, "evolution": SEARCH},
}

# the scalar summary keys `compress run` prints on each pass's line
PRINTED = {
    "flap": {"target", "removed", "decoder_params_before", "decoder_params_after", "structure", "metric",
             "standardize_at", "compensated"},
    "cfsp": {"target", "removed", "mlp_target", "decoder_params_before", "decoder_params_after", "temperature",
             "round_to", "compensated"},
    "tyr": {"target", "removed", "decoder_params_before", "decoder_params_after", "levels", "bias", "damp",
            "evaluations"},
}
PRINTED["flap-uniform"] = PRINTED["wanda_sp"] = PRINTED["flap"]


def removal_slack(label: str, ran: Ran) -> tuple[float, float]:
    """How far below and above target * TOTAL the removed projection weights may land, from each pass's rounding."""
    round_to = 8 if label != "cfsp" else 1  # the configs' defaults
    if label == "flap":
        # one global threshold: the cut nearest the budget is off by at most half of the unit it straddles (a group
        # is the dearest unit); then each layer's dropped channels are rounded to round_to, the total staying within
        # round_to / 2 channels of the threshold's
        half = GROUP_COST / 2 + round_to / 2 * CHANNEL_COST
        return half, half
    if label in ("flap-uniform", "wanda_sp"):
        # per layer: the channels bring the layer nearest its target in steps of round_to
        half = LAYERS * round_to / 2 * CHANNEL_COST
        return half, half
    if label == "cfsp":
        # per block: round(keep ratio * MLP / round_to) * round_to channels, the ratios averaging the MLP target
        half = LAYERS * round_to / 2 * CHANNEL_COST
        return half, half
    # tyr: never over the budget (removes at least the target); the search ends where raising any unit by one level
    # would break the budget, so it keeps more than budget - (dearest step between adjacent levels). Adjacent levels
    # of the last round are `spacing` of a unit's width apart, each rounded to the nearest step (1 group, 8 channels)
    spacing = ran.report.summary["rounds"][-1]["spacing"]
    step = max((spacing * KV_HEADS + 1) * GROUP_COST, (spacing * MLP + round_to) * CHANNEL_COST)
    return 0.0, step


@pytest.fixture(scope="module", params=sorted(SPECS))
def pruned(request) -> tuple[str, Ran]:
    return request.param, run_pass(SPECS[request.param])


def test_model_is_smaller_by_the_target_within_rounding(pruned):
    label, ran = pruned
    before, after = projection_params(ran.dense), projection_params(ran.model)
    assert before == TOTAL
    removed = before - after
    below, above = removal_slack(label, ran)
    assert -below <= removed - 0.3 * TOTAL <= above, (label, removed / TOTAL)
    # every parameter the pass took is a projection weight; the only ones it adds are compensation biases
    added_bias = sum(lin.bias.numel() for b in llama.blocks(ran.model) for lin in llama.linears(b).values()
                     if lin.bias is not None)
    all_before = sum(p.numel() for p in ran.dense.parameters())
    assert all_before - sum(p.numel() for p in ran.model.parameters()) == removed - added_bias
    summary = ran.report.summary
    assert (summary["decoder_params_before"], summary["decoder_params_after"]) == (before, after)
    assert summary["removed"] == round(removed / before, 4) and summary["target"] == 0.3


def test_plan_widths_are_the_models_blocks(pruned):
    _, ran = pruned
    assert ran.plan.widths == [widths_of(llama.block_shape(b)) for b in llama.blocks(ran.model)]
    assert ran.plan.widths != [widths_of(llama.block_shape(b)) for b in llama.blocks(ran.dense)]
    for i, block in enumerate(ran.plan.blocks.values()):
        (kept,) = block.pruned
        shape = llama.block_shape(llama.blocks(ran.model)[i])
        assert len(kept.kept_kv_groups if kept.kept_kv_groups is not None else range(KV_HEADS)) \
            == shape.num_key_value_heads
        assert len(kept.kept_mlp_channels) == shape.intermediate_size
        # sorted indices into the widths before the pass, as the plan promises (export reads them in that order)
        for indices, width in ((kept.kept_kv_groups, KV_HEADS), (kept.kept_mlp_channels, MLP)):
            if indices is not None:
                assert indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < width


def _query_rows(groups: list[int]) -> torch.Tensor:
    """Rows of q_proj owned by key-value groups `groups`: every query head g * GROUP .. g * GROUP + GROUP - 1."""
    return torch.tensor([(g * GROUP + h) * HEAD_DIM + d for g in groups for h in range(GROUP) for d in range(HEAD_DIM)])


def test_kept_groups_keep_all_their_query_heads_and_kept_rows_are_the_dense_rows(pruned):
    label, ran = pruned
    for i, (block, dense) in enumerate(zip(llama.blocks(ran.model), llama.blocks(ran.dense), strict=True)):
        kept = ran.plan.blocks[i].pruned[0]
        groups = kept.kept_kv_groups if kept.kept_kv_groups is not None else list(range(KV_HEADS))
        channels = torch.tensor(kept.kept_mlp_channels)
        shape = llama.block_shape(block)
        assert (shape.num_attention_heads, shape.num_key_value_heads) == (GROUP * len(groups), len(groups))
        assert llama.as_block(block).self_attn.num_key_value_groups == GROUP
        lin, dense_lin = llama.linears(block), llama.linears(dense)
        kv_rows = torch.tensor([g * HEAD_DIM + d for g in groups for d in range(HEAD_DIM)])
        q_rows = _query_rows(groups)
        # q/k/v and gate/up keep the dense rows of what stays; only o_proj / down_proj may be refit (Tyr)
        assert torch.equal(lin["q_proj"].weight, dense_lin["q_proj"].weight[q_rows])
        for name in ("k_proj", "v_proj"):
            assert torch.equal(lin[name].weight, dense_lin[name].weight[kv_rows])
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(lin[name].weight, dense_lin[name].weight[channels])
        if label != "tyr":
            assert torch.equal(lin["o_proj"].weight, dense_lin["o_proj"].weight[:, q_rows])
            assert torch.equal(lin["down_proj"].weight, dense_lin["down_proj"].weight[:, channels])
        compensated = label.startswith("flap")
        assert (lin["o_proj"].bias is not None) == (compensated and len(groups) < KV_HEADS)
        assert (lin["down_proj"].bias is not None) == (compensated and len(channels) < MLP)


def test_pruned_model_runs_with_finite_logits(pruned):
    _, ran = pruned
    ids = calibration(seed=1, windows=2, seq=16)
    out = logits(ran.model, ids)
    assert out.shape == (2, 16, VOCAB) and torch.isfinite(out).all()
    assert not torch.allclose(out, logits(ran.dense, ids))  # it is a different model


def test_rows_one_per_layer_and_the_summary_the_cli_prints(pruned):
    label, ran = pruned
    rows = ran.report.rows
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    for row, block, dense in zip(rows, llama.blocks(ran.model), llama.blocks(ran.dense), strict=True):
        after, before = llama.block_shape(block), llama.block_shape(dense)
        assert row["mlp"] == f"{after.intermediate_size}/{before.intermediate_size}"
        assert row["kept"] == round(llama.block_params(after, HIDDEN) / llama.block_params(before, HIDDEN), 4)
        if label != "cfsp":
            assert row["q_heads"] == f"{after.num_attention_heads}/{HEADS}"
            assert row["kv_heads"] == f"{after.num_key_value_heads}/{KV_HEADS}"
    assert scalars(ran.report.summary) == PRINTED[label]
    assert ran.report.name == SPECS[label]["pass"] and ran.report.fallbacks == []


def test_uniform_structures_give_every_layer_the_same_widths(pruned):
    label, ran = pruned
    widths = {(w.num_key_value_heads, w.intermediate_size) for w in ran.plan.widths}
    if label in ("flap-uniform", "wanda_sp"):
        assert len(widths) == 1
    if label == "cfsp":  # MLP only, attention whole; blocks differ by their angular distance
        assert {w.num_key_value_heads for w in ran.plan.widths} == {KV_HEADS}
        assert len({w.intermediate_size for w in ran.plan.widths}) == LAYERS
    if label == "tyr":  # widths per unit from the search
        assert len(widths) > 1


def test_same_seed_same_plan_and_weights(pruned):
    label, ran = pruned
    again = run_pass(SPECS[label])
    assert again.plan.to_dict() == ran.plan.to_dict() and again.plan.widths == ran.plan.widths
    mine, theirs = ran.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def _mean_inputs(model, names: list[str]) -> dict[str, torch.Tensor]:
    """Mean input (in,) float64 of each named linear over the calibration windows, from a plain forward."""
    sums = {n: torch.zeros(linear(model, n).in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def add(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            sums[name] += x.sum(0)
            counts[name] += x.shape[0]
        return add

    handles = [linear(model, n).register_forward_hook(hook(n)) for n in names]
    calib = calibration()
    try:
        for start in range(0, len(calib), BATCH):
            logits(model, calib[start : start + BATCH])
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


@pytest.mark.parametrize("spec", [SPECS["flap"], {"pass": "cfsp", "target": 0.3, "compensate": True}],
                         ids=["flap", "cfsp"])
def test_compensation_keeps_the_mean_output_of_o_proj_and_down_proj(spec):
    """Bias compensation's promise: on the calibration windows' inputs of a layer (the dense model's, which the pass
    measured), the pruned o_proj / down_proj plus its bias has the dense layer's mean output. In exact arithmetic
    W[:, K] x_K + W[:, R] mean(x_R) averages to W mean(x); here the sums are float64 and the bias is stored in fp32,
    so each output may differ by the bias's rounding, 2^-24 |b|, plus float64 sums of 256 tokens (2^-40 |W| |x|).
    (The pruned model's own later layers see other inputs; the promise is per layer, on the inputs it measured.)"""
    ran = run_pass(spec)
    names = [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in ("self_attn.o_proj", "mlp.down_proj")]
    means = _mean_inputs(ran.dense, names)
    checked = 0
    for name in names:
        i = int(name.split(".")[2])
        kept = ran.plan.blocks[i].pruned[0]
        if name.endswith("o_proj"):
            groups = kept.kept_kv_groups if kept.kept_kv_groups is not None else list(range(KV_HEADS))
            cols = _query_rows(groups)
        else:
            cols = torch.tensor(kept.kept_mlp_channels)
        W, mean = weight(ran.dense, name).double(), means[name]
        pruned = linear(ran.model, name)
        if len(cols) == W.shape[1]:
            assert pruned.bias is None  # nothing removed, nothing to compensate
            continue
        dense_out = W @ mean  # (out,)
        kept_out = pruned.weight.double() @ mean[cols]
        assert pruned.bias is not None, name
        bias = pruned.bias.double()
        bound = 2.0**-24 * bias.abs() + 2.0**-40 * (W.abs() @ mean.abs())
        assert ((kept_out + bias - dense_out).abs() <= bound).all(), name
        # without the bias the mean moves by far more than the bound: the check can tell
        assert (kept_out - dense_out).abs().max() > 1e4 * bound.max(), name
        checked += 1
    assert checked >= LAYERS  # every block lost MLP channels at least
