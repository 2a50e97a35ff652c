"""What a user reads after a run: greedy generations of the dense and the compressed model side by side (report,
summary, model card), and a plain warning when the compressed model has lost most of what it knew."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import api
from compress.report import RECOVERY_FLOOR, generation_rows, quality_warnings
from compress.tables import markdown_table

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]


def _greedy(folder, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generations_side_by_side(tiny_llama, tmp_path):
    prompts = ["def f(x):", "The license"]
    recipe = {"name": "tiny", "model": str(tiny_llama), "evaluate": {"prompts": prompts, "new_tokens": 6},
              "passes": [{"pass": "flap", "target": 0.3, "structure": "uniform"}]}  # uniform: stock loads it
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    gens = res.report["generations"]
    assert [g["prompt"] for g in gens] == prompts
    assert gens[0]["dense"] == _greedy(tiny_llama, prompts[0], 6)  # the dense model's own greedy continuation
    assert gens[1]["compressed"] == _greedy(res.artifact, prompts[1], 6)  # and the artifact's, as stock loads it
    card = (res.artifact / "README.md").read_text()
    assert "## Generations" in card and "Greedy, 6 new tokens" in card
    assert markdown_table(generation_rows(res.report)) in card
    assert "def f(x):" in str(res)


def test_no_prompts_no_section(tiny_llama, tmp_path):
    recipe = {"name": "tiny", "model": str(tiny_llama), "passes": [{"pass": "flap", "target": 0.3}],
              "evaluate": {"prompts": []}}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    assert res.report["generations"] == []
    assert "## Generations" not in (res.artifact / "README.md").read_text()


def test_warning_below_the_recovery_floor_names_the_text_and_what_to_try():
    report = {"quality": [
        {"text": "pydoc-heldout", "dense ppl": 18.55, "compressed ppl": 54.91, "recovery": 0.3378},
        {"text": "licenses", "dense ppl": 12.35, "compressed ppl": 124.9, "recovery": 0.0989},
    ]}
    warnings = quality_warnings(report)
    assert len(warnings) == 1 and RECOVERY_FLOOR == pytest.approx(1 / 3)
    assert warnings[0].startswith("the compressed model has lost most of what it knew on licenses: perplexity "
                                  "12.35 -> 124.9 (recovery 0.0989, below 0.33)")
    assert "pass: tyr" in warnings[0] and "recipes/llama-w4.yaml" in warnings[0]
    assert quality_warnings({"quality": report["quality"][:1]}) == []


def test_generation_cells_stay_on_one_line_and_pipes_are_escaped():
    rows = generation_rows({"generations": [{"prompt": "a", "dense": "x\ny", "compressed": "p | q"}]})
    assert rows == [{"prompt": "a", "dense": "x\u23ce y", "compressed": "p | q"}]
    assert markdown_table(rows).splitlines()[-1] == "| a | x\u23ce y | p \\| q |"
