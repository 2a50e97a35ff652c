"""The README quotes the shipped recipes' figures as they run now: each recipe row of docs/results/default_recipes.json
(written by benchmarks/default_recipes.py from `compress run` itself) is quoted, to the digits the tables print, in the
README row that names the recipe file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.tables import _fmt

ROOT = Path(__file__).resolve().parents[2]
RESULTS = json.loads((ROOT / "docs" / "results" / "default_recipes.json").read_text())["rows"]
README = (ROOT / "README.md").read_text()


def _row_naming(recipe: str) -> list[str]:
    """The cells of the README table row that names `recipes/<recipe>.yaml` first."""
    for line in README.splitlines():
        if line.startswith("|") and f"`recipes/{recipe}.yaml`" in line:
            return [c.strip().strip("*") for c in line.strip("|").split("|")]
    raise AssertionError(f"README.md: no table row names recipes/{recipe}.yaml")


@pytest.mark.parametrize("row", RESULTS, ids=[r["recipe"] for r in RESULTS])
def test_readme_quotes_the_recipe_as_it_runs(row):
    cells = _row_naming(row["recipe"])
    texts = [k for k in row if k.startswith("ppl ")]
    assert "ppl pydoc-heldout" in texts and len(texts) >= 2, f"{row['recipe']}: evaluated on {texts}"
    for text in texts:
        want = _fmt(row[text])
        assert want in cells, f"README row for {row['recipe']}: {text} {want} (default_recipes.json) not in {cells}"
    if row["bits/weight"] != "":
        assert f"stored {row['bits/weight']:g}" in cells[0], f"README row for {row['recipe']}: {cells[0]}"


def test_the_results_cover_the_main_job_and_the_4_bit_recipe():
    assert {"llama-30pct", "llama-w4"} <= {r["recipe"] for r in RESULTS}
    w4 = next(r for r in RESULTS if r["recipe"] == "llama-w4")
    assert w4["bits/weight"] == 4.25  # 4-bit codes + one 16-bit scale per group of 64
