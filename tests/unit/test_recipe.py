"""Recipes: every shipped recipe validates; overrides; errors name the field."""

from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe import FlapConfig, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.passes


def test_llama_30pct_is_flap_adaptive_30():
    r = load_recipe(Path(__file__).parents[2] / "recipes" / "llama-30pct.yaml")
    (p,) = r.passes
    assert isinstance(p, FlapConfig) and p.target == 0.30 and p.structure == "adaptive" and p.compensate
    assert r.model == "smollm2-135m" and r.calibration.source == "pydoc"


def test_overrides_apply_and_round_trip():
    base = {"name": "x", "passes": [{"pass": "flap", "target": 0.3}]}
    r = load_recipe(base, ["passes.0.target=0.2", "model=./other", "calibration.windows=4"])
    assert r.passes[0].target == 0.2 and r.model == "./other" and r.calibration.windows == 4
    assert load_recipe(r.to_dict()) == r
    assert base["passes"][0]["target"] == 0.3  # the caller's data is not changed


@pytest.mark.parametrize("override, where", [
    ("passes.0.nope=1", "passes.0.nope: unknown key"),
    ("passes.3.target=0.1", "passes.3: no such list item"),
    ("calibration.windowz=3", "calibration.windowz: unknown key"),
    ("target", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_path(override, where):
    with pytest.raises(RecipeError, match=where.replace(".", r"\.")):
        load_recipe({"name": "x", "passes": [{"pass": "flap", "target": 0.3}]}, [override])


def test_duplicate_yaml_key_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\nseed: 1\nseed: 2\npasses: [{pass: flap, target: 0.3}]\n")
    with pytest.raises(RecipeError, match="duplicate key 'seed' at line 3"):
        load_recipe(p)
