"""The lora pass through `compress run` on the tiny Llama: healing after uniform pruning leaves a stock-loadable
pruned model; a correction after quantization is exported beside the packed weights and reloaded by our loader."""

import json

import torch
from transformers import AutoModelForCausalLM

import export
from compress import api

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]
TRAIN = {"steps": 20, "lr": 0.01, "batch_size": 4, "top_k": 32}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_healing_after_uniform_pruning_stays_a_stock_model(tiny_llama, tmp_path):
    recipe = {"name": "tiny-heal", "model": str(tiny_llama),
              "passes": [{"pass": "flap", "target": 0.3, "structure": "uniform"},
                         {"pass": "lora", "init": "zero", "rank": 4, "train": TRAIN}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    lora = rep["passes"][1]["summary"]
    assert lora["merged"] == lora["modules"] == 21 and len(lora["losses"]) == 20
    assert lora["held_in_kl_after"] < lora["held_in_kl_before"]
    assert rep["stock_config"] is True and rep["verify"]["max_abs_logit_diff"] < 1e-4
    assert not (res.artifact / "adapter").exists()
    assert json.loads((res.artifact / "plan.json").read_text())["passes"] == ["flap", "lora"]
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (_logits(stock, ids) - _logits(export.load(res.artifact), ids)).abs().max() < 1e-4


def test_correction_after_quantization_is_exported_and_reloaded(tiny_llama, tmp_path):
    recipe = {"name": "tiny-w2-lora", "model": str(tiny_llama),
              "passes": [{"pass": "gptq", "bits": 2, "group_size": 32},
                         {"pass": "lora", "init": "eora", "rank": 4, "train": TRAIN}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    lora = rep["passes"][1]["summary"]
    assert lora["merged"] == 0 and lora["adapter_parameters"] == 3 * (
        4 * (96 + 96) + 2 * 4 * (96 + 48) + 4 * (96 + 96) + 2 * 4 * (96 + 128) + 4 * (128 + 96))
    assert {r["init"] for r in rep["passes"][1]["rows"]} == {"eora"}
    assert lora["held_in_kl_after"] < lora["held_in_kl_before"]
    assert rep["verify"]["max_abs_logit_diff"] < 1e-4
    assert (res.artifact / "adapter" / "adapter_config.json").exists()
    assert export.verify(res.artifact) == []


def test_searched_ranks_stay_within_the_budget_and_export_per_module_ranks(tiny_llama, tmp_path):
    """rank: {bits_per_weight, choices}: a knapsack gives each quantized module its rank; the adapter's bits stay
    within the budget, the ranks differ between modules (else the search did nothing), and PEFT's rank_pattern
    carries them."""
    budget = {"bits_per_weight": 0.5, "choices": [0, 2, 4, 8, 16]}
    recipe = {"name": "tiny-w2-ranked", "model": str(tiny_llama),
              "passes": [{"pass": "gptq", "bits": 2, "group_size": 32},
                         {"pass": "lora", "init": "eora", "rank": budget, "train": {**TRAIN, "steps": 4}}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    lora = res.report["passes"][1]["summary"]
    quantized = 3 * (96 * 96 + 2 * 48 * 96 + 96 * 96 + 2 * 128 * 96 + 96 * 128)  # weights of the 21 linears
    assert lora["adapter_parameters"] * 16 <= 0.5 * quantized
    assert lora["adapter_parameters"] * 16 > 0.4 * quantized  # the budget is spent, not left idle
    chosen = lora["rank"]["chosen"]
    assert lora["rank"]["bits_per_weight"] == 0.5 and sum(chosen.values()) == 21 and len(chosen) > 1
    rows = res.report["passes"][1]["rows"]
    assert len(rows) == 3 and all(len(r["ranks"].split()) == 7 for r in rows)
    config = json.loads((res.artifact / "adapter" / "adapter_config.json").read_text())
    assert config["r"] in {2, 4, 8, 16} and config["rank_pattern"]
    assert set(config["rank_pattern"].values()) <= {2, 4, 8, 16} - {config["r"]}
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4 and export.verify(res.artifact) == []


def test_rank_budget_bad_inputs_exit_2_naming_the_field(tiny_llama, tmp_path):
    import pytest

    from compress.errors import InputError

    def run(lora: dict, gptq: dict | None = None):
        recipe = {"name": "bad", "model": str(tiny_llama),
                  "passes": [{"pass": "gptq", "bits": 2, "group_size": 32, **(gptq or {})},
                             {"pass": "lora", "init": "eora", "train": {**TRAIN, "steps": 1}, **lora}]}
        return api.run(recipe, out=tmp_path / "bad", overrides=SMALL, log=lambda *_: None)

    with pytest.raises(InputError, match=r"passes.1.rank: a rank budget ranks the fitted corrections.*init zero"):
        run({"init": "zero", "rank": {"bits_per_weight": 0.5}})
    with pytest.raises(InputError, match=r"passes.1.targets: a rank budget spreads adapter bits over quantized "
                                         r"modules, and model.layers.0.mlp.down_proj is not quantized"):
        run({"rank": {"bits_per_weight": 0.5}}, {"ignore": ["down_proj"]})
    with pytest.raises(InputError, match=r"passes.1.rank.bits_per_weight: 12 bits per weight .* is above the "
                                         r"largest possible total"):
        run({"rank": {"bits_per_weight": 12, "choices": [0, 4]}})
    assert not (tmp_path / "bad").exists()
