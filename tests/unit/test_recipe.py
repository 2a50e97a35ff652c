"""Recipes: every shipped recipe validates; overrides; errors name the field."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe import (
    PASS_CONFIGS,
    ROLES,
    CfspConfig,
    FlapConfig,
    GptqConfig,
    LoraConfig,
    Prunes,
    Role,
    TyrConfig,
    check_order,
    load_recipe,
)

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.passes


def test_llama_30pct_is_uniform_flap_30_then_healing():
    r = load_recipe(Path(__file__).parents[2] / "recipes" / "llama-30pct.yaml")
    p, heal = r.passes
    assert isinstance(p, FlapConfig) and p.target == 0.30 and p.structure == "uniform" and p.compensate
    assert isinstance(heal, LoraConfig) and heal.init == "zero" and heal.merge and heal.train.steps > 0
    assert r.model == "smollm2-135m" and r.calibration.source == "pydoc"
    adaptive = load_recipe(Path(__file__).parents[2] / "recipes" / "llama-30pct-adaptive.yaml")
    (p,) = adaptive.passes
    assert isinstance(p, FlapConfig) and p.target == 0.30 and p.structure == "adaptive"


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


# ---- pass roles -----------------------------------------------------------------------------------------------------


def test_every_pass_config_declares_its_role():
    """A role per config class; the configs of role prune declare what they remove and the MLP width step (what a
    later quantization checks its group sizes against)."""
    for cls in PASS_CONFIGS:
        assert cls.role in ROLES, cls
        prunes = cls.role == "prune"
        assert prunes == ("round_to" in cls.model_fields), cls
        assert prunes == bool(getattr(cls, "removes", frozenset())), cls
    assert CfspConfig.removes == {"mlp_channels"} and TyrConfig.removes == {"kv_groups", "mlp_channels"}
    assert isinstance(CfspConfig(target=0.3), Prunes) and not isinstance(GptqConfig(), Prunes)


def test_every_pass_config_has_a_pass():
    """The recipe's union of pass configs and the pass registry name the same configs (a config added to one and not
    the other fails here, not in a run)."""
    from compress.passes import PASSES

    assert set(PASSES) == set(PASS_CONFIGS) and len(PASS_CONFIGS) == 8


@dataclass(frozen=True)
class _Step:
    """A stand-in pass config for the ordering rules: only role and pass_ are read (no correct or draft pass exists
    yet, and registering one would change the recipe's schema)."""

    role: Role
    pass_: str


_P, _Q, _C, _D = (_Step("prune", "flap"), _Step("quantize", "gptq"), _Step("correct", "lora"), _Step("draft", "heads"))


@pytest.mark.parametrize("passes", [[_P], [_Q], [_P, _P, _Q], [_Q, _C], [_P, _C, _C], [_P, _Q, _C, _D], [_D], [_D, _D]])
def test_role_orders_accepted(passes):
    check_order(passes)


@pytest.mark.parametrize("passes, message", [
    ([_Q, _P], "passes.1: flap prunes weights that passes.0 already quantized; put the pruning passes first"),
    ([_P, _Q, _P], "passes.2: flap prunes weights that passes.1 already quantized"),
    ([_P, _C, _Q], "passes.2: gptq changes the weights that passes.1 fitted its correction to"),
    ([_Q, _C, _P], "passes.2: flap prunes weights that passes.0 already quantized"),  # the first pass it undoes
    ([_P, _D, _C], "passes.2: lora changes the model that passes.1 trained drafter heads on"),
    ([_D, _P], "passes.1: flap changes the model that passes.0 trained drafter heads on"),
    ([_C, _Q], "passes.0: lora corrects the error of an earlier pruning or quantization pass, and no such pass"),
    ([_D, _C], "passes.1: lora changes the model that passes.0 trained drafter heads on"),
    ([_Q, _Q], "passes.1: the model is already quantized by passes.0; one quantization pass per recipe"),
])
def test_role_orders_refused_naming_both_passes(passes, message):
    with pytest.raises(ValueError) as err:
        check_order(passes)
    assert str(err.value).startswith(message), str(err.value)


def test_recipe_order_comes_from_roles():
    flap, gptq = {"pass": "flap", "target": 0.3}, {"pass": "gptq", "group_size": 32}
    assert [p.role for p in load_recipe({"name": "x", "passes": [flap, flap, gptq]}).passes] == [
        "prune", "prune", "quantize"]
    with pytest.raises(RecipeError, match=r"passes\.2: flap prunes weights that passes\.1 already quantized"):
        load_recipe({"name": "x", "passes": [flap, gptq, flap]})


def test_group_size_is_positive_or_minus_one_for_the_decoder_and_the_lm_head():
    import pytest as _pytest

    from compress.errors import RecipeError
    from compress.recipe import load_recipe

    for spec, where in [({"group_size": 0}, "passes.0.group_size"),
                        ({"lm_head": {"bits": 8, "group_size": -5}}, "passes.0.lm_head.group_size")]:
        with _pytest.raises(RecipeError, match=rf"{where}: group_size is a positive number of input columns, or -1"):
            load_recipe({"name": "x", "passes": [{"pass": "gptq", **spec}]})
    assert load_recipe({"name": "x", "passes": [{"pass": "gptq", "group_size": -1}]}).passes[0].group_size == -1
