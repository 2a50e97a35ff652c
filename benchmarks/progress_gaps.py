"""How long a run goes without saying anything: runs `compress run` on a recipe (the default one unless told), reads
its output (stdout and stderr, tqdm's carriage-return updates included) as it arrives, and reports the longest
silences and what was on screen before each. Issue 13's bar: no gap over 10 s on a quiet machine.

    python benchmarks/progress_gaps.py                       # recipes/llama-30pct.yaml, 2 threads
    python benchmarks/progress_gaps.py --recipe recipes/llama-w4.yaml
    python benchmarks/progress_gaps.py --keep artifacts/llama-30pct  # and keep the artifact (its report, its card)

Writes docs/results/progress_gaps.{json,md}; the model must be fetched already (the first fetch prints a heartbeat
every 5 s, but its time depends on the network)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def timed_output(cmd: list[str], env: dict) -> tuple[list[tuple[float, str]], int]:
    """(seconds since start, piece of output) for every line or carriage-return update the command writes, and its
    exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    assert proc.stdout is not None
    pieces: list[tuple[float, str]] = []
    pending = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.perf_counter() - t0
        parts = re.split(rb"[\r\n]", pending + chunk)
        pending = parts.pop()
        pieces += [(now, ANSI.sub(b"", p).decode("utf-8", "replace").strip()) for p in parts if p.strip()]
    if pending.strip():
        pieces.append((time.perf_counter() - t0, pending.decode("utf-8", "replace").strip()))
    return pieces, proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/llama-30pct.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8, help="longest gaps listed")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "progress_gaps"))
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="write the artifact here (it must not exist) and keep it, instead of a temporary folder")
    args = ap.parse_args()
    from _harness import write_results

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    env.pop("TQDM_DISABLE", None)
    compress = str(Path(sys.executable).with_name("compress"))
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(args.keep) if args.keep else Path(tmp) / "art"
        pieces, rc = timed_output([compress, "run", "--recipe", args.recipe, "--out", str(art)], env)
    if rc != 0:
        print("\n".join(p for _, p in pieces[-20:]))
        raise SystemExit(f"compress run exited {rc}")
    gaps = [(b[0] - a[0], a) for a, b in zip(pieces, pieces[1:], strict=False)]
    gaps.append((0.0, pieces[0]))
    gaps[-1] = (pieces[0][0], (0.0, "(start)"))  # the silence before the first output
    top = sorted(gaps, key=lambda g: -g[0])[: args.top]
    rows = [{"gap s": round(g, 1), "at s": round(t, 1), "on screen before the gap": text[:100]}
            for g, (t, text) in top]
    total = pieces[-1][0]
    write_results(Path(args.out), f"Longest silences of `compress run --recipe {args.recipe}`", __file__,
                  {"threads": args.threads, "run s": round(total, 1), "output pieces": len(pieces),
                   "longest gap s": rows[0]["gap s"], "bar": "no gap over 10 s (issue 13)"}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
