"""Quality per byte of low-rank corrections of GPTQ (issue 14): at 2 and 3 bits (g64, symmetric), no correction and
rank {8, 16, 32} corrections initialized by SVD (LoRC) or EoRA, fitted only or then trained on the dense model's
next-token distributions; the 4-bit uncorrected model beside them. Perplexity on held-out text of the calibration's
domain and of another, total bits per quantized weight (codes, 16-bit scales, 16-bit adapter), seconds.

    python benchmarks/lora_compare.py --threads 2

Rows are cached in ~/.cache/compress/lora_compare/rows.json (keyed by their settings), so an interrupted run
resumes. Writes docs/results/lora_compare.{md,json} and lora_compare.png."""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
CACHE = Path.home() / ".cache" / "compress" / "lora_compare"


def total_bits(plan) -> float:
    """Bits per quantized weight: codes, one 16-bit scale per group, and 16 bits per adapter number."""
    n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
    code = sum(q.bits * q.shape[0] * q.shape[1] + 16 * q.scale.numel() for q in plan.quantized.values())
    adapter = sum(16 * (a.A.numel() + a.B.numel()) for a in plan.adapters.values())
    return round((code + adapter) / n, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--inits", nargs="+", default=["svd", "eora"])
    ap.add_argument("--train-ranks", type=int, nargs="*", default=[16], help="ranks also trained (every init)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--windows", type=int, default=64, help="calibration windows of 256 tokens")
    ap.add_argument("--max-windows", type=int, default=32, help="evaluation windows per text")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from _harness import default_setup, row_cache

    from calibration.teacher import teacher_targets
    from compress.passes import PassContext, make_pass
    from compress.plan import Plan
    from compress.recipe import load_recipe

    recipe, model, calib, sets = default_setup(args.windows, args.max_windows, args.threads)
    base_key = {"calibration": list(calib.shape), "eval": args.max_windows}
    measured = row_cache(CACHE, base_key, False)

    def ppl(m) -> dict:
        return {f"ppl {n}": round(v, 2) for n, v in sets.perplexities(m, 8, label="eval").items()}

    rows = [{"method": "dense", "bits": 16, "rank": 0, **measured({"row": "dense"}, lambda: ppl(model))}]
    teacher = None
    quantized: dict[int, tuple] = {}

    def gptq_spec(bits: int) -> dict:
        return {"pass": "gptq", "bits": bits, "group_size": 64, "sym": True, "act_order": True,
                "static_groups": True, "damp": 0.1}

    def quantize(bits: int):
        if bits not in quantized:
            m = copy.deepcopy(model)
            ctx = PassContext(calibration=calib, plan=Plan.of(m), batch_size=8, seed=0, originals={})
            t0 = time.perf_counter()
            make_pass(load_recipe({"name": "x", "passes": [gptq_spec(bits)]}).passes[0]).run(m, ctx)
            quantized[bits] = (m, ctx, time.perf_counter() - t0)
        return quantized[bits]

    for bits in [4, *args.bits]:
        def plain(bits=bits) -> dict:
            m, ctx, seconds = quantize(bits)
            return {"total bits/weight": total_bits(ctx.plan), "seconds": round(seconds, 1), **ppl(m)}

        rows.append({"method": f"GPTQ {bits}-bit g64", "bits": bits, "rank": 0,
                     **measured({"row": "gptq", "spec": gptq_spec(bits)}, plain)})
        if bits == 4:
            continue
        for init in args.inits:
            for rank in args.ranks:
                for steps in [0, args.steps] if rank in args.train_ranks else [0]:
                    lora = {"pass": "lora", "rank": rank, "init": init,
                            "train": {"steps": steps, "lr": args.lr, "batch_size": args.batch_size}}

                    def corrected(bits=bits, lora=lora) -> dict:
                        nonlocal teacher
                        if teacher is None:
                            teacher = teacher_targets(model, calib, 64, 8)
                        base, ctx, _ = quantize(bits)
                        m = copy.deepcopy(base)
                        run_ctx = PassContext(calibration=calib, plan=copy.deepcopy(ctx.plan), batch_size=8, seed=0,
                                              index=1, teacher=teacher, originals=ctx.originals)
                        cfg = load_recipe({"name": "x", "passes": [gptq_spec(bits), lora]}).passes[1]
                        t0 = time.perf_counter()
                        rep = make_pass(cfg).run(m, run_ctx)
                        return {"total bits/weight": total_bits(run_ctx.plan),
                                "seconds": round(time.perf_counter() - t0, 1),
                                "held-in KL": rep.summary["held_in_kl_after"], **ppl(m)}

                    label = f"GPTQ {bits}-bit + {init} r{rank}" + (f", trained {steps} steps" if steps else "")
                    rows.append({"method": label, "bits": bits, "rank": rank,
                                 **measured({"row": "lora", "spec": gptq_spec(bits), "lora": lora}, corrected)})
    write(rows, args)


def write(rows: list[dict], args) -> None:
    from _harness import write_results

    write_results(OUT / "lora_compare", "Low-rank corrections of GPTQ: quality per byte", __file__,
                  {"calibration": f"{args.windows} windows of 256 tokens of the pydoc calibration split",
             "evaluation": f"the first {args.max_windows} windows of 256 tokens per text, never trained on",
             "training": f"AdamW on A and B, {args.steps} steps of {args.batch_size} windows, lr {args.lr:g}, KL to "
                         "the dense model's top 64 tokens plus the rest's mass",
             "total bits/weight": "codes + 16-bit scales + 16-bit adapter numbers, per quantized weight",
             "seconds": "the correction pass (fit, training, held-in KL) on the shared 2-core machine"}, rows)


if __name__ == "__main__":
    main()
