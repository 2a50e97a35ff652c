"""The docs tier: every unmarked bash and python block of README.md and docs/**/*.md runs as written, in reading
order (README first, then docs/ sorted; python blocks share one namespace per page), in a copy of the repository as
a fresh clone lays it out (the working tree's tracked and unignored files, committed once so git commands work),
with this test's venv standing for the README's venv and pip-install steps (tests/docs/driver.py). README's first
command is the main job (minutes); later blocks use its artifact. Marked `integration` (it is not fast) and `docs`
(`pytest -m docs` runs it alone); it runs after the integration tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, all_blocks
from tests.docs.driver import without_setup

PAGE_TIMEOUT_S = 3600  # README: the main job and the Python example's run, several minutes each on 2 cores


def _fresh_copy(dest: Path) -> Path:
    """The files a clone of the working tree would hold (tracked and untracked-but-not-ignored), as one commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a file deleted but not yet committed is listed, and skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    git = ["git", "-c", "user.name=docs-test", "-c", "user.email=docs-test@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "fresh clone"]):
        subprocess.run([*git, *args], cwd=dest, check=True)
    return dest


def test_without_setup_keeps_everything_else():
    script, dropped = without_setup(
        "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && compress run -r x\n"
        "compress inspect a   # a comment && more\n")
    assert script == "compress run -r x\ncompress inspect a   # a comment && more\n"
    assert dropped == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -c constraints.txt -e ."]


def _drive(tmp_path: Path, blocks: list[dict]) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"page": "p.md", **b} for b in blocks]))
    return subprocess.run([sys.executable, "-m", "tests.docs.driver", str(spec)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_driver_shares_one_namespace_and_stops_at_the_first_failure(tmp_path):
    ok = _drive(tmp_path, [{"line": 1, "lang": "python", "text": "x = 2\n"},
                           {"line": 5, "lang": "bash", "text": "test \"$(echo 2)\" = 2\n"},
                           {"line": 9, "lang": "python", "text": "assert x == 2\n"}])
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["== p.md:1 (python)", "== p.md:5 (bash)",
                                                             "== p.md:9 (python)"], ok.stdout + ok.stderr
    for failing in ("false\necho not reached\n", "false | true\n"):  # -e and pipefail
        bad = _drive(tmp_path, [{"line": 3, "lang": "bash", "text": failing},
                                {"line": 7, "lang": "python", "text": "print('not reached')\n"}])
        assert bad.returncode == 1 and bad.stdout.splitlines() == ["== p.md:3 (bash)", "FAILED p.md:3"], bad.stdout
    bad = _drive(tmp_path, [{"line": 2, "lang": "python", "text": "import sys\nsys.exit(0)\n"}])
    assert bad.returncode == 1 and "FAILED p.md:2" in bad.stdout and "SystemExit" in bad.stderr


@pytest.mark.integration
@pytest.mark.docs
def test_every_unmarked_block_runs_as_written(tmp_path):
    blocks, _ = all_blocks()
    runnable = [b for b in blocks if b.skip is None and b.lang in ("bash", "python")]
    assert any(b.page == "README.md" and "compress run --recipe recipes/llama-30pct.yaml" in b.text for b in runnable)
    repo = _fresh_copy(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(Path(sys.executable).parents[1]), "PYTHONUNBUFFERED": "1"}
    failures = []
    for page in dict.fromkeys(b.page for b in runnable):  # reading order, each page once
        spec = tmp_path / f"{page.replace('/', '_')}.json"
        spec.write_text(json.dumps([b.__dict__ for b in runnable if b.page == page]))
        log = tmp_path / f"{page.replace('/', '_')}.log"
        with log.open("w") as out:
            rc = subprocess.run([sys.executable, "-m", "tests.docs.driver", str(spec)], cwd=repo, env=env,
                                stdout=out, stderr=subprocess.STDOUT, timeout=PAGE_TIMEOUT_S).returncode
        if rc != 0:
            failures.append(f"{page} (exit {rc}), the end of its output:\n" + log.read_text()[-3000:])
    assert failures == [], "\n\n".join(failures)
