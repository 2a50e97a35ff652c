"""Quality per byte of low-rank corrections of GPTQ (issue 14): at 2 and 3 bits (g64, symmetric, MSE scales, the
shipped recipes' quantizer and calibration), no correction and rank {8, 16, 32} corrections initialized by SVD
(LoRC) or EoRA, fitted only or then trained on the dense model's next-token distributions, and ranks chosen per
module by the knapsack under a bits-per-weight budget; the 4-bit uncorrected model (llama-w4's quantizer) beside
them. Perplexity on the held-out splits of the calibration texts and on a text never calibrated on, total bits per
quantized weight and decoder MB (codes, 16-bit scales, 16-bit adapter), seconds and peak memory of each row.

    python benchmarks/lora_compare.py --threads 2

Calibration and evaluation are `recipes/llama-w3-lora.yaml`'s (pydoc + licenses windows; held-out pydoc, held-out
licenses, news). Rows are cached in ~/.cache/compress/lora_compare/rows.json (keyed by their settings), so an
interrupted run resumes. Writes docs/results/lora_compare.{md,json} and lora_compare.png."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "docs" / "results"
CACHE = Path.home() / ".cache" / "compress" / "lora_compare"
# rows that are a shipped recipe, by (bits, rank or budget, init, steps)
RECIPE_ROWS = {(3, 16, "eora", 100): "llama-w3-lora", (2, 16, "eora", 100): "llama-w2-lora",
               (3, "0.74 bits/weight", "eora", 100): "llama-w3-lora-ranked"}


def total_bits(plan) -> tuple[float, float]:
    """(bits per quantized weight, MB of the quantized linears): codes, one 16-bit scale per group, and 16 bits
    per adapter number."""
    n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
    code = sum(q.bits * q.shape[0] * q.shape[1] + 16 * q.scale.numel() for q in plan.quantized.values())
    adapter = sum(16 * (a.A.numel() + a.B.numel()) for a in plan.adapters.values())
    return round((code + adapter) / n, 3), round((code + adapter) / 8 / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--inits", nargs="+", default=["svd", "eora"])
    ap.add_argument("--train-ranks", type=int, nargs="*", default=[16], help="ranks also trained")
    ap.add_argument("--train-inits", nargs="*", default=["svd", "eora"], help="inits of the trained rows")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.74],
                    help="adapter bits per quantized weight for the searched-rank rows (eora, trained; 3 bits only)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--max-windows", type=int, default=32, help="evaluation windows per text")
    ap.add_argument("--fresh", action="store_true", help="forget the cached rows")
    ap.add_argument("--only-cached", action="store_true", help="write the table from the cached rows alone")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from _harness import row_cache

    from calibration.teacher import teacher_targets
    from compress.models import load_model, resolve_model
    from compress.passes import PassContext, make_pass
    from compress.pipeline import _texts, peak_memory_mb, reset_peak_memory
    from compress.plan import Plan
    from compress.recipe import LoraConfig, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "llama-w3-lora.yaml", [f"evaluate.max_windows={args.max_windows}"])
    gptq0 = recipe.passes[0].model_dump(mode="json", by_alias=True)
    lora0 = recipe.passes[1].model_dump(mode="json", by_alias=True)
    model, tok = load_model(resolve_model(recipe.model))
    calib, sets, _ = _texts(recipe, model, tok, print)
    batch = recipe.calibration.batch_size
    base_key = {"calibration": recipe.calibration.model_dump(mode="json"), "eval": args.max_windows,
                "texts": sorted(sets.windows)}
    measured = row_cache(CACHE, base_key, args.fresh)

    def ppl(m) -> dict:
        return {f"ppl {n}": round(v, 2) for n, v in sets.perplexities(m, 8, label="eval").items()}

    def timed(make):  # seconds and this row's peak resident memory beside what it measured
        def run() -> dict:
            reset_peak_memory()
            t0 = time.perf_counter()
            row = make()
            return {**row, "seconds": round(time.perf_counter() - t0, 1), "peak MB": round(peak_memory_mb())}
        return run

    rows = [{"method": "dense", "bits": 16, "rank": 0, **measured({"row": "dense"}, lambda: ppl(model))}]
    teacher = None
    quantized: dict[int, tuple] = {}

    def gptq_spec(bits: int) -> dict:
        return {**gptq0, "bits": bits}

    def quantize(bits: int):
        if bits not in quantized:
            m = copy.deepcopy(model)
            ctx = PassContext(calibration=calib, plan=Plan.of(m), batch_size=batch, seed=recipe.seed, originals={})
            make_pass(load_recipe({"name": "x", "passes": [gptq_spec(bits)]}).passes[0]).run(m, ctx)
            quantized[bits] = (m, ctx)
        return quantized[bits]

    # every row's (priority, head, cache key, make); computed in priority order (the rows the acceptance reads first,
    # so that a run cut short by time still has them), listed in the table's order
    jobs: list[tuple[int, dict, dict, object]] = []
    for bits in [4, *args.bits]:
        def plain(bits=bits) -> dict:
            m, ctx = quantize(bits)
            bpw, mb = total_bits(ctx.plan)
            return {"total bits/weight": bpw, "quantized MB": mb, **ppl(m)}

        jobs.append((0, {"method": f"GPTQ {bits}-bit g64" + (" (llama-w4)" if bits == 4 else ""), "bits": bits,
                         "rank": 0}, {"row": "gptq", "spec": gptq_spec(bits)}, timed(plain)))
        if bits == 4:
            continue
        settings: list[tuple[object, str, int]] = [
            (rank, init, steps) for init in args.inits for rank in args.ranks
            for steps in ([0, args.steps] if rank in args.train_ranks and init in args.train_inits else [0])]
        if bits == 3:
            settings += [({"bits_per_weight": b, "choices": lora0["rank"]["choices"] if isinstance(lora0["rank"], dict)
                           else [0, 4, 8, 16, 32, 64]}, "eora", args.steps) for b in args.budgets]
        for rank, init, steps in settings:
            lora = {**lora0, "rank": rank, "init": init, "train": {**lora0["train"], "steps": steps}}

            def corrected(bits=bits, lora=lora) -> dict:
                nonlocal teacher
                cfg = load_recipe({"name": "x", "passes": [gptq_spec(bits), lora]}).passes[1]
                assert isinstance(cfg, LoraConfig)
                if teacher is None:  # every window, as the recipes' trained runs use them all (64 < 100 x 4)
                    teacher = teacher_targets(model, calib, cfg.train.top_k, batch)
                base, ctx = quantize(bits)
                m = copy.deepcopy(base)
                run_ctx = PassContext(calibration=calib, plan=copy.deepcopy(ctx.plan), batch_size=batch,
                                      seed=recipe.seed, index=1, teacher=teacher, originals=ctx.originals)
                rep = make_pass(cfg).run(m, run_ctx)
                bpw, mb = total_bits(run_ctx.plan)
                ranks = sorted({a.A.shape[0] for a in run_ctx.plan.adapters.values()})
                return {"total bits/weight": bpw, "quantized MB": mb, "held-in KL": rep.summary["held_in_kl_after"],
                        "ranks used": "/".join(map(str, ranks)), **ppl(m)}

            shown = f"{rank['bits_per_weight']:g} bits/weight" if isinstance(rank, dict) else rank
            label = f"GPTQ {bits}-bit + {init} r{shown}" + (f", trained {steps} steps" if steps else "")
            name = RECIPE_ROWS.get((bits, shown, init, steps))
            recipe_rank = lora0["rank"] if isinstance(lora0["rank"], int) else 16
            priority = (1 + bool(steps) if (init, rank) == (lora0["init"], recipe_rank) else
                        3 if rank == recipe_rank and not steps else 4 if isinstance(rank, dict) else
                        5 if rank == recipe_rank else 6)
            jobs.append((priority, {"method": label + (f" ({name})" if name else ""), "bits": bits,
                                    "rank": shown if isinstance(rank, int) else "searched"},
                         {"row": "lora", "spec": gptq_spec(bits), "lora": lora}, timed(corrected)))
    done: dict[int, dict] = {}
    for i in sorted(range(len(jobs)), key=lambda i: (jobs[i][0], -jobs[i][1]["bits"])):
        _, head, key, make = jobs[i]
        if args.only_cached and not measured.has(key):
            print(f"not measured (not in the cache): {head['method']}")
            continue
        done[i] = {**head, **measured(key, make)}
    rows += [done[i] for i in sorted(done)]
    write(rows, args, recipe)
    plot(rows)


def write(rows: list[dict], args, recipe) -> None:
    from _harness import write_results

    cal = recipe.calibration
    write_results(OUT / "lora_compare", "Low-rank corrections of GPTQ: quality per byte", __file__,
                  {"threads": args.threads,
                   "quantizer": "GPTQ g64 symmetric, act-order with static groups, damp 0.1, MSE scales (the shipped "
                                "recipes')",
                   "calibration": f"{cal.windows} windows of {cal.seq_len} tokens, {cal.describe()} "
                                  "(calibration splits)",
                   "evaluation": f"the first {args.max_windows} windows of 256 tokens of each calibration text's "
                                 "held-out split and of news (never calibrated or trained on)",
                   "training": f"AdamW on A and B, {args.steps} steps of {recipe.passes[1].train.batch_size} windows, "
                               f"lr {recipe.passes[1].train.lr:g}, KL to the dense model's top "
                               f"{recipe.passes[1].train.top_k} tokens plus the rest's mass",
                   "total bits/weight": "codes + 16-bit scales + 16-bit adapter numbers, per quantized weight; "
                                        "quantized MB: the same bytes of the 210 quantized linears",
                   "seconds, peak MB": "the row's own work (GPTQ for the uncorrected rows; fit, training and held-in "
                                       "KL for the corrected ones) and the process's peak resident memory during it"},
                  rows)


def plot(rows: list[dict]) -> None:
    from _harness import pyplot

    plt = pyplot()
    if plt is None:
        return
    texts = [k for k in rows[0] if k.startswith("ppl ")]
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4.2))
    for ax, text in zip(axes, texts, strict=True):
        dense = rows[0][text]
        ax.axhline(dense, color="gray", ls=":", label="dense")
        for kind, marker in [("uncorrected", "s"), ("fitted", "o"), ("trained", "^")]:
            pts = [(r["total bits/weight"], r[text]) for r in rows[1:]
                   if ({"uncorrected": r["rank"] == 0, "fitted": r["rank"] != 0 and "trained" not in r["method"],
                        "trained": "trained" in r["method"]}[kind])]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("total bits per quantized weight")
        ax.set_title(text.removeprefix("ppl "))
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "lora_compare.png", dpi=110)


if __name__ == "__main__":
    main()
