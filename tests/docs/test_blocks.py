"""Fast tier: the docs-test markers are well formed, every unmarked block is a kind the docs tests run, every yaml
block is a recipe or a list of passes that validates (pass by pass; as one recipe when it shows a correction after
the pass it corrects), and every recipe a block names validates. The blocks
themselves run in test_run_blocks.py (the docs tier)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from compress import api
from compress.errors import InputError
from tests.docs.blocks import ROOT, RUNS, all_blocks, parse

BLOCKS, PROBLEMS = all_blocks()
YAML = [b for b in BLOCKS if b.lang == "yaml" and b.skip is None]
RECIPE = re.compile(r"\brecipes/[\w.-]+\.ya?ml\b")


def test_markers_are_well_formed():
    assert PROBLEMS == []


def test_every_unmarked_block_runs():
    assert [f"{b.where}: a {b.lang or 'plain'} block: mark it" for b in BLOCKS
            if b.skip is None and b.lang not in RUNS] == []


def test_parse_reads_markers_and_refuses_bad_ones():
    text = ("<!-- docs-test: skip (takes an hour) -->\n\n```bash\nsleep 3600\n```\n"
            "```python\nx = 1\n```\n"
            "<!-- docs-test: skip -->\n```bash\nfalse\n```\n"
            "<!-- docs-test: skip () -->\n```\n```\n"
            "<!-- docs-test: run -->\n```yaml\na: 1\n```\n"
            "<!-- docs-test: skip (nothing under it) -->\nsome prose\n"
            "  ```bash\n~~~\n"
            "```json\n{}\n")
    blocks, problems = parse(text, "p.md")
    assert [(b.line, b.lang, b.text, b.skip) for b in blocks] == [
        (3, "bash", "sleep 3600\n", "takes an hour"), (6, "python", "x = 1\n", None),
        (10, "bash", "false\n", "(marker without a reason)"), (14, "", "\n", "(marker without a reason)"),
        (17, "yaml", "a: 1\n", "(marker without a reason)")]
    assert problems == [
        "p.md:9: 'skip': a docs-test marker is 'skip (<reason>)', with a reason",
        "p.md:13: 'skip ()': a docs-test marker is 'skip (<reason>)', with a reason",
        "p.md:16: 'run': a docs-test marker is 'skip (<reason>)', with a reason",
        "p.md:20: docs-test marker with no code block under it",
        "p.md:22: an indented or ~~~ fence: start code blocks with ``` at column 0",
        "p.md:23: an indented or ~~~ fence: start code blocks with ``` at column 0",
        "p.md:24: code block never closed"]


def _check_yaml(text: str) -> None:
    """A whole recipe (a mapping with passes) validates as it is, local paths included; a list of passes validates
    pass by pass, each as the only pass of a recipe on the packaged default model (a list with a lora pass, which
    needs the pass it corrects before it: as one recipe)."""
    data = yaml.safe_load(text)
    if isinstance(data, dict) and "passes" in data:
        api.validate(data)
    elif isinstance(data, list) and data and all(isinstance(p, dict) and "pass" in p for p in data):
        if any(p["pass"] == "lora" for p in data):  # a correction is shown after the pass it corrects
            api.validate({"name": "docs", "passes": data})
            return
        for i, p in enumerate(data):
            try:
                api.validate({"name": "docs", "passes": [p]})
            except InputError as err:
                raise InputError(f"item {i}: {err}") from None
    else:
        raise InputError("neither a recipe (a mapping with passes) nor a list of passes: mark it")


@pytest.mark.parametrize("block", YAML, ids=[b.where for b in YAML])
def test_yaml_block_validates(block):
    _check_yaml(block.text)


def test_a_wrong_yaml_block_fails():
    with pytest.raises(InputError, match=r"^item 1: recipe: passes\.0\.strength: unknown key$"):
        _check_yaml("- pass: flap\n  target: 0.3\n- pass: flap\n  target: 0.3\n  strength: 2\n")
    with pytest.raises(InputError, match="neither a recipe"):
        _check_yaml("bits: {average: 3.0}\n")


def test_recipes_named_in_blocks_validate():
    """Skipped blocks included: a renamed or broken recipe fails here even where its run is too long for CI."""
    named = sorted({r for b in BLOCKS for r in RECIPE.findall(b.text)})
    assert "recipes/llama-30pct.yaml" in named
    for name in named:
        assert (ROOT / name).is_file(), name
        api.validate(ROOT / name)


def test_docs_tier_is_collected_after_the_integration_tier():
    """Named first on the command line, the docs tier still runs after the integration tier and the fast tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/docs/test_run_blocks.py", "tests/integration", "tests/unit/test_knapsack.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    tiers = [2 if "test_every_unmarked_block_runs_as_written" in i else i.startswith("tests/integration/") for i in ids]
    assert tiers[-1] == 2 and 1 in tiers and 0 in tiers and tiers == sorted(tiers), ids
