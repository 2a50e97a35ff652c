"""`compress run` in 2 processes x 1 thread (torchrun) against 1 process x 2 threads and 1 x 1 (issue 16 item 3):
wall time, the GPTQ pass's time, rank 0's peak memory, and the weight files' sha256, in one run.

    python benchmarks/distributed.py          # llama-w4, the packaged default model: docs/results/distributed
    python benchmarks/distributed.py --recipe R --set evaluate.enabled=false --out /tmp/d   # another recipe
    python benchmarks/distributed.py --keep ~/.cache/compress/decode_artifacts   # keep the 1 x 2 artifact as llama-w4

Each configuration is one `compress run` of the recipe as shipped, started as a user would start it:
`OMP_NUM_THREADS=T python -m compress.cli run ...` for one process, `OMP_NUM_THREADS=1 python -m torch.distributed.run
--standalone --nproc-per-node 2 -m compress.cli run ...` for two. The GPTQ pass is what the processes share; rank 0
alone evaluates (dense and compressed) and writes, at its one thread. The machine is shared: each row gives the load
average (1 minute) before and after it, which the times are to be read against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import weights_sha256, write_results  # noqa: E402

CONFIGS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
GPTQ_PHASE = "passes.0 gptq"


def run_config(label: str, recipe: str, overrides: list[str], work: Path) -> dict:
    """One `compress run` in `label`'s processes and threads; its row (times in seconds, memory in MB)."""
    procs, threads = CONFIGS[label]
    out = work / label.replace(" ", "-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT),
           "COMPRESS_RUNS": str(work / "runs")}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
    sets = [arg for o in overrides for arg in ("--set", o)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, "-m", "compress.cli", "run", "--recipe", recipe, "--out", str(out),
                           *sets], env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: compress run exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"config": label, "processes": procs, "threads each": threads, "wall s": round(wall, 1),
            "run s": report["seconds"], "gptq s": report["phases"].get(GPTQ_PHASE, ""),
            "rank 0 peak MB": report["peak_memory_mb"], "weights sha256": weights_sha256(out),
            "load before/after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "llama-w4.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "distributed"))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="CONFIG",
                    help=f"the rows to run (default: all of {list(CONFIGS)}); 1 process x 2 threads is the baseline")
    ap.add_argument("--keep", metavar="DIR", help="move the 1 process x 2 threads artifact to DIR/<recipe name> "
                    "(decode_speed's and speculative's --artifacts) instead of deleting it")
    args = ap.parse_args()
    kept = Path(args.keep).expanduser() / Path(args.recipe).stem if args.keep else None
    if kept is not None and kept.exists():
        raise SystemExit(f"--keep: {kept} exists; remove it first")
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        rows = []
        for label in [c for c in CONFIGS if c in args.configs or c == "1 process x 2 threads"]:
            rows.append(run_config(label, args.recipe, args.overrides, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(tmp) / "1-process-x-2-threads", kept)
            print(f"kept the 1 process x 2 threads artifact as {kept}", flush=True)
    base = next(r for r in rows if r["config"] == "1 process x 2 threads")
    for r in rows:
        r["speedup vs 1x2"] = round(base["wall s"] / r["wall s"], 2)
        r["gptq speedup vs 1x2"] = round(base["gptq s"] / r["gptq s"], 2) if r["gptq s"] and base["gptq s"] else ""
        r["same bytes as 1 process"] = r["weights sha256"] == base["weights sha256"]
    meta = {"recipe": f"{Path(args.recipe).name}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""),
            "machine": f"{os.cpu_count()} cores, shared with other jobs (load average per row)",
            "speedup": "wall time of 1 process x 2 threads / this row's; gptq: the same for the GPTQ pass's phase",
            "sha256": "over the artifact's *.safetensors in name order, first 16 hex digits"}
    write_results(Path(args.out), "2 processes x 1 thread against 1 process x 2 threads (compress run, torchrun)",
                  __file__, meta, rows)


if __name__ == "__main__":
    main()
