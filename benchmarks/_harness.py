"""What the benchmark scripts share: the default model with its calibration windows and held-out texts, one
subprocess per method (so each method's peak memory is its own), and writing the JSON + markdown tables."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_setup(windows: int, max_windows: int, threads: int):
    """(recipe, model, calibration windows (N, 256), evaluation sets) on the packaged default model, as the shipped
    quantization recipes calibrate: `windows` x 256 tokens of the pydoc calibration split, seed 0."""
    import torch

    torch.set_num_threads(threads)
    from calibration.sources import load_corpus, sample_windows, tokenize
    from compress.models import load_model, resolve_model
    from compress.pipeline import EvalSets
    from compress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "llama-w4.yaml", [f"evaluate.max_windows={max_windows}"])
    model, tok = load_model(resolve_model(recipe.model))
    calib = sample_windows(tokenize(tok, load_corpus("pydoc").split("calibration")), windows, 256, 0, "calib")
    return recipe, model, calib, EvalSets.build(recipe, tok)


def quantized_bits(plan) -> dict:
    """Average code bits and bits per weight (codes + one 16-bit scale per group) of the quantized linears."""
    n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
    code_bits = sum(q.bits * q.shape[0] * q.shape[1] for q in plan.quantized.values())
    scale_bits = sum(q.scale.numel() * 16 for q in plan.quantized.values())
    return {"avg bits": round(code_bits / n, 3), "bits/weight": round((code_bits + scale_bits) / n, 3)}


def run_each(script: str, labels: list[str], args, extra_env: dict | None = None) -> list[dict]:
    """Run `script --one LABEL` in a fresh process per label; each prints its row as JSON on its last line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", **(extra_env or {})}
    rows = []
    for label in labels:
        cmd = [sys.executable, script, "--one", label, "--windows", str(args.windows),
               "--max-windows", str(args.max_windows), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(out: Path, title: str, script: str, meta: dict, rows: list[dict]) -> None:
    """Print the table and write OUT.json (meta + rows) and OUT.md (title, the command, meta, table)."""
    from compress.tables import markdown_table, text_table

    print("\n" + text_table(rows))
    meta = {"command": f"python benchmarks/{Path(script).name} " + shlex.join(sys.argv[1:]), **meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join([f"# {title}\n", f"Command: `{meta['command']}`\n",
                                                 *(f"- {k}: {v}" for k, v in meta.items() if k != "command"), "",
                                                 markdown_table(rows), ""]))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return None
    return plt
