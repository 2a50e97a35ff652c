"""Peak resident memory and time of `compress run` against depth and width, on synthetic Llama checkpoints (issue 16).

    OMP_NUM_THREADS=2 python benchmarks/scale.py                       # every row; docs/results/scale.{json,md,png}
    python benchmarks/scale.py --rows gptq-w4/L16-H256 --execution stream   # one row, the streamed path

Models: random weights of a real Llama architecture (compress.models.synthetic, bfloat16 shards, the default model's
tokenizer and 49152-token vocabulary, tied embeddings), head_dim 64, hidden/64 query heads in hidden/128 key-value
groups, MLP 3 x hidden; depth 16, 64, 256 at hidden 256, width 256, 512, 1024 at 16 layers. Recipes: GPTQ 4-bit
(groups of 64, act_order, static groups, damp 0.1, as llama-w4) and FLAP 30% (uniform, wifv, compensated, as
llama-30pct-uniform), each on 16 calibration windows of 128 tokens of pydoc, evaluation on 2 held-out windows of 128
tokens with no extra text and no prompts (the rows measure compression, not evaluation).

Each row is one `compress run` in its own process; its peak is report.json's peak_memory_mb (VmHWM of that run) and
its time the run's own `seconds`. Rows are cached in ~/.cache/compress/scale/rows.json (keyed by their settings),
the synthetic models in ~/.cache/compress/scale/models/, so an interrupted run resumes; --fresh recomputes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
PASSES = {
    "gptq-w4": {"pass": "gptq", "bits": 4, "group_size": 64, "sym": True, "act_order": True, "static_groups": True,
                "damp": 0.1},
    "flap-30": {"pass": "flap", "target": 0.30, "metric": "wifv", "structure": "uniform", "round_to": 8,
                "compensate": True},
}


# named shapes beyond the sweeps, run only when asked for (--rows): one block of a real model's widths, for the
# per-block figures of docs/scale.md; (layers, hidden, intermediate, heads, kv_heads, head_dim)
BLOCKS = {"llama3-8b-block": (1, 4096, 14336, 32, 8, 128)}


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


def run_row(method: str, label: str, shape: tuple[int, int, int, int, int, int], execution: str | None,
            threads: int) -> dict:
    """One `compress run` of `method` on the model of `shape` in a fresh process; its row."""
    folder = model_folder(label, shape)
    layers, hidden = shape[:2]
    recipe = {"name": f"scale-{method}", "model": str(folder), "seed": 0, "calibration": CALIB,
              "passes": [PASSES[method]], "evaluate": EVALUATE, **({"execution": execution} if execution else {})}
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
    ap.add_argument("--fresh", action="store_true", help="recompute cached rows")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scale"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text())["rows"], out.with_suffix(".png"))
        return
    cache_file = CACHE / "rows.json"
    cached = {} if args.fresh or not cache_file.exists() else json.loads(cache_file.read_text())
    named = {**shapes(), **BLOCKS}
    labels = [f"{m}/{s}" for m in PASSES for s in shapes()]
    wanted = labels if args.rows == ["all"] else args.rows
    if unknown := sorted(w for w in wanted if w.partition("/")[::2] not in {(m, s) for m in PASSES for s in named}):
        raise SystemExit(f"unknown rows {unknown}; rows: {labels} and {[f'gptq-w4/{b}' for b in BLOCKS]}")
    for label in wanted:
        key = f"{label}/{args.execution or 'default'}/t{args.threads}"
        if key not in cached:
            method, shape = label.split("/")
            cached[key] = run_row(method, shape, named[shape], args.execution, args.threads)
            CACHE.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cached, indent=1))
        print(json.dumps(cached[key]), flush=True)
    rows = [r for k, r in cached.items() if k.endswith(f"/t{args.threads}")]
    rows.sort(key=lambda r: (r["recipe"], r["execution"], r["hidden"] != WIDTH, r["layers"], r["hidden"]))
    meta = {"models": f"synthetic Llama, bfloat16 shards, head_dim {HEAD_DIM}, MLP 3 x hidden, vocab 49152 tied",
            "calibration": f"{CALIB['windows']} x {CALIB['seq_len']} tokens of pydoc",
            "evaluate": f"{EVALUATE['max_windows']} x {EVALUATE['seq_len']} held-out tokens, no extra text or prompts",
            "threads": args.threads, "peak": "report.json peak_memory_mb (VmHWM of the run, one process per row)"}
    write_results(out, "Peak memory and time of compress run against depth and width", __file__, meta, rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
