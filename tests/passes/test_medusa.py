"""The medusa pass (role draft) on the tiny Llama: the heads train against the model's own distributions and only
they change; through `compress run` the artifact carries them (manifest `heads`, the vLLM drafter folder), verifies
clean, and load_heads gives them back; bad recipes exit 2 naming the field."""

from __future__ import annotations

import copy
import json
import shutil
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import export
from compress import api
from compress.cli import cli
from compress.errors import RecipeError
from compress.models import llama
from compress.ops.medusa import head_hits, head_kl, teacher_rows, untrained_hits
from compress.passes.medusa import evaluate_heads, positions, self_distillation
from compress.recipe import load_recipe
from export.medusa import MAX_HEADS, SHARED_LM_HEAD, MedusaHeads, block_names, load_heads
from tests.passes.conftest import BATCH, SEQ, build_model, calibration, logits, run_pass
from tests.tiny import VOCAB

TRAIN: dict[str, Any] = {"steps": 80, "batch_size": 64, "lr": 0.01}
SPEC: dict[str, Any] = {"pass": "medusa", "num_heads": 3, "held_out": 2, "train": TRAIN}


def cyclic(seed: int = 0, windows: int = 8, period: int = 12) -> torch.Tensor:
    """(windows, SEQ) windows of one cycle of `period` token ids from seeded phases: text whose future the model's
    hidden state determines, so that what the heads learn on some windows holds on the others (on random tokens the
    tiny model's distant choices cannot be learned, only memorized)."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(VOCAB, generator=g)[:period]
    phase = torch.randint(0, period, (windows,), generator=g)
    return cycle[(phase[:, None] + torch.arange(SEQ)) % period]


@pytest.fixture(scope="module")
def trained():
    return run_pass(SPEC, calib=cyclic())


# ---- ops -------------------------------------------------------------------------------------------------------------


def test_head_k_is_taught_the_distribution_of_token_t_plus_k_plus_2():
    """Row s holds the model's distribution over token s + 1, so head k at t reads row t + k + 1."""
    assert teacher_rows(torch.tensor([0, 10]), 3).tolist() == [[1, 2, 3], [11, 12, 13]]
    assert positions(1, 2, seq_len=6, num_heads=2).tolist() == [6, 7, 8, 9, 12, 13, 14, 15]  # t < T - K


def test_head_kl_is_zero_for_the_teacher_itself_and_hits_count_argmax_matches():
    logits = torch.randn(5, 2, 11, generator=torch.Generator().manual_seed(0))  # (P, K, V)
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(11, dim=-1)
    assert head_kl(logits, values, ids.int()).abs().max() < 1e-6
    shifted = torch.roll(logits, 1, dims=0)
    assert (head_kl(shifted, values, ids.int()) > 0.1).all()
    choice = logits.argmax(-1)  # (P, K)
    choice[0, 1] = (choice[0, 1] + 1) % 11
    assert head_hits(logits, choice).tolist() == [5, 4]


def test_an_untrained_head_is_right_where_the_next_two_choices_agree():
    choice = torch.tensor([3, 3, 4, 3, 3, 3])  # the model's top-1 at rows 0..5 of one window
    assert untrained_hits(choice, torch.tensor([0, 1, 2]), 2).tolist() == [1, 1]  # rows (1, 2) (2, 3) (3, 4) vs t


def test_the_hidden_states_are_what_lm_head_reads():
    model, calib = build_model(), calibration()
    data = self_distillation(model, calib, top_k=8, batch_size=BATCH)
    full = logits(model, calib)
    assert data.hidden.shape == (len(calib), SEQ, 64)
    assert torch.allclose(llama.as_causal_lm(model).lm_head(data.hidden), full, atol=1e-5)
    assert torch.equal(data.teacher.ids[..., 0].long(), full.argmax(-1))


# ---- the pass --------------------------------------------------------------------------------------------------------


