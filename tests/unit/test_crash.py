"""A `compress run` killed at every step of the writer leaves --out holding a complete verified artifact (old or new)
or nothing, and the next run cleans up after it (tests/unit/crash_driver.py does the killing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crashes(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    results = root / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.unit.crash_driver", str(tiny_llama), str(root), str(results)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("scenario", ["fresh", "exchange", "two-renames"])
def test_every_kill_leaves_old_or_new_or_nothing(crashes, scenario):
    found = crashes[scenario]
    steps, runs = found["steps"], found["runs"]
    assert len(steps) >= 12, steps  # folder, config, weights, tokenizer, recipe, plan, manifest, report, card, ...
    assert ("exchanged" in steps) == (scenario == "exchange")
    assert ("moved the old artifact aside" in steps) == (scenario == "two-renames")
    killed = [r for r in runs if r["kill_at"]]
    first_kill = steps.index("synced") + 1 if scenario == "two-renames" else 1
    assert [r["kill_at"] for r in killed] == list(range(first_kill, len(steps) + 1))
    for run in runs:
        assert run["killed"] == bool(run["kill_at"]), run
        if not run["kill_at"]:
            assert run["exit"] == 0, run["output_tail"]
    for before, run in zip(runs, runs[1:]):
        where = f"{scenario}, killed at step {run['kill_at']} ({run['steps'][-1] if run['steps'] else '-'})"
        if run["exists"]:
            assert run["problems"] == [], where
            assert run["target"] in (run["wrote"], run.get("held_before", before.get("target"))), where
        elif scenario == "two-renames":  # only between the two renames, with the old artifact beside it
            assert run["steps"][-1] == "moved the old artifact aside", where
            assert any(".old-" in b for b in run["beside"]), where
        else:
            assert scenario == "fresh", where
        # what earlier (dead) runs left beside --out is gone: only this run's own temporary folder may remain
        assert all(str(run["pid"]) in b for b in run["beside"]), (where, run["beside"])
        if run["kill_at"] and run["steps"][-1] == "renamed into place":
            assert run["target"] == run["wrote"], where
    last = runs[-1]
    assert last["exists"] and last["problems"] == [] and last["beside"] == [], last
    assert last["target"] == last["wrote"]


def test_an_interrupted_two_rename_commit_is_restored_and_said(crashes):
    runs = crashes["two-renames"]["runs"]
    i = next(i for i, r in enumerate(runs) if r["kill_at"] and r["steps"][-1] == "moved the old artifact aside")
    assert not runs[i]["exists"]
    assert any("restored" in n and f"process {runs[i]['pid']}" in n for n in runs[i + 1]["notes"]), runs[i + 1]["notes"]
    assert runs[i + 1]["held_before"] is None


def test_kills_before_the_commit_leave_no_leftover_after_the_next_run(crashes):
    runs = crashes["exchange"]["runs"]
    with_tmp = [i for i, r in enumerate(runs[:-1]) if any(".tmp-" in b for b in r["beside"])]
    assert with_tmp  # the kills did leave temporary folders behind ...
    for i in with_tmp:  # ... and the run after each removed them and said so
        assert any(f"process {runs[i]['pid']}" in n for n in runs[i + 1]["notes"]), runs[i + 1]["notes"]
