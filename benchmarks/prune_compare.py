"""Structured pruning methods side by side on the packaged default model, in one run with one calibration set.

    python benchmarks/prune_compare.py [--targets 0.3] [--windows 64] [--max-windows 32]

Prints a table and writes docs/results/prune_compare.json and docs/results/prune_compare.md. Every method prunes a
deep copy of the same dense model with the same calibration windows; perplexity is on held-out pydoc text (the
calibration domain) and on license texts (another domain). Speed is measured separately (benchmarks/speed.py),
on artifacts, with dense and compressed forwards alternated.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "prune_compare"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from calibration.sources import load_corpus, sample_windows, tokenize
    from compress import evaluate as ev
    from compress.models import load_model, resolve_model
    from compress.passes import PassContext, make_pass
    from compress.pipeline import EVAL_BATCH, EvalSets, decoder_params
    from compress.plan import Plan
    from compress.recipe import load_recipe
    from compress.tables import markdown_table, text_table

    base = load_recipe(ROOT / "recipes" / "llama-30pct.yaml", [f"calibration.windows={args.windows}",
                                                                 f"calibration.seq_len={args.seq_len}",
                                                                 f"evaluate.max_windows={args.max_windows}"])
    source = resolve_model(base.model)
    dense, tok = load_model(source)
    corpus = load_corpus(base.calibration.source)
    calib = sample_windows(tokenize(tok, corpus.split("calibration")), args.windows, args.seq_len, base.seed, "calib")
    sets = EvalSets.build(base, tok)
    methods = {
        "flap (adaptive)": {"pass": "flap", "structure": "adaptive"},
        "flap (adaptive, groups standardized)": {"pass": "flap", "structure": "adaptive", "standardize": "group"},
        "flap (adaptive, no compensation)": {"pass": "flap", "structure": "adaptive", "compensate": False},
        "flap (uniform)": {"pass": "flap", "structure": "uniform"},
        "flap (uniform, no compensation)": {"pass": "flap", "structure": "uniform", "compensate": False},
        "wanda-sp (uniform)": {"pass": "wanda_sp", "structure": "uniform"},
        "wanda-sp (adaptive)": {"pass": "wanda_sp", "structure": "adaptive"},
    }
    rows = []

    def measure(label: str, model, target, seconds: float) -> None:
        ppl = sets.perplexities(model, EVAL_BATCH)
        row = {"method": label, "target": target, "removed": round(1 - decoder_params(model) / decoder_params(dense), 4),
               "params": ev.count_parameters(model),
               **{f"ppl {k}": round(v, 2) for k, v in ppl.items()},
               "prune s": round(seconds, 1)}
        rows.append(row)
        print(text_table([row]), flush=True)

    measure("dense", dense, 0.0, 0.0)
    for target in args.targets:
        for label, spec in methods.items():
            model = copy.deepcopy(dense)
            cfg = load_recipe(base, [f"passes.0={json.dumps({**spec, 'target': target})}"]).passes[0]
            t0 = time.perf_counter()
            make_pass(cfg).run(model, PassContext(calibration=calib, plan=Plan(), batch_size=8, seed=base.seed))
            measure(label, model, target, time.perf_counter() - t0)
            del model
    table = text_table(rows)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/prune_compare.py " + " ".join(sys.argv[1:])
    meta = {"command": cmd.strip(), "model": source.identity, "threads": args.threads,
            "calibration": f"{args.windows} x {args.seq_len} tokens, pydoc calibration split, seed {base.seed}",
            "perplexity": f"{ev.PPL_PROTOCOL}; seq_len {args.seq_len}, <= {args.max_windows} windows per text",
            "torch": torch.__version__, "cpu": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = ["# Structured pruning compared\n", f"Command: `{meta['command']}`\n",
          *(f"- {k}: {v}" for k, v in meta.items() if k != "command"), "", markdown_table(rows), ""]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