def test_heads_train_and_the_loss_falls(trained):
    s = trained.report.summary
    assert s["num_heads"] == 3 and s["steps"] == 80 and len(s["losses"]) == 80
    assert s["train_windows"] == 6 and s["heldout_windows"] == 2
    assert s["train_positions"] == 6 * (SEQ - 3) and s["heldout_positions"] == 2 * (SEQ - 3)
    assert s["parameters"] == 3 * (64 * 64 + 64)
    assert sum(s["losses"][-10:]) / 10 < 0.7 * sum(s["losses"][:10]) / 10, s["losses"]
    for row in trained.report.rows:
        assert row["train_kl_last"] < 0.7 * row["train_kl_first"], row
        assert 0.0 <= row["heldout_top1"] <= 1.0 and 0.0 <= row["top1_untrained"] <= 1.0
    assert [r["guesses"] for r in trained.report.rows] == ["t+2", "t+3", "t+4"]
    assert s["heldout_top1"] == [r["heldout_top1"] for r in trained.report.rows]


def test_the_trained_heads_are_closer_to_the_model_on_held_out_windows_than_untrained_ones(trained):
    """Held-out KL of each head falls well below that of the zero-initialized head (which repeats the model's
    guess), and top-1 accuracy rises; the accuracies the report gives are what the heads score again."""
    model, plan, s = trained.model, trained.plan, trained.report.summary
    data = self_distillation(model, cyclic(), top_k=32, batch_size=BATCH)
    held = positions(6, 2, SEQ, 3)
    heads = MedusaHeads(64, 3)
    lm_head = llama.as_causal_lm(model).lm_head.weight.detach()
    kl_untrained, top1_untrained = evaluate_heads(heads, lm_head, data, held, chunk=17)
    assert top1_untrained == pytest.approx([r["top1_untrained"] for r in trained.report.rows], abs=1e-4)
    assert plan.heads is not None
    heads.load_state_dict(plan.heads.tensors)
    kl, top1 = evaluate_heads(heads, lm_head, data, held, chunk=17)
    assert top1 == pytest.approx(s["heldout_top1"], abs=1e-4)
    assert all(a < 0.7 * b for a, b in zip(kl, kl_untrained, strict=True)), (kl, kl_untrained)  # measured 0.5-0.6 x
    assert all(a > b + 0.2 for a, b in zip(top1, top1_untrained, strict=True)), (top1, top1_untrained)
    assert top1[0] >= 0.45  # measured 0.50 (untrained 0.17)


def test_the_pass_changes_only_the_heads(trained):
    """Backbone and lm_head bit for bit as they were: the model's logits are identical, no parameter moved."""
    ids = calibration(seed=3)
    assert torch.equal(logits(trained.model, ids), logits(trained.dense, ids))
    dense = dict(trained.dense.named_parameters())
    assert all(torch.equal(p, dense[n]) for n, p in trained.model.named_parameters())
    heads = trained.plan.heads
    assert (heads.num_heads, heads.num_layers) == (3, 1)
    assert sorted(heads.tensors) == sorted(block_names(3, 1))
    assert all(t.abs().max() > 0 for t in heads.tensors.values())  # trained away from the zero start


def test_training_is_seeded():
    again = run_pass({**SPEC, "train": {**TRAIN, "steps": 5}})
    same = run_pass({**SPEC, "train": {**TRAIN, "steps": 5}})
    assert again.report.summary["losses"] == same.report.summary["losses"]
    assert again.plan.heads is not None and same.plan.heads is not None
    assert all(torch.equal(t, same.plan.heads.tensors[k]) for k, t in again.plan.heads.tensors.items())


def test_self_generated_continuations_add_training_windows_and_a_second_accuracy():
    ran = run_pass({**SPEC, "train": {**TRAIN, "steps": 10}, "generate": {"windows": 3, "prompt_tokens": 8}})
    s = ran.report.summary
    assert s["generated_windows"] == 3 and s["train_positions"] == (6 + 3) * (SEQ - 3)
    assert len(s["heldout_top1_generated"]) == 3
    assert all(0.0 <= a <= 1.0 for a in s["heldout_top1_generated"])


