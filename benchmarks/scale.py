"""Peak resident memory and time of `compress run` against depth and width, on synthetic Llama checkpoints (issue 16).

    OMP_NUM_THREADS=2 python benchmarks/scale.py                       # every row; docs/results/scale.{json,md,png}
    python benchmarks/scale.py --rows gptq-w4/L16-H256 --execution stream   # one row, the streamed path
    python benchmarks/scale.py --rows gptq-w4/limit700 --threads 1     # 2.1 GB of float32 weights under 700 MB (root)

Models: random weights of a real Llama architecture (compress.models.synthetic, bfloat16 shards, the default model's
tokenizer and 49152-token vocabulary, tied embeddings), head_dim 64, hidden/64 query heads in hidden/128 key-value
groups, MLP 3 x hidden; depth 16, 64, 256 at hidden 256, width 256, 512, 1024 at 16 layers. Recipes: GPTQ 4-bit
(groups of 64, act_order, static groups, damp 0.1, as llama-w4) and FLAP 30% (uniform, wifv, compensated, as
llama-30pct-uniform), each on 16 calibration windows of 128 tokens of pydoc, evaluation on 2 held-out windows of 128
tokens with no extra text and no prompts (the rows measure compression, not evaluation).

The `limit700` row streams GPTQ 4-bit over a model whose float32 weights are three times a memory limit (168 layers at
hidden 512, 2117 MB; limit 700 MB, a child memory cgroup: see LIMITED), then runs `compress verify` and a load with a
forward of the artifact under the same limit; it adds the cgroup's peak (page cache included) and its OOM kills.

Each row is one `compress run` in its own process; its peak is report.json's peak_memory_mb (VmHWM of that run) and
its time the run's own `seconds`. Rows are cached in ~/.cache/compress/scale/rows.json (keyed by their settings),
the synthetic models in ~/.cache/compress/scale/models/, so an interrupted run resumes; --fresh recomputes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import pyplot, write_results  # noqa: E402

CACHE = Path.home() / ".cache" / "compress" / "scale"
DEPTHS, WIDTH = (16, 64, 256), 256
WIDTHS, DEPTH = (256, 512, 1024), 16
HEAD_DIM = 64
CALIB = {"source": "pydoc", "windows": 16, "seq_len": 128, "batch_size": 8}
EVALUATE = {"seq_len": 128, "max_windows": 2, "extra": [], "prompts": []}
STREAM_EXPORT = {"shard_size_mb": 64}  # streamed rows: the writer holds one shard, else up to 2000 MB (the default)
PASSES = {
    "gptq-w4": {"pass": "gptq", "bits": 4, "group_size": 64, "sym": True, "act_order": True, "static_groups": True,
                "damp": 0.1},
    "flap-30": {"pass": "flap", "target": 0.30, "metric": "wifv", "structure": "uniform", "round_to": 8,
                "compensate": True},
}


# named shapes beyond the sweeps, run only when asked for (--rows): one block of a real model's widths, for the
# per-block figures of docs/scale.md; (layers, hidden, intermediate, heads, kv_heads, head_dim)
BLOCKS = {"llama3-8b-block": (1, 4096, 14336, 32, 8, 128)}
# a model whose float32 weights are three times a memory limit set on the run, run under it (--rows gptq-w4/limit700):
# shape, limit MB. The limit is a child memory cgroup holding the run (cgroup v1 memory.limit_in_bytes, v2
# memory.max; root needed): the kernel's own accounting of what the run touches, page cache included, and what
# compress's fit check reads. prlimit's RLIMIT_AS is not used: it caps address space, which torch and glibc reserve
# far beyond what they touch (a process importing torch maps gigabytes it never uses), so it refuses runs that fit.
LIMITED = {"limit700": ((168, 512, 1536, 8, 4, 64), 700)}  # 2117 MB of float32 weights


def shapes() -> dict[str, tuple[int, int, int, int, int, int]]:
    """Shape label -> (layers, hidden, intermediate, heads, kv_heads, head_dim): the depth sweep, then the width sweep
    (its first point is the depth sweep's)."""
    sweep = [(n, WIDTH) for n in DEPTHS] + [(DEPTH, h) for h in WIDTHS if (DEPTH, h) != (DEPTH, WIDTH)]
    return {f"L{n}-H{h}": (n, h, 3 * h, h // HEAD_DIM, h // (2 * HEAD_DIM), HEAD_DIM) for n, h in sweep}


def model_folder(label: str, shape: tuple[int, int, int, int, int, int]) -> Path:
    """The synthetic checkpoint of this shape, written once (in a child process) and reused."""
    folder = CACHE / "models" / label
    if not (folder / "config.json").exists():
        layers, hidden, intermediate, heads, kv_heads, head_dim = shape
        cmd = [sys.executable, "-m", "compress.models.synthetic", "--layers", str(layers), "--hidden", str(hidden),
               "--intermediate", str(intermediate), "--heads", str(heads), "--kv-heads", str(kv_heads),
               "--head-dim", str(head_dim), str(folder)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return folder


@contextmanager
def memory_cgroup(limit_mb: int) -> Iterator[Path]:
    """A child of this process's memory cgroup limited to `limit_mb` (v1 or v2), removed after; its folder."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [p for _, c, p in (line.split(":", 2) for line in lines) if "memory" in c.split(",")]
    v2 = [p for _, c, p in (line.split(":", 2) for line in lines) if c == ""]
    parent = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") if v1 else Path("/sys/fs/cgroup") / v2[0].lstrip("/")
    folder = parent / f"compress-scale-{os.getpid()}"
    folder.mkdir()
    try:
        (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit_mb * 2**20))
        yield folder
    finally:
        folder.rmdir()


def cgroup_stats(folder: Path) -> dict:
    """Peak charged memory (MB, page cache included) and OOM kills of a memory cgroup (v1 or v2)."""
    if (folder / "memory.max_usage_in_bytes").exists():
        peak = int((folder / "memory.max_usage_in_bytes").read_text())
        ooms = dict(line.split() for line in (folder / "memory.oom_control").read_text().splitlines())
        return {"cgroup peak MB": round(peak / 2**20, 1), "oom kills": int(ooms.get("oom_kill", 0))}
    events = dict(line.split() for line in (folder / "memory.events").read_text().splitlines())
    return {"cgroup peak MB": round(int((folder / "memory.peak").read_text()) / 2**20, 1),
            "oom kills": int(events.get("oom_kill", 0))}


def limited(cmd: list[str], folder: Path, env: dict) -> subprocess.CompletedProcess:
    """`cmd` run inside the cgroup `folder` (the child joins it before exec)."""
    join = f"echo $$ > {shlex.quote(str(folder / 'cgroup.procs'))} && exec {shlex.join(cmd)}"
    return subprocess.run(["sh", "-c", join], capture_output=True, text=True, env=env, cwd=ROOT)


def run_limited(label: str, shape: tuple[int, int, int, int, int, int], limit_mb: int, threads: int) -> dict:
    """`compress run` (GPTQ 4-bit, streamed) of the model of `shape` under a `limit_mb` memory cgroup, then `compress
    verify` of its artifact and a load with a forward (export.load), each under the same limit; its row."""
    folder = model_folder(label, shape)
    recipe = {"name": "scale-limited", "model": str(folder), "seed": 0, "calibration": CALIB,
              "passes": [PASSES["gptq-w4"]], "evaluate": EVALUATE, "execution": "stream", "export": STREAM_EXPORT}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    exe = str(Path(sys.executable).parent / "compress")
    load = ("import sys, torch, export; m = export.load(sys.argv[1]); "
            "print(tuple(m(input_ids=torch.arange(16)[None], use_cache=False).logits.shape))")
    with tempfile.TemporaryDirectory() as tmp, memory_cgroup(limit_mb) as cgroup:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(json.dumps(recipe))
        proc = limited([exe, "run", str(path), "--out", f"{tmp}/art"], cgroup, env)
        stats = cgroup_stats(cgroup)
        if proc.returncode != 0:
            raise SystemExit(f"limited run failed ({stats}):\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "art" / "report.json").read_text())
        verify = limited([exe, "verify", f"{tmp}/art"], cgroup, env)
        loaded = limited([sys.executable, "-c", load, f"{tmp}/art"], cgroup, env)
        stats = cgroup_stats(cgroup)  # the peak of all three
        art_mb = sum(p.stat().st_size for p in (Path(tmp) / "art").glob("*.safetensors")) / 2**20
    params = report["params"]["dense"]
    return {"recipe": "gptq-w4", "layers": shape[0], "hidden": shape[1], "heads": shape[3],
            "params M": round(params / 1e6, 1), "fp32 MB": round(params * 4 / 2**20, 1),
            "execution": report.get("execution", "memory"), "peak MB": report["peak_memory_mb"],
            "peak / fp32": round(report["peak_memory_mb"] / (params * 4 / 2**20), 2),
            "seconds": report["seconds"], "limit MB": limit_mb, **stats,
            "verify": "clean" if verify.returncode == 0 else f"exit {verify.returncode}: {verify.stdout[-200:]}",
            "loads": loaded.stdout.strip() if loaded.returncode == 0 else f"exit {loaded.returncode}",
            "artifact MB": round(art_mb, 1)}


def run_row(method: str, label: str, shape: tuple[int, int, int, int, int, int], execution: str | None,
            threads: int) -> dict:
    """One `compress run` of `method` on the model of `shape` in a fresh process; its row."""
    if label in LIMITED:
        return run_limited(label, shape, LIMITED[label][1], threads)
    folder = model_folder(label, shape)
    layers, hidden = shape[:2]
    recipe = {"name": f"scale-{method}", "model": str(folder), "seed": 0, "calibration": CALIB,
              "passes": [PASSES[method]], "evaluate": EVALUATE, **({"execution": execution} if execution else {}),
              **({"export": STREAM_EXPORT} if execution == "stream" else {})}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        proc = subprocess.run([str(Path(sys.executable).parent / "compress"), "run", str(path), "--out", f"{tmp}/art"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0 or not (Path(tmp) / "art" / "report.json").exists():
            raise SystemExit(f"{method} {label} failed:\n{proc.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "art" / "report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    params = report["params"]["dense"]
    phases = report.get("phases", {})
    passes = sum(v for k, v in phases.items() if k.startswith("passes."))
    return {"recipe": method, "layers": layers, "hidden": hidden, "heads": config["num_attention_heads"],
            "params M": round(params / 1e6, 1), "fp32 MB": round(params * 4 / 2**20, 1),
            "execution": report.get("execution", "memory"), "peak MB": report["peak_memory_mb"],
            "peak / fp32": round(report["peak_memory_mb"] / (params * 4 / 2**20), 2),
            "seconds": report["seconds"], "pass s": round(passes, 1),
            "load s": phases.get("loading the model", phases.get("opening the model (streamed)", 0.0))}


def plot(rows: list[dict], path: Path) -> None:
    """Peak resident memory against depth (left) and against width (right), one line per recipe and execution."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sweeps = [("layers", "hidden", WIDTH), ("hidden", "layers", DEPTH)]
    for ax, (axis, fixed, fixed_value) in zip(axes, sweeps, strict=False):
        for key in sorted({(r["recipe"], r["execution"]) for r in rows}):
            pts = sorted((r[axis], r["peak MB"]) for r in rows
                         if (r["recipe"], r["execution"]) == key and r[fixed] == fixed_value)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=" ".join(key))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{axis} ({fixed} {fixed_value})")
        ax.set_ylabel("peak resident MB")
        ax.legend(fontsize=8)
    fig.suptitle("compress run on synthetic Llama checkpoints: peak resident memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["all"], help="METHOD/L<layers>-H<hidden> labels (default: all)")
    ap.add_argument("--execution", choices=["memory", "stream", "auto"], default=None,
                    help="the recipe's execution field (default: not set, today's path)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="recompute the rows asked for (others stay cached)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scale"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text())["rows"], out.with_suffix(".png"))
        return
    cache_file = CACHE / "rows.json"
    cached = {} if not cache_file.exists() else json.loads(cache_file.read_text())
    named = {**shapes(), **BLOCKS, **{k: shape for k, (shape, _) in LIMITED.items()}}
    labels = [f"{m}/{s}" for m in PASSES for s in shapes()]
    wanted = labels if args.rows == ["all"] else args.rows
    if unknown := sorted(w for w in wanted if w.partition("/")[::2] not in {(m, s) for m in PASSES for s in named}):
        raise SystemExit(f"unknown rows {unknown}; rows: {labels} and {[f'gptq-w4/{b}' for b in [*BLOCKS, *LIMITED]]}")
    for label in wanted:
        key = f"{label}/{args.execution or 'default'}/t{args.threads}"
        if args.fresh or key not in cached:
            method, shape = label.split("/")
            cached[key] = run_row(method, shape, named[shape], args.execution, args.threads)
            CACHE.mkdir(parents=True, exist_ok=True)
            # merged with what another invocation cached meanwhile (rows may run in two processes at once)
            cached = {**(json.loads(cache_file.read_text()) if cache_file.exists() else {}), key: cached[key]}
            cache_file.write_text(json.dumps(cached, indent=1))
        print(json.dumps(cached[key]), flush=True)
    rows = [r for k, r in cached.items() if k.endswith(f"/t{args.threads}")]
    rows.sort(key=lambda r: (r["recipe"], r["execution"], r["hidden"] != WIDTH, r["layers"], r["hidden"]))
    meta = {"models": f"synthetic Llama, bfloat16 shards, head_dim {HEAD_DIM}, MLP 3 x hidden, vocab 49152 tied",
            "calibration": f"{CALIB['windows']} x {CALIB['seq_len']} tokens of pydoc",
            "evaluate": f"{EVALUATE['max_windows']} x {EVALUATE['seq_len']} held-out tokens, no extra text or prompts",
            "threads": args.threads, "streamed rows": f"export.shard_size_mb {STREAM_EXPORT['shard_size_mb']}",
            "peak": "report.json peak_memory_mb (VmHWM of the run, one process per row)"}
    write_results(out, "Peak memory and time of compress run against depth and width", __file__, meta, rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
