"""Memory and time of the whole-model KL score that the searches (Tyr, quantization evolution) call hundreds of times.

    python benchmarks/kl_memory.py [--windows 6] [--threads 2]

Today's `TailKL` configured as it used to work (every block's dense inputs cached, the head and the KL over a whole
batch at once: the former layout, not the former code) against keeping only the first block's inputs and running
the head and the KL in chunks of positions; each configuration in its own process on the packaged default model
(49k vocabulary), `--windows` x 256 calibration tokens in one batch of 8, as an evolution stage scores them. Peaks
are measured separately while building and while scoring a perturbed model `--repeats` times (Linux VmHWM, reset
before each phase), above the resident memory before building. Writes docs/results/kl_memory.{json,md}.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from _harness import benchmark_args, default_setup, handled_alone, run_each, write_results

CONFIGS = {  # label: (any_start, chunk_tokens); a chunk larger than the batch is the whole batch at once
    "every block, whole batch (former layout)": (True, 1 << 30),
    "first block, whole batch": (False, 1 << 30),
    "first block, chunks of 512": (False, 512),
    "first block, chunks of 256": (False, 256),
    "first block, chunks of 128 (default)": (False, 128),
    "first block, chunks of 32": (False, 32),
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM (peak resident) restarts from the current VmRSS
        f.write("5")


def run_one(label: str, args) -> dict:
    import torch

    from compress.search.scoring import TailKL
    from compress.models import llama

    _, model, calib, _ = default_setup(args.windows, 1, args.threads)
    windows = calib[: args.windows]
    any_start, chunk = CONFIGS[label]
    base = _status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    tail = TailKL(model, windows, batch_size=8, any_start=any_start, chunk_tokens=chunk)
    build = time.perf_counter() - t0
    build_peak, held = _status_mb("VmHWM") - base, _status_mb("VmRSS") - base
    with torch.no_grad():
        llama.blocks(model)[3].mlp.down_proj.weight.mul_(0.8)
    times, kl = [], None
    _reset_peak()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        kl = tail.kl_from(0)
        times.append(time.perf_counter() - t0)
    score_peak = _status_mb("VmHWM") - base
    return {"config": label, "held MB": round(held), "build peak MB": round(build_peak),
            "score peak MB": round(score_peak), "build s": round(build, 2),
            "s per score": round(statistics.median(times), 3), "min s": round(min(times), 3), "KL": f"{kl:.9f}"}


def main() -> None:
    ap = benchmark_args(__doc__, "kl_memory")
    ap.set_defaults(windows=6)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    if handled_alone(args, run_one, None):
        return
    labels = list(CONFIGS) if args.methods == ["all"] else args.methods
    rows = run_each(__file__, labels, args, extra_args=["--repeats", str(args.repeats)])
    write_results(Path(args.out), "Whole-model KL score: memory and time", __file__, {
        "model": "packaged default (SmolLM2-135M, vocabulary 49152), fp32",
        "tokens": f"{args.windows} x 256 calibration windows, batch 8", "threads": args.threads,
        "held MB": "resident memory after building the scorer, above what was resident before (cached inputs, reference log-probabilities, and what the allocator keeps of freed temporaries)",
        "build peak MB / score peak MB": "peak resident memory above the same base while building / while scoring",
        "s per score": f"median of {args.repeats} kl_from(0) calls (min s: the fastest)"}, rows)


if __name__ == "__main__":
    main()
