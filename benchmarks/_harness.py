"""What the benchmark scripts share: the default model with its calibration windows and held-out texts, one
subprocess per method (so each method's peak memory is its own), and writing the JSON + markdown tables."""

from __future__ import annotations

import argparse
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

    # llama-w4's quantizer as these benchmarks measured it: calibrated on pydoc alone, evaluated on pydoc's held-out
    # split and the whole licenses text (the recipe itself calibrates on a mixture since issue 14's calib_robust)
    recipe = load_recipe(ROOT / "recipes" / "llama-w4.yaml", [f"evaluate.max_windows={max_windows}"])
    recipe = recipe.model_copy(update={
        "calibration": recipe.calibration.model_copy(update={"source": "pydoc"}),
        "evaluate": recipe.evaluate.model_copy(update={"extra": ["licenses"]})})
    model, tok = load_model(resolve_model(recipe.model))
    calib = sample_windows(tokenize(tok, load_corpus("pydoc").split("calibration")), windows, 256, 0, "calib")
    return recipe, model, calib, EvalSets.build(recipe, tok)


def weights_sha256(folder: Path) -> str:
    """sha256 over a folder's *.safetensors files in name order (first 16 hex digits): same bytes, same digest."""
    import hashlib

    sha = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        sha.update(f.read_bytes())
    return sha.hexdigest()[:16]


def quantized_bits(plan) -> dict:
    """Average code bits and bits per weight (codes + one 16-bit scale per group) of the quantized linears."""
    n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
    code_bits = sum(q.bits * q.shape[0] * q.shape[1] for q in plan.quantized.values())
    scale_bits = sum(q.scale.numel() * 16 for q in plan.quantized.values())
    return {"avg bits": round(code_bits / n, 3), "bits/weight": round((code_bits + scale_bits) / n, 3)}


def run_pass(recipe, spec: dict, model, calib, seed: int = 0, cache=None):
    """Apply one pass, given as recipe data (`{"pass": "gptq", ...}`), to `model` the way `compress run` would;
    returns (its report, the plan it filled, seconds)."""
    import json
    import time

    from compress.passes import PassContext, make_pass
    from compress.plan import Plan
    from compress.recipe import load_recipe

    cfg = load_recipe(recipe, [f"passes.0={json.dumps(spec)}"]).passes[0]
    plan = Plan()
    t0 = time.perf_counter()
    rep = make_pass(cfg).run(model, PassContext(calibration=calib, plan=plan, batch_size=8, seed=seed, cache=cache))
    return rep, plan, time.perf_counter() - t0


def run_table(script: str, args, all_labels: list[str], title: str, meta: dict,
              extra_env: dict | None = None) -> tuple[list[dict], Path]:
    """Run the methods asked for (--methods, default `all_labels`) a process each, write OUT.json and OUT.md;
    returns the rows and OUT."""
    labels = all_labels if args.methods == ["all"] else args.methods
    rows = run_each(script, labels, args, extra_env)
    out = Path(args.out)
    write_results(out, title, script, {**base_meta(args), **meta}, rows)
    return rows, out


def run_each(script: str, labels: list[str], args, extra_env: dict | None = None,
             extra_args: list[str] | None = None) -> list[dict]:
    """Run `script --one LABEL` in a fresh process per label; each prints its row as JSON on its last line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", **(extra_env or {})}
    rows = []
    for label in labels:
        cmd = [sys.executable, script, "--one", label, "--windows", str(args.windows),
               "--max-windows", str(args.max_windows), "--threads", str(args.threads), *(extra_args or [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def row_cache(folder: Path, base_key: dict, fresh: bool = False):
    """measured(key, make): the row `make()` measured for the settings `base_key | key`, kept in folder/rows.json
    so that an interrupted benchmark resumes (`fresh` forgets what is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    cache_file = folder / "rows.json"
    cached = {} if fresh or not cache_file.exists() else json.loads(cache_file.read_text())

    def measured(key: dict, make) -> dict:
        k = json.dumps({**base_key, **key}, sort_keys=True)
        if k not in cached:
            cached[k] = make()
            cache_file.write_text(json.dumps(cached, indent=1))
        return cached[k]

    measured.has = lambda key: json.dumps({**base_key, **key}, sort_keys=True) in cached  # type: ignore[attr-defined]
    return measured


def write_results(out: Path, title: str, script: str, meta: dict, rows: list[dict]) -> None:
    """Print the table and write OUT.json (meta + rows) and OUT.md (title, the command, meta, table, and the
    hand-written "## Reading" section of the OUT.md already there, kept)."""
    from compress.tables import markdown_table, text_table

    print("\n" + text_table(rows))
    meta = {"command": f"python benchmarks/{Path(script).name} " + shlex.join(sys.argv[1:]), **meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = out.with_suffix(".md")
    reading = md.read_text().partition("\n## Reading")[2] if md.exists() else ""
    md.write_text("\n".join([f"# {title}\n", f"Command: `{meta['command']}`\n",
                             *(f"- {k}: {v}" for k, v in meta.items() if k != "command"), "", markdown_table(rows), ""])
                  + (f"\n## Reading{reading}" if reading else ""))


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


def benchmark_args(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every comparison script takes: --methods, --windows, --max-windows, --threads, --out (default
    docs/results/<name>), --plot-only, and the internal --one LABEL (one method in this process)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["all"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of the last run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / name))
    return ap


def handled_alone(args, run_one, plot) -> bool:
    """--one LABEL: print that method's row as JSON; --plot-only: redraw from OUT.json. True when one was done."""
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return True
    if args.plot_only:
        if plot is None:
            raise SystemExit("this benchmark draws no plot; its table is in OUT.md")
        out = Path(args.out)
        plot(json.loads(out.with_suffix(".json").read_text())["rows"], out.with_suffix(".png"))
        return True
    return False


def base_meta(args) -> dict:
    """What every comparison shares: calibration windows, perplexity protocol, threads."""
    return {"calibration": f"{args.windows} x 256 tokens, pydoc calibration split, seed 0",
            "perplexity": f"seq_len 256, <= {args.max_windows} windows per text", "threads": args.threads}


def ppl_panels(rows: list[dict], draw, xlabel: str, title: str, path: Path) -> None:
    """One log-scale panel per perplexity column (rows[0] is dense); draw(ax, key) adds the methods' points."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, [k for k in rows[0] if k.startswith("ppl ")], strict=False):
        draw(ax, key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
