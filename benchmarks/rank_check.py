"""Is a layer ranking better than chance? LIM and ZD against ten random rankings at the same budget, one run.

    python benchmarks/rank_check.py [--methods all] [--windows 64] [--max-windows 32] [--threads 2]

Layer-wise mixed precision at an average of 3.25 code bits with widths 3 and 4 (GPTQ underneath: group 64,
symmetric, act-order with static groups, damp 0.1, as the recipes): the layers a ranking puts first get 4 bits until
the budget is spent (7 of 30 layers on the default model). Rankings: LIM (1 - cos of a layer's input and output), ZD
(outlier share), ten random rankings (seeds 0-9: the chance distribution, not one anecdote), and the knapsack over
measured per-unit KL restricted to the same two widths (a ranking by measured sensitivity). Uniform 3-bit is the
floor. Each runs in its own subprocess on a fresh copy of the dense model; perplexity on held-out pydoc (the
calibration domain) and licenses (another domain). Writes docs/results/rank_check.{json,md} and, with matplotlib,
rank_check.png (each ranking's perplexity against the random rankings' spread).
"""

from __future__ import annotations

from pathlib import Path

from _harness import benchmark_args, default_setup, handled_alone, ppl_panels, quantized_bits, run_pass, run_table

GPTQ = {"pass": "gptq", "group_size": 64, "act_order": True, "static_groups": True, "damp": 0.1}
MIXED = {"average": 3.25, "choices": [3, 4]}
SEEDS = range(10)
METHODS = {
    "uniform w3": {**GPTQ, "bits": 3},
    "lim": {**GPTQ, "bits": {**MIXED, "importance": "lim"}},
    "zd": {**GPTQ, "bits": {**MIXED, "importance": "zd"}},
    "knapsack [3,4]": {**GPTQ, "bits": {**MIXED, "allocator": "knapsack"}},
    **{f"random s{s}": {**GPTQ, "bits": {**MIXED, "importance": "random"}, "_seed": s} for s in SEEDS},
}


def run_one(label: str, args) -> dict:
    from compress.models.default import runs_dir
    from compress.pipeline import EVAL_BATCH

    recipe, model, calib, sets = default_setup(args.windows, args.max_windows, args.threads)
    row = {"method": label}
    if label != "dense":
        spec = dict(METHODS[label])
        seed = spec.pop("_seed", 0)
        rep, plan, _ = run_pass(recipe, spec, model, calib, seed, cache=runs_dir())
        row["avg bits"] = quantized_bits(plan)["avg bits"]
        if "unit_bits" in rep.summary:  # the knapsack sets widths per fused group, not per layer
            units = rep.summary["unit_bits"]
            row["4-bit layers"] = f"{sum(b == 4 for b in units.values())} of {len(units)} groups"
        else:
            row["4-bit layers"] = " ".join(str(i) for i, b in enumerate(rep.summary["layer_bits"]) if b == 4)
    row.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    return row


def standing(rows: list[dict]) -> list[dict]:
    """For each non-random ranking: how many of the random rankings it beats, per text."""
    keys = [k for k in rows[0] if k.startswith("ppl ")]
    randoms = [r for r in rows if r["method"].startswith("random")]
    out = []
    for r in rows:
        if r["method"] == "dense" or r["method"].startswith("random"):
            continue
        out.append({"method": r["method"], **{f"beats random ({k[4:]})": f"{sum(r[k] < q[k] for q in randoms)}/"
                                              f"{len(randoms)}" for k in keys}})
    for k in keys:
        vals = sorted(q[k] for q in randoms)
        out.append({"method": f"random median ({k[4:]})", "value": vals[len(vals) // 2] if len(vals) % 2 else
                    round((vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2, 3)})
    return out


def main() -> None:
    args = benchmark_args(__doc__, "rank_check").parse_args()
    if handled_alone(args, run_one, plot):
        return
    rows, out = run_table(__file__, args, ["dense", *METHODS], "Layer rankings against chance (3.25 bits, widths 3 and 4)",
                          {"widths": "3 and 4 (the two that bracket 3.25); 16-bit scale per group of 64"})
    if any(r["method"].startswith("random") for r in rows):
        from compress.tables import markdown_table, text_table

        st = standing(rows)
        print("\n" + text_table(st))
        with out.with_suffix(".md").open("a") as f:
            f.write("\n## Standing against the random rankings\n\n" + markdown_table(st) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Random rankings as a strip of grey points; every other ranking as a labelled horizontal line."""
    others = [r for r in rows[1:] if not r["method"].startswith("random")]
    colors = {"uniform w3": "tab:gray", "lim": "tab:green", "zd": "tab:purple", "knapsack [3,4]": "tab:blue"}

    def draw(ax, key):
        randoms = [r[key] for r in rows if r["method"].startswith("random")]
        ax.scatter([0] * len(randoms), randoms, marker="x", color="tab:gray", label="random rankings (10 seeds)")
        for i, r in enumerate(others, start=1):
            ax.scatter([i], [r[key]], s=60, color=colors.get(r["method"], "black"), label=r["method"])
        ax.axhline(rows[0][key], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xticks(range(len(others) + 1), ["random", *(r["method"] for r in others)], fontsize=7)

    ppl_panels(rows, draw, "layer ranking", "SmolLM2-135M, GPTQ g64 sym, 3.25 bits with widths 3 and 4", path)


if __name__ == "__main__":
    main()
