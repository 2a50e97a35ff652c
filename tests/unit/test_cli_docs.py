"""What a newcomer reads and runs first: links and anchors in README and docs/ resolve, the README's commands are the
ones CI runs and install the pinned versions, the pins lie within the declared ranges, and the integration tier runs
after every other test."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text("utf-8"))
    slugs = [_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)]
    return {s if not i else f"{s}-{i}" for n, s in enumerate(slugs) for i in [slugs[:n].count(s)]}


def test_slug_follows_github():
    assert _slug("Quantization on SmolLM2-135M: round-to-nearest, GPTQ and mixed precision") == (
        "quantization-on-smollm2-135m-round-to-nearest-gptq-and-mixed-precision")
    assert _slug("GPTQ, as implemented (`compress/ops/gptq.py`)") == "gptq-as-implemented-compressopsgptqpy"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text("utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert broken == []


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def test_readme_commands_are_cis_and_install_with_the_constraints():
    setup, tests = _bash_blocks((ROOT / "README.md").read_text("utf-8"))[:2]
    ci = (ROOT / ".ci" / "run").read_text("utf-8").strip().splitlines()[-1]
    assert tests == ci
    for command in (setup, tests):
        assert " pip install " in command and " -c constraints.txt -e " in command, command
    assert setup.endswith("compress run --recipe recipes/llama-30pct.yaml")


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    return pins


def test_pins_lie_within_the_declared_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    assert {"torch", "transformers", "gptqmodel", "compressed-tensors"} <= pins.keys()
    outside = [f"{r}: pinned {pins[r.name.lower()]}" for r in declared
               if r.name.lower() in pins and not r.specifier.contains(pins[r.name.lower()], prereleases=True)]
    assert outside == []
    torch = next(r for r in declared if r.name == "torch")
    assert "==" not in str(torch.specifier)
    assert [torch.specifier.contains(v) for v in ("2.5.1", "2.6.0", "2.13.0", "3.0")] == [False, True, True, False]


def test_integration_tier_is_collected_last():
    """Named first on the command line, the integration tests still run after the unit tests (conftest's order)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/integration", "tests/unit/test_knapsack.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    tiers = [line.startswith("tests/integration/") for line in ids]
    assert any(tiers) and not all(tiers) and tiers == sorted(tiers), ids
