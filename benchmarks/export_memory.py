"""Memory that export.write takes on top of the model, storing the packaged default model as bfloat16.

    OMP_NUM_THREADS=2 python benchmarks/export_memory.py      # about a minute; docs/results/export_memory.{json,md}

SmolLM2-135M as the pipeline holds it (float32; no pass, so every weight is stored) is written with
`export.dtype: bfloat16` (each stored tensor is a new bf16 copy), three ways, each in its own process, once:
- `stream, 2000 MB shards`: the writer as it is, at the recipe's default shard size (the whole model is one shard);
- `stream, 50 MB shards`: the same writer, smaller shards;
- `one-shot, 2000 MB / 50 MB shards`: the former behaviour, every stored tensor made before the first shard is
  written (emulated by materializing the writer's input stream into a list; the one-shot writer itself is gone).
A thread samples the process's resident memory (psutil) every 2 ms from just before export.write to its end; the
row gives its peak above the resident memory just before (the model and everything loaded; freed heap memory is
first handed back with glibc's malloc_trim, so that reused pages do not hide new allocations), and the stored
weights' size. The check callback (reload and compare, in a run) is left out: this measures the writing alone.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import write_results  # noqa: E402

VARIANTS = {"stream, 2000 MB shards": (False, 2000), "stream, 50 MB shards": (False, 50),
            "one-shot, 2000 MB shards": (True, 2000), "one-shot, 50 MB shards": (True, 50)}
# label: (materialize the writer's input stream first, shard MB)
SAMPLE_S = 0.002


class PeakRss:
    """Peak resident bytes of this process while the block runs, sampled by a thread every SAMPLE_S seconds."""

    def __enter__(self) -> PeakRss:
        import psutil

        self.proc = psutil.Process()
        self.before = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def one(label: str) -> dict:
    """Write the default model as bf16 the `label` way in this process; its row."""
    import torch

    import export
    from compress.models import llama, load_model, resolve_model
    from compress.pipeline import _module_tensors
    from compress.plan import Plan

    write_module = sys.modules["export.write"]  # the module (the name `export.write` is its function)
    one_shot, shard_mb = VARIANTS[label]
    source = resolve_model("smollm2-135m")
    model, _ = load_model(source)
    plan = Plan.of(model)
    settings = export.ExportSettings(dtype=torch.bfloat16, quant_format="compressed-tensors",
                                     shard_bytes=shard_mb * 2**20, remote_code=False)
    provenance = export.Provenance(folder=source.path, source={"name": "smollm2-135m", "identity": "smollm2-135m",
                                                               "path": str(source.path)},
                                   config=llama.as_causal_lm(model).config.to_dict(), recipe={"name": "bench"},
                                   recipe_yaml="name: bench\n", seed=0)
    streamed = write_module._stored_tensors
    if one_shot:  # every stored tensor exists before the writer sees the first one
        vars(write_module)["_stored_tensors"] = lambda *a, **k: iter(list(streamed(*a, **k)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "art"
        gc.collect()
        if sys.platform == "linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        t0 = time.perf_counter()
        with PeakRss() as rss:
            export.write(out, _module_tensors(model), plan, {}, provenance, settings, check=lambda folder: {},
                         card=lambda rep: "card\n")
        seconds = time.perf_counter() - t0
        stored = export.weights_bytes(out)
        shards = len(list(out.glob("*.safetensors")))
    return {"writer": label, "shards": shards, "stored MB": round(stored / 2**20, 1),
            "model in memory MB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
            "RSS before MB": round(rss.before / 2**20, 1), "peak above MB": round((rss.peak - rss.before) / 2**20, 1),
            "peak above / stored": round((rss.peak - rss.before) / stored, 2), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "export_memory"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    rows = []
    for label in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", label], capture_output=True, text=True, env=env,
                              cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": "smollm2-135m, float32 in memory, stored as bfloat16, no pass", "threads": args.threads,
            "measure": f"resident memory sampled every {SAMPLE_S * 1000:.0f} ms (psutil), peak during export.write "
                       "minus just before; one run each, own process; check callback left out"}
    out = Path(args.out)
    write_results(out, "Memory export.write takes above the model (SmolLM2-135M, bf16 export)", __file__, meta, rows)
    peak = {r["writer"]: r["peak above MB"] for r in rows}
    stored = rows[0]["stored MB"]
    reading = (f"\n## Reading\n\nThe streaming writer holds about one shard: at 50 MB shards, writing takes "
               f"{peak['stream, 50 MB shards']} MB above the model, against {peak['one-shot, 50 MB shards']} MB when "
               f"every stored tensor is made first (the former one-shot behaviour), about the whole bf16 copy "
               f"({stored} MB). At the default shard size (2000 MB) this model is one shard, so the streaming writer "
               f"holds the whole copy too ({peak['stream, 2000 MB shards']} MB): on a machine short of memory, lower "
               "`export.shard_size_mb`.\n")
    with out.with_suffix(".md").open("a") as f:
        f.write(reading)


if __name__ == "__main__":
    main()
