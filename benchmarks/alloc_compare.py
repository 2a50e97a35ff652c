"""Bit allocation compared at equal budgets on the packaged default model: one run, same calibration windows.

    python benchmarks/alloc_compare.py [--methods all] [--windows 64] [--max-windows 32] [--threads 2]

At an average of 3.0 and 3.5 code bits (GPTQ underneath: group 64, symmetric, act-order with static groups, damp
0.1, as the recipes): uniform widths, LIM-ranked layers (the two widths bracketing the average; at 3.0 that is
uniform, so LIM is also run with [2, 4]), the multiple-choice knapsack over per-group KL, and the evolutionary search
started from it. Each method runs in its own subprocess; the knapsack and evolution share the variant database in
the user cache, so the variants and unit errors are computed once (the first searched method's time includes them).
Writes docs/results/alloc_compare.{json,md} and, with matplotlib, alloc_compare.png (perplexity vs bits per weight).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPTQ = {"pass": "gptq", "group_size": 64, "act_order": True, "static_groups": True, "damp": 0.1}
ALL = [2, 3, 4, 8]
METHODS = {
    "uniform w3": {**GPTQ, "bits": 3},
    "lim 3.0 [2,4]": {**GPTQ, "bits": {"average": 3.0, "choices": [2, 4], "importance": "lim"}},
    "knapsack 3.0": {**GPTQ, "bits": {"average": 3.0, "choices": ALL, "allocator": "knapsack"}},
    "evolution 3.0": {**GPTQ, "bits": {"average": 3.0, "choices": ALL, "allocator": "evolution"}},
    "lim 3.5 [3,4]": {**GPTQ, "bits": {"average": 3.5, "choices": [3, 4], "importance": "lim"}},
    "knapsack 3.5": {**GPTQ, "bits": {"average": 3.5, "choices": ALL, "allocator": "knapsack"}},
    "evolution 3.5": {**GPTQ, "bits": {"average": 3.5, "choices": ALL, "allocator": "evolution"}},
    "uniform w4": {**GPTQ, "bits": 4},
}


def run_one(label: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from calibration.sources import load_corpus, sample_windows, tokenize
    from compress.models import load_model, resolve_model
    from compress.models.default import cache_dir
    from compress.passes import PassContext, make_pass
    from compress.pipeline import EVAL_BATCH, EvalSets
    from compress.plan import Plan
    from compress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "llama-w4.yaml", [f"evaluate.max_windows={args.max_windows}"])
    model, tok = load_model(resolve_model(recipe.model))
    calib = sample_windows(tokenize(tok, load_corpus("pydoc").split("calibration")), args.windows, 256, 0, "calib")
    sets = EvalSets.build(recipe, tok)
    row = {"method": label}
    if label != "dense":
        cfg = load_recipe(recipe, [f"passes.0={json.dumps(METHODS[label])}"]).passes[0]
        plan = Plan()
        t0 = time.perf_counter()
        rep = make_pass(cfg).run(model, PassContext(calibration=calib, plan=plan, batch_size=8, seed=0,
                                                    cache=cache_dir() / "runs"))
        seconds = time.perf_counter() - t0
        n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
        code_bits = sum(q.bits * q.shape[0] * q.shape[1] for q in plan.quantized.values())
        scale_bits = sum(q.scale.numel() * 16 for q in plan.quantized.values())
        s = rep.summary
        widths = sorted({q.bits for q in plan.quantized.values()})
        row.update({"avg bits": round(code_bits / n, 3), "bits/weight": round((code_bits + scale_bits) / n, 3),
                    "widths": "/".join(map(str, widths)), "search s": round(seconds, 1),
                    "evaluations": (s.get("evolution") or {}).get("evaluations", ""),
                    "summed unit KL": (s.get("knapsack") or {}).get("summed_unit_kl", ""),
                    "final KL": (s.get("evolution") or {}).get("final_kl", "")})
    row.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    row["peak MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["all"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "alloc_compare"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text())["rows"], out.with_suffix(".png"))
        return
    labels = ["dense", *METHODS] if args.methods == ["all"] else args.methods
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    for label in labels:
        cmd = [sys.executable, __file__, "--one", label, "--windows", str(args.windows),
               "--max-windows", str(args.max_windows), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    from compress.tables import markdown_table, text_table

    print("\n" + text_table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/alloc_compare.py " + shlex.join(sys.argv[1:]),
            "calibration": f"{args.windows} x 256 tokens, pydoc calibration split, seed 0",
            "perplexity": f"seq_len 256, <= {args.max_windows} windows per text", "threads": args.threads,
            "search s": "pass time; the first searched method includes building the variant database and unit errors",
            "bits/weight": "codes + one 16-bit scale per group of 64"}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(["# Bit allocation compared\n", f"Command: `{meta['command']}`\n",
                                                 *(f"- {k}: {v}" for k, v in meta.items() if k != "command"), "",
                                                 markdown_table(rows), ""]))
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    style = {"uniform": ("s", "tab:gray"), "lim": ("^", "tab:green"), "knapsack": ("o", "tab:blue"),
             "evolution": ("D", "tab:orange")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, [k for k in rows[0] if k.startswith("ppl ")]):
        for r in rows[1:]:
            marker, color = next(v for k, v in style.items() if r["method"].startswith(k))
            ax.scatter(r["bits/weight"], r[key], marker=marker, s=50, color=color, label=r["method"])
        ax.axhline(rows[0][key], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("bits per weight (codes + 16-bit scales)")
        ax.set_ylabel(key)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M, GPTQ group 64 symmetric: bit allocation at equal budgets", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