# ---- recipes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("passes", "message"), [
    ([{"pass": "medusa"}, {"pass": "gptq"}],
     "passes.1: gptq changes the model that passes.0 trained drafter heads on"),
    ([{"pass": "medusa"}, {"pass": "flap", "target": 0.3}],
     "passes.1: flap changes the model that passes.0 trained drafter heads on"),
    ([{"pass": "medusa", "num_heads": MAX_HEADS + 1}], "passes.0.num_heads: Input should be less than or equal to 16"),
    ([{"pass": "medusa", "num_heads": 0}], "passes.0.num_heads: Input should be greater than or equal to 1"),
    ([{"pass": "medusa", "held_out": 16}],
     "passes.0.held_out: 16 held-out windows leave none of calibration.windows 16"),
    ([{"pass": "medusa", "generate": {"prompt_tokens": 32}}], "passes.0.generate.prompt_tokens: 32 leaves nothing"),
])
def test_bad_medusa_recipes_are_refused_naming_the_field(passes, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_recipe({"name": "x", "calibration": {"windows": 16, "seq_len": 32}, "passes": passes})


def test_the_shipped_recipes_load():
    dense = load_recipe("recipes/llama-medusa.yaml")
    w4 = load_recipe("recipes/llama-w4-medusa.yaml")
    assert [p.pass_ for p in dense.passes] == ["medusa"]
    assert [p.pass_ for p in w4.passes] == ["gptq", "medusa"]
    assert w4.passes[0] == load_recipe("recipes/llama-w4.yaml").passes[0]  # llama-w4's quantization, as it is


def test_cli_exits_2_naming_the_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\npasses:\n  - pass: medusa\n    num_heads: 17\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "passes.0.num_heads: Input should be less than or equal to 16" in result.output


# ---- through compress run: stored, verified, loaded ------------------------------------------------------------------

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    recipe = {"name": "tiny-medusa", "model": str(tiny_llama), "export": {"dtype": "float32"},
              "passes": [{"pass": "gptq", "bits": 4, "group_size": 32},
                         {"pass": "medusa", "num_heads": 2, "num_layers": 2, "held_out": 2,
                          "train": {"steps": 10, "batch_size": 32, "lr": 0.01}}]}
    captured: dict = {}
    original = export.write

    def keep_plan(out, tensors, plan, *args, **kwargs):
        captured["heads"] = copy.deepcopy(plan.heads)
        return original(out, tensors, plan, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "write", keep_plan)  # the pipeline calls export.write
        res = api.run(recipe, out=tmp_path_factory.mktemp("medusa") / "art", overrides=SMALL, log=lambda *_: None)
    return res, captured["heads"]


def test_the_artifact_with_heads_verifies_clean_and_lists_them(artifact):
    res, _ = artifact
    assert export.verify(res.artifact) == []
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert manifest["heads"] == {"format": "vllm-medusa", "path": "medusa", "dtype": "float32", "num_heads": 2,
                                 "num_layers": 2}
    for name in [*block_names(2, 2), SHARED_LM_HEAD]:
        assert manifest["tensors"][name]["file"] == "medusa/model.safetensors"
    assert "medusa/model.safetensors" in manifest["files"] and "medusa/config.json" in manifest["files"]
    assert res.report["heads"]["parameters"] == 2 * 2 * (96 * 96 + 96)
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4  # export.load leaves the heads' folder alone
    assert "drafter heads" in (res.artifact / "README.md").read_text()


def test_load_heads_returns_the_trained_tensors(artifact):
    res, planned = artifact
    heads = load_heads(res.artifact)
    assert heads is not None and (heads.num_heads, heads.num_layers, heads.hidden_size) == (2, 2, 96)
    state = heads.state_dict()
    assert sorted(state) == sorted(planned.tensors)
    assert all(torch.equal(state[k], t) for k, t in planned.tensors.items())
    model = export.load(res.artifact)
    hidden = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    lm = llama.as_causal_lm(model)
    assert heads(hidden, lm.lm_head).shape == (3, 2, 384)


def test_load_heads_is_none_without_heads_and_refuses_an_altered_file(artifact, tiny_llama, tmp_path):
    res = api.run({"name": "tiny-w4", "model": str(tiny_llama), "passes": [{"pass": "rtn", "bits": 4,
                                                                              "group_size": 32}]},
                  out=tmp_path / "plain", overrides=[*SMALL, "evaluate.enabled=false"], log=lambda *_: None)
    assert load_heads(res.artifact) is None
    assert "heads" not in json.loads((res.artifact / "manifest.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(artifact[0].artifact, broken)
    with open(broken / "medusa" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(export.format.ArtifactError, match="medusa/model.safetensors: .* bytes, manifest says"):
        load_heads(broken)
    assert any(p.startswith("medusa/model.safetensors") for p in export.verify(broken))
