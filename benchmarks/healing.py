"""What healing buys after structured pruning: FLAP at 30% (uniform widths, which stock transformers loads, and
adaptive), then low-rank terms trained on the dense model's next-token distributions and merged into the kept
weights (the lora pass, init zero), for several training lengths; perplexity on held-out text of the calibration's
domain and of another, seconds of training, and the share of the log-perplexity gap to dense that healing recovers.

    python benchmarks/healing.py --threads 2 --structures uniform

Rows are cached in ~/.cache/compress/healing/rows.json (keyed by their settings), so an interrupted run resumes;
`--fresh` measures every row again. Writes docs/results/healing.{md,json} and healing.png."""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
CACHE = Path.home() / ".cache" / "compress" / "healing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "llama-30pct.yaml"))
    ap.add_argument("--steps", type=int, nargs="+", default=[40], help="training lengths (uniform)")
    ap.add_argument("--adaptive-steps", type=int, nargs="*", default=[40], help="training lengths (adaptive)")
    ap.add_argument("--structures", nargs="+", default=["uniform", "adaptive"], choices=["uniform", "adaptive"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-3], help="learning rates tried at every length")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-windows", type=int, default=32, help="evaluation windows per text")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from _harness import row_cache

    torch.set_num_threads(args.threads)
    from calibration.teacher import teacher_targets
    from compress.models import load_model, resolve_model
    from compress.passes import PassContext, make_pass
    from compress.pipeline import _texts
    from compress.plan import Plan
    from compress.recipe import FlapConfig, load_recipe

    recipe = load_recipe(args.recipe, [f"evaluate.max_windows={args.max_windows}"])
    flap = next(p for p in recipe.passes if isinstance(p, FlapConfig))
    model, tok = load_model(resolve_model(recipe.model))
    calib, sets, corpus = _texts(recipe, model, tok, print)
    inputs = {k: v for k, v in recipe.to_dict().items() if k in ("model", "seed", "calibration", "evaluate")}
    base_key = {"recipe": inputs, "calibration": list(calib.shape), "eval": args.max_windows}
    measured = row_cache(CACHE, base_key, args.fresh)

    def ppl(m) -> dict:
        return {f"ppl {n}": round(v, 2) for n, v in sets.perplexities(m, recipe.calibration.batch_size,
                                                                      label="eval").items()}

    rows = [{"model": "dense", "structure": "", "steps": 0, **measured({"row": "dense"}, lambda: ppl(model))}]
    teacher = None
    batch = recipe.calibration.batch_size
    for structure in args.structures:
        spec = flap.model_dump(mode="json", by_alias=True) | {"structure": structure}
        done: dict = {}  # the pruned model and its plan, made once per structure when a row needs them

        def prune(spec=spec, done=done):
            if not done:
                done["model"] = copy.deepcopy(model)
                ctx = PassContext(calibration=calib, plan=Plan.of(done["model"]), batch_size=batch, seed=recipe.seed)
                make_pass(load_recipe({"name": "x", "passes": [spec]}).passes[0]).run(done["model"], ctx)
                done["plan"] = ctx.plan
            return done["model"]

        rows.append({"model": "FLAP 30%", "structure": structure, "steps": 0,
                     **measured({"row": "pruned", "flap": spec}, lambda: ppl(prune()))})
        for steps in args.steps if structure == "uniform" else args.adaptive_steps:
            for lr in args.lrs:
                heal = {"pass": "lora", "init": "zero", "rank": args.rank,
                        "train": {"steps": steps, "lr": lr, "batch_size": args.batch_size}}

                def make(heal=heal, done=done, spec=spec) -> dict:
                    nonlocal teacher
                    if teacher is None:  # every length's windows: the longest run's (as the pipeline computes them)
                        most = max([*args.steps, *args.adaptive_steps]) * args.batch_size
                        teacher = teacher_targets(model, calib[:most], heal["train"].get("top_k", 64), batch)
                    healed = copy.deepcopy(prune())
                    ctx = PassContext(calibration=calib, plan=copy.deepcopy(done["plan"]), batch_size=batch,
                                      seed=recipe.seed, index=1, teacher=teacher)
                    t0 = time.perf_counter()
                    rep = make_pass(load_recipe({"name": "x", "passes": [spec, heal]}).passes[1]).run(healed, ctx)
                    s = rep.summary
                    return {"train s": round(time.perf_counter() - t0, 1), "load avg": round(os.getloadavg()[0], 1),
                            "held-in KL before": s["held_in_kl_before"], "held-in KL after": s["held_in_kl_after"],
                            **ppl(healed)}

                rows.append({"model": f"FLAP 30% + healing (rank {args.rank}, lr {lr:g})", "structure": structure,
                             "steps": steps, **measured({"row": "healed", "flap": spec, "heal": heal}, make)})
    write(rows, args, corpus)


def write(rows: list[dict], args, corpus: str) -> None:
    """The table with the share of each domain's log-perplexity gap recovered, the JSON and the plot."""
    dense = rows[0]
    texts = [k for k in dense if k.startswith("ppl ")]
    for row in rows:
        pruned = next(r for r in rows if r["structure"] == row["structure"] and r["steps"] == 0)
        for k in texts:
            gap = math.log(pruned[k]) - math.log(dense[k])
            if row["steps"] and gap > 0:
                row[f"gap recovered {k[4:]}"] = round((math.log(pruned[k]) - math.log(row[k])) / gap, 3)
    from _harness import write_results

    write_results(OUT / "healing", "Healing after pruning: low-rank terms trained on the dense model's distributions, "
                  "merged", __file__,
                  {"calibration": f"the recipe's windows of {corpus}; training uses them, evaluation never does",
             "evaluation": f"the first {args.max_windows} windows of 256 tokens per text",
             "healing": f"the lora pass with init zero, rank {args.rank}, batch {args.batch_size} windows, AdamW, "
                        "cosine schedule, KL to the dense model's top 64 tokens plus the rest's mass; merged into the "
                        "weights",
             "gap recovered": "(log ppl pruned - log ppl healed) / (log ppl pruned - log ppl dense), per text",
             "train s": "seconds of the lora pass (training and the held-in KL before and after), with the load "
                        "average of the shared machine when it finished (2 cores)"}, rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 3.6))
    for ax, k in zip(axes, texts, strict=True):
        for structure in args.structures:
            pts = sorted((r["steps"], r[k]) for r in rows if r["structure"] == structure)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"FLAP 30% {structure}")
        ax.axhline(dense[k], color="gray", ls="--", label="dense")
        ax.set(xlabel="healing steps", ylabel="perplexity", title=k[4:], yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "healing.png", dpi=110)


if __name__ == "__main__":
    main()
