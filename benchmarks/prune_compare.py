"""Structured pruning methods side by side on the packaged default model: one run, one calibration set.

    python benchmarks/prune_compare.py [--methods all] [--targets 0.2 0.3] [--windows 64] [--max-windows 32]

At each target share of decoder-block parameters: FLAP (adaptive, the default recipe; and uniform), the Wanda-style
structured baseline (uniform), CFSP (MLP channels only, per-block budgets), and the Tyr-style search (per-unit
sparsity by evolution over a supernet of least-squares-refitted variants). Every method prunes the same dense model
with the same 64 x 256 calibration windows, in its own subprocess (so peak memory is its own). Perplexity is on
held-out pydoc text (the calibration domain) and on license texts (another domain). The Tyr rows' time includes
building its variant database (a fresh one: the run-state folder is emptied first unless --keep-runs).
Writes docs/results/prune_compare.{json,md} and, with matplotlib, prune_compare.png (perplexity vs parameters kept).
Speed of the pruned models is measured separately (benchmarks/speed.py).
"""

from __future__ import annotations

import resource
import shutil
import tempfile
from pathlib import Path

from _harness import (base_meta, benchmark_args, default_setup, handled_alone, ppl_panels, run_each, run_pass,
                      write_results)

METHODS = {
    "flap (adaptive)": {"pass": "flap", "structure": "adaptive"},
    # not in the default list: adaptive widths exactly as the threshold leaves them (before round_to applied to them)
    "flap (adaptive, round_to 1)": {"pass": "flap", "structure": "adaptive", "round_to": 1},
    "flap (uniform)": {"pass": "flap", "structure": "uniform"},
    "wanda-sp (uniform)": {"pass": "wanda_sp", "structure": "uniform"},
    "cfsp": {"pass": "cfsp", "round_to": 64},
    "tyr": {"pass": "tyr"},
}


def run_one(label: str, args) -> dict:
    from compress import evaluate as ev
    from compress.models.default import runs_dir
    from compress.pipeline import EVAL_BATCH, decoder_params

    recipe, model, calib, sets = default_setup(args.windows, args.max_windows, args.threads)
    dense_decoder = decoder_params(model)
    method, _, target = label.partition("@")
    row = {"method": method, "target": float(target or 0)}
    if method != "dense":
        rep, _, seconds = run_pass(recipe, {**METHODS[method], "target": float(target)}, model, calib, cache=runs_dir())
        rounds = rep.summary.get("rounds") or []
        row.update({"removed": round(1 - decoder_params(model) / dense_decoder, 4), "prune s": round(seconds, 1),
                    "evaluations": rep.summary.get("evaluations", ""),
                    "final KL": rounds[-1]["final_kl"] if rounds else ""})
    row.update({"decoder params": decoder_params(model), "params": ev.count_parameters(model)})
    row.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    row["peak MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    ap = benchmark_args(__doc__, "prune_compare")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--keep-runs", action="store_true", help="reuse cached variant databases (times then exclude them)")
    args = ap.parse_args()
    if handled_alone(args, run_one, plot):
        return
    methods = [m for m in METHODS if "round_to 1" not in m] if args.methods == ["all"] else args.methods
    labels = ["dense"] + [f"{m}@{t}" for t in args.targets for m in methods]
    runs = None if args.keep_runs else tempfile.mkdtemp(prefix="prune-compare-runs-")
    try:
        rows = run_each(__file__, labels, args, extra_env={"COMPRESS_RUNS": runs} if runs else None)
    finally:
        if runs:
            shutil.rmtree(runs, ignore_errors=True)
    out = Path(args.out)
    write_results(out, "Structured pruning compared", __file__, {
        **base_meta(args),
        "removed": "share of decoder-block projection parameters removed",
        "prune s": "pass time (Tyr: variant database + search, from scratch)",
        "evaluations": "Tyr: KL evaluations of assembled models in the search",
        "final KL": "Tyr: KL to the dense model on the search's final-stage calibration windows"}, rows)
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    style = {"flap (adaptive)": ("o", "tab:blue"), "flap (adaptive, round_to 1)": ("x", "tab:purple"),
             "flap (uniform)": ("s", "tab:cyan"),
             "wanda-sp (uniform)": ("v", "tab:gray"), "cfsp": ("^", "tab:green"), "tyr": ("D", "tab:orange")}
    dense = rows[0]

    def draw(ax, key):
        for method, (marker, color) in style.items():
            pts = sorted((r["decoder params"] / 1e6, r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=method)
        ax.scatter([dense["decoder params"] / 1e6], [dense[key]], marker="*", s=120, color="black", label="dense")

    ppl_panels(rows, draw, "decoder-block parameters kept (millions)",
               "SmolLM2-135M: structured pruning at 20% and 30% (lower is better)", path)


if __name__ == "__main__":
    main()
