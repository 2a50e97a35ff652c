"""Memory and time of the whole-model KL score that the searches (Tyr, quantization evolution) call hundreds of times.

    python benchmarks/kl_memory.py [--windows 6] [--threads 2]

`TailKL` as it was (every block's dense inputs cached, the head and the KL over a whole batch at once) against
keeping only the first block's inputs and running the head and the KL in chunks of positions; each configuration in
its own process on the packaged default model (49k vocabulary), `--windows` x 256 calibration tokens in one batch of
8, as an evolution stage scores them. Scores a perturbed model 5 times. Writes docs/results/kl_memory.{json,md}.
"""

from __future__ import annotations

import resource
import time

from _harness import benchmark_args, default_setup, handled_alone, run_each, write_results

CONFIGS = {  # label: (any_start, chunk_tokens); a chunk larger than the batch is the whole batch at once
    "every block, whole batch (before)": (True, 1 << 30),
    "first block, whole batch": (False, 1 << 30),
    "first block, chunks of 512": (False, 512),
    "first block, chunks of 256": (False, 256),
    "first block, chunks of 128 (default)": (False, 128),
    "first block, chunks of 32": (False, 32),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(label: str, args) -> dict:
    import torch

    from compress.evaluate import TailKL
    from compress.models import llama

    _, model, calib, _ = default_setup(args.windows, 1, args.threads)
    windows = calib[: args.windows]
    any_start, chunk = CONFIGS[label]
    base = _rss_mb()
    t0 = time.perf_counter()
    tail = TailKL(model, windows, batch_size=8, any_start=any_start, chunk_tokens=chunk)
    build = time.perf_counter() - t0
    held = _rss_mb() - base
    with torch.no_grad():
        llama.blocks(model)[3].mlp.down_proj.weight.mul_(0.8)
    times, kl = [], None
    for _ in range(5):
        t0 = time.perf_counter()
        kl = tail.kl_from(0)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"config": label, "held MB": round(held), "peak over model MB": round(peak), "build s": round(build, 2),
            "s per score": round(sorted(times)[2], 3), "KL": f"{kl:.9f}"}


def main() -> None:
    ap = benchmark_args(__doc__, "kl_memory")
    ap.set_defaults(windows=6)
    args = ap.parse_args()
    if handled_alone(args, run_one, None):
        return
    labels = list(CONFIGS) if args.methods == ["all"] else args.methods
    rows = run_each(__file__, labels, args)
    write_results(__import__("pathlib").Path(args.out), "Whole-model KL score: memory and time", __file__, {
        "model": "packaged default (SmolLM2-135M, vocabulary 49152), fp32",
        "tokens": f"{args.windows} x 256 calibration windows, batch 8", "threads": args.threads,
        "held MB": "resident memory after building the scorer, above the loaded model (cached inputs, reference log-probabilities, and what the allocator keeps of freed temporaries)",
        "peak over model MB": "peak resident memory above the loaded model, building and 5 scores",
        "s per score": "median of 5 kl_from(0) calls"}, rows)


if __name__ == "__main__":
    main()
