"""`compress validate` checks the recipe's local paths by kind (no weights, no text read) and exits 2 naming the
field; `compress run` refuses the same typos before the model is fetched or loaded; both commands take the recipe
as the argument or as --recipe."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress import api, pipeline
from compress.cli import cli
from compress.errors import InputError

RECIPE = {"name": "t", "passes": [{"pass": "flap", "target": 0.3}]}


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A model folder that passes the checks by kind (its files are not read), text files and folders of each kind."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("some text\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "table.csv").write_text("text\na\n")
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "a.json").write_text("{}")
    return {"root": tmp_path, "model": model, "no-config": no_config, "pickle-only": pickle_only}


def _recipe(root: Path, **fields) -> str:
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, **fields}))
    return str(path)


def _validate(*args: str):
    return CliRunner().invoke(cli, ["validate", *args])


def test_good_paths_validate(paths):
    root = paths["root"]
    recipe = _recipe(root, model=str(paths["model"]), calibration={"source": str(root / "notes.txt")},
                     evaluate={"extra": ["licenses", str(root / "rows.jsonl")]})
    res = _validate(recipe, "--set", "calibration.field=text")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{recipe}: OK\n")


CASES = [
    # (id, recipe fields given the paths, text the message must contain)
    ("model-missing", lambda p: {"model": str(p["root"] / "nope")}, "model '{root}/nope': no such folder"),
    ("model-is-a-file", lambda p: {"model": str(p["root"] / "notes.txt")}, "model '{root}/notes.txt': no such folder"),
    ("model-no-config", lambda p: {"model": str(p["no-config"])}, "no-config/config.json is missing"),
    ("model-pickle-only", lambda p: {"model": str(p["pickle-only"])},
     "refused, it has only pickle weights (pytorch_model.bin)"),
    ("calibration-missing", lambda p: {"calibration": {"source": str(p["root"] / "notse.txt")}},
     "calibration.source: '{root}/notse.txt': no such file or folder (packaged sources: pydoc, licenses, news)"),
    ("calibration-unknown-name", lambda p: {"calibration": {"source": "pydocs"}},
     "calibration.source: 'pydocs': no such file or folder"),
    ("calibration-wrong-type", lambda p: {"calibration": {"source": str(p["root"] / "table.csv")}},
     "calibration.source: {root}/table.csv: unsupported file type '.csv'"),
    ("calibration-folder-without-text", lambda p: {"calibration": {"source": str(p["root"] / "no-text")}},
     "calibration.source: {root}/no-text: folder has no .txt or .md files"),
    ("calibration-rows-without-field", lambda p: {"calibration": {"source": str(p["root"] / "rows.jsonl")}},
     "calibration.source: {root}/rows.jsonl: calibration.field must name the text field of each JSON line"),
    ("calibration-device", lambda p: {"calibration": {"source": "/dev/null"}},
     "calibration.source: /dev/null: not a regular file (a character device)"),
    ("extra-missing", lambda p: {"evaluate": {"extra": ["licenses", str(p["root"] / "other.txt")]}},
     "evaluate.extra.1: '{root}/other.txt': no such file or folder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_paths_naming_the_field(paths, case):
    _id, fields, expected = case
    res = _validate(_recipe(paths["root"], **fields(paths)))
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and expected.format(root=paths["root"]) in res.output, res.output


def test_override_is_checked_and_disabled_evaluation_is_not(paths):
    recipe = _recipe(paths["root"])
    gone = f"evaluate.extra=[{paths['root'] / 'gone.txt'}]"
    res = _validate(recipe, "--set", gone)
    assert res.exit_code == 2 and "evaluate.extra.0: " in res.output, res.output
    # texts that are never read are not checked: evaluation off
    res = _validate(recipe, "--set", gone, "--set", "evaluate.enabled=false")
    assert res.exit_code == 0, res.output


def test_api_validate_raises_input_error(paths):
    with pytest.raises(InputError, match=r"^calibration\.source: 'typo\.txt': no such file or folder"):
        api.validate({**RECIPE, "calibration": {"source": "typo.txt"}})


@pytest.fixture
def model_calls(monkeypatch) -> list[str]:
    """Stand-ins for the model fetch and load that record each call and refuse (so no test loads a model)."""
    calls: list[str] = []

    def resolve(name):
        calls.append(f"resolve {name}")
        raise InputError("stand-in: resolve_model reached")

    def load(*args, **kwargs):
        calls.append("load")
        pytest.fail("the model was loaded")

    monkeypatch.setattr(pipeline, "resolve_model", resolve)
    monkeypatch.setattr(pipeline, "load_model", load)
    return calls


def test_run_refuses_a_calibration_typo_before_the_model_is_fetched(paths, model_calls):
    out = paths["root"] / "art"
    recipe = _recipe(paths["root"], calibration={"source": str(paths["root"] / "notse.txt")})  # the packaged model
    res = CliRunner().invoke(cli, ["run", recipe, "--out", str(out)])
    assert res.exit_code == 2 and "calibration.source: " in res.output and "notse.txt" in res.output, res.output
    assert model_calls == [] and not out.exists()
    # the same recipe with the typo fixed reaches the model (so the stand-ins above are where the run fetches it)
    res = CliRunner().invoke(cli, ["run", recipe, "--out", str(out), "--set", "calibration.source=pydoc"])
    assert res.exit_code == 2 and "stand-in: resolve_model reached" in res.output, res.output
    assert model_calls == ["resolve smollm2-135m"]


class _Ran:
    def __init__(self, recipe):
        self.recipe = recipe

    def __str__(self) -> str:
        return f"ran {self.recipe.name} target {self.recipe.passes[0].target}"


@pytest.mark.parametrize("form", [["R"], ["--recipe", "R"], ["-r", "R"], ["R", "--recipe", "R"]])
def test_both_commands_take_the_recipe_either_way(paths, monkeypatch, form):
    monkeypatch.setattr(pipeline, "run", lambda recipe, **kw: _Ran(recipe))
    recipe = _recipe(paths["root"])
    args = [recipe if a == "R" else a for a in form]
    res = CliRunner().invoke(cli, ["run", *args, "--set", "passes.0.target=0.2"])
    assert (res.exit_code, res.output) == (0, "ran t target 0.2\n")
    res = CliRunner().invoke(cli, ["validate", *args, "--set", "passes.0.target=0.2"])
    assert res.exit_code == 0 and res.output.startswith(f"{recipe}: OK\n") and "target: 0.2" in res.output


@pytest.mark.parametrize("command", ["run", "validate"])
def test_no_recipe_or_two_recipes_is_a_usage_error(paths, command):
    res = CliRunner().invoke(cli, [command])
    assert res.exit_code == 2 and "missing the recipe: give it as RECIPE or --recipe RECIPE" in res.output
    res = CliRunner().invoke(cli, [command, "a.yaml", "--recipe", "b.yaml"])
    assert res.exit_code == 2 and "two recipes given, a.yaml and --recipe b.yaml: give one" in res.output
