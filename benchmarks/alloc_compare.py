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

import resource
from pathlib import Path

from _harness import benchmark_args, default_setup, handled_alone, ppl_panels, quantized_bits, run_pass, run_table
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
    from compress.models.default import runs_dir
    from compress.pipeline import EVAL_BATCH

    recipe, model, calib, sets = default_setup(args.windows, args.max_windows, args.threads)
    row = {"method": label}
    if label != "dense":
        rep, plan, seconds = run_pass(recipe, METHODS[label], model, calib, cache=runs_dir())
        s = rep.summary
        row.update({**quantized_bits(plan), "widths": "/".join(map(str, sorted({q.bits for q in plan.quantized.values()}))),
                    "search s": round(seconds, 1),
                    "evaluations": (s.get("evolution") or {}).get("evaluations", ""),
                    "summed unit KL": (s.get("knapsack") or {}).get("summed_unit_kl", ""),
                    "start KL": (s.get("evolution") or {}).get("start_kl", ""),
                    "final KL": (s.get("evolution") or {}).get("final_kl", ""),
                    "accepted": (s.get("evolution") or {}).get("accepted", "")})
    row.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    row["peak MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    args = benchmark_args(__doc__, "alloc_compare").parse_args()
    if handled_alone(args, run_one, plot):
        return
    rows, out = run_table(__file__, args, ["dense", *METHODS], "Bit allocation compared", {
        "search s": "pass time; the first searched method includes building the variant database and unit errors",
        "bits/weight": "codes + one 16-bit scale per group of 64"})
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    style = {"uniform": ("s", "tab:gray"), "lim": ("^", "tab:green"), "knapsack": ("o", "tab:blue"),
             "evolution": ("D", "tab:orange")}

    def draw(ax, key):
        for r in rows[1:]:
            marker, color = next(v for k, v in style.items() if r["method"].startswith(k))
            ax.scatter(r["bits/weight"], r[key], marker=marker, s=50, color=color, label=r["method"])
        ax.axhline(rows[0][key], color="black", linestyle="--", linewidth=1, label="dense")

    ppl_panels(rows, draw, "bits per weight (codes + 16-bit scales)",
               "SmolLM2-135M, GPTQ group 64 symmetric: bit allocation at equal budgets", path)


if __name__ == "__main__":
    main()
