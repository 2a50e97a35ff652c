"""A Python caller is told the argument to pass (`overwrite=True`), a command-line user the flag (`--overwrite`):
the same refusal through compress.api and through the CLI, each in its own words."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress import api
from compress.cli import cli
from compress.errors import InputError, RecipeError

RECIPE = {"name": "t", "calibration": {"windows": 4, "seq_len": 32, "batch_size": 4},
          "evaluate": {"enabled": False, "extra": []}, "passes": [{"pass": "flap", "target": 0.3}]}


@pytest.fixture(scope="module")
def made(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    """A recipe file and the artifact it already wrote."""
    root = tmp_path_factory.mktemp("names")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "model": str(tiny_llama)}))
    api.run(recipe, out=root / "art", log=lambda _: None)
    return recipe, root / "art"


def test_existing_output(made):
    recipe, art = made
    with pytest.raises(InputError, match=rf"^output {art} exists; pass overwrite=True to replace it$"):
        api.run(recipe, out=art, log=lambda _: None)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(art)])
    assert res.exit_code == 2 and f"error: output {art} exists; pass --overwrite to replace it\n" in res.output


def test_resume_without_a_journal(made, tmp_path):
    recipe, _ = made
    with pytest.raises(InputError, match=r"^resume=True: no unfinished run of .*; run without resume=True$"):
        api.run(recipe, out=tmp_path / "fresh", resume=True, log=lambda _: None)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "fresh"), "--resume"])
    assert res.exit_code == 2 and "error: --resume: no unfinished run of" in res.output
    assert "run without --resume\n" in res.output and "resume=True" not in res.output


def test_bad_override(made):
    recipe, _ = made
    with pytest.raises(RecipeError, match=r"^overrides 'target': expected KEY=VALUE"):
        api.validate(recipe, overrides=["target"])
    res = CliRunner().invoke(cli, ["validate", str(recipe), "--set", "target"])
    assert res.exit_code == 2 and "error: --set 'target': expected KEY=VALUE" in res.output


def test_the_cli_context_restores_itself():
    with api.command_line():
        with pytest.raises(RecipeError, match=r"^--set 'x'"):
            api.validate({"name": "t", "passes": []}, overrides=["x"])
    with pytest.raises(RecipeError, match=r"^overrides 'x'"):
        api.validate({"name": "t", "passes": []}, overrides=["x"])


def test_chat_without_a_template(made):
    _, art = made  # the tiny tokenizer has no chat template
    with pytest.raises(InputError, match=rf"^chat=True: {art}: "):
        api.generate(art, "def f(x):", max_new_tokens=1, chat=True)
    res = CliRunner().invoke(cli, ["generate", str(art), "--prompt", "def f(x):", "-n", "1", "--chat"])
    assert res.exit_code == 2 and f"error: --chat: {art}: " in res.output, res.output
