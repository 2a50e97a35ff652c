"""Kill `compress run` at every step of the artifact writer and record what is left (driven by test_crash.py).

Run as `python -m tests.unit.crash_driver MODEL ROOT RESULTS.json`. Imports the toolkit once, then forks one real
`compress run` process per run (so each costs the run, not the imports) and SIGKILLs it from inside at the k-th call
of `export.writer.step`. Runs are chained: the run killed at step k+1 is also the rerun after the kill at step k
(it must first clean up or restore what that kill left). Scenarios: `fresh` (no artifact at --out), `exchange`
(an artifact is replaced through the atomic exchange) and `two-renames` (the same where the file system cannot
exchange). After every run the driver records: the child's end (killed or exit code), whether --out exists, what
`export.verify` says of it, which recipe target it holds (old or new), and the temporary folders beside it."""

from __future__ import annotations

import errno
import json
import time
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import yaml

TARGETS = (0.2, 0.3)  # successive runs alternate, so the old and the new artifact can be told apart


def _recipe(root: Path, model: str) -> Path:
    path = root / "crash.yaml"
    path.write_text(yaml.safe_dump({
        "name": "crash", "model": model, "calibration": {"windows": 4, "seq_len": 32, "batch_size": 4},
        "evaluate": {"enabled": False, "extra": []}, "passes": [{"pass": "flap", "target": TARGETS[0]}]}))
    return path


def _state(out: Path) -> dict:
    import export

    state: dict = {"exists": out.exists(), "beside": sorted(p.name for p in out.parent.iterdir()
                                                            if p.name.startswith(f".{out.name}."))}
    if out.exists():
        state["problems"] = export.verify(out)
        try:
            state["target"] = json.loads((out / "manifest.json").read_text())["recipe"]["passes"][0]["target"]
        except (OSError, ValueError, KeyError):
            state["target"] = None
    return state


def _child(args: list[str], kill_at: int, exchange_works: bool, log: Path) -> None:
    """In the forked child: count writer steps, kill this process at step `kill_at` (0: never), run the CLI."""
    import export.writer as writer
    from compress.cli import cli

    count = 0

    def step(name: str) -> None:
        nonlocal count
        count += 1
        with open(log, "a") as f:
            f.write(f"{name}\n")
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "this file system cannot exchange folders")

    writer.step = step
    if not exchange_works:
        writer.exchange = no_exchange
    fd = os.open(log.with_suffix(".out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        cli.main(args, standalone_mode=False)
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_once(root: Path, recipe: Path, out: Path, target: float, kill_at: int, exchange_works: bool) -> dict:
    log = root / f"steps-{os.getpid()}-{len(list(root.glob('steps-*')))}.log"
    args = ["run", "-r", str(recipe), "--out", str(out), "--overwrite", "--set", f"passes.0.target={target}"]
    pid = os.fork()
    if pid == 0:
        _child(args, kill_at, exchange_works, log)
    _, status = os.waitpid(pid, 0)
    steps = log.read_text().splitlines() if log.exists() else []
    output = log.with_suffix(".out").read_text() if log.with_suffix(".out").exists() else ""
    return {"pid": pid, "kill_at": kill_at, "killed": os.WIFSIGNALED(status),
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "steps": steps,
            "notes": [line for line in output.splitlines() if line.startswith("note: ")],
            "output_tail": output[-1500:], "wrote": target, **_state(out)}


def scenario(root: Path, recipe: Path, name: str, with_old: bool, exchange_works: bool) -> dict:
    """Record one clean run's steps, then kill a run at each step in turn, then one clean rerun."""
    out = root / name
    runs = []
    target = TARGETS[0]
    if with_old:  # the old artifact
        runs.append(run_once(root, recipe, out, target, 0, exchange_works))
    target = TARGETS[1] if with_old else TARGETS[0]
    first = run_once(root, recipe, out, target, 0, exchange_works)  # the steps of a run in this scenario
    runs.append(first)
    steps = first["steps"]
    start = steps.index("synced") + 1 if name == "two-renames" else 1  # before the commit it is the exchange case
    for k in range(start, len(steps) + 1):
        if not with_old and out.exists():
            shutil.rmtree(out)  # the fresh case starts from nothing each time
        held = _state(out).get("target")
        target = TARGETS[1] if held == TARGETS[0] else TARGETS[0]
        run = run_once(root, recipe, out, target, k, exchange_works)
        run["held_before"] = held
        runs.append(run)
    last = _state(out).get("target")
    runs.append(run_once(root, recipe, out, TARGETS[1] if last == TARGETS[0] else TARGETS[0], 0, exchange_works))
    return {"steps": steps, "runs": runs}


def main() -> None:
    t0 = time.perf_counter()
    model, root, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    import torch

    torch.set_num_threads(1)
    from compress.cli import cli

    recipe = _recipe(root, model)
    # one run in this process first, so that every lazy import and first-use cost is paid once, before the forks
    cli.main(["run", "-r", str(recipe), "--out", str(root / "warm-up")], standalone_mode=False)
    found = {name: scenario(root, recipe, name, with_old, exchange_works)
             for name, with_old, exchange_works in (("fresh", False, True), ("exchange", True, True),
                                                    ("two-renames", True, False))}
    found["seconds"] = round(time.perf_counter() - t0, 1)
    results.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
