"""The unquantized remainder of the default 4-bit artifact (issue 17, item 2): what quantizing the lm_head and storing
the rest in bfloat16 cost in perplexity and buy in bytes, in one process on the packaged default model.

    python benchmarks/lm_head.py [--threads 1] [--prompts 4] [--fresh]

Every row is recipes/llama-w4.yaml as `compress run` computes it: its calibration (pydoc + licenses), the GPTQ pass
on the decoder computed once and shared (the lm_head is quantized after the blocks, so the decoder's codes do not
depend on the row), then the row's lm_head (the pass's own code: compress.passes.quantize_head, GPTQ on the final
norm's outputs of the quantized blocks) and export dtype, rounded to what the artifact stores and evaluated on the
recipe's held-out texts (compress.pipeline.EvalSets.build: pydoc and licenses held out, news never calibrated on).
Each row's artifact is written with export.write and reloaded (kernel='cpu') for the bytes a decoded token reads
(benchmarks/decode_speed.py's count) and batch-1 greedy decode tokens/s on --prompts of decode_speed's prompts.
Rows are cached in ~/.cache/compress/lm_head_bench/rows.json (--fresh forgets them). Writes docs/results/lm_head.*.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import ROOT, row_cache, write_results  # noqa: E402

WORK = Path.home() / ".cache" / "compress" / "lm_head_bench"
# label -> (lm_head setting or None, export dtype)
ROWS: dict[str, tuple[dict | None, str]] = {
    "llama-w4 (lm_head fp32, tied)": (None, "auto"),
    "+ lm_head 8-bit g64": ({"bits": 8, "group_size": 64}, "auto"),
    "+ lm_head 4-bit g64": ({"bits": 4, "group_size": 64}, "auto"),
    "+ bf16 remainder (lm_head bf16, tied)": (None, "bfloat16"),
    "+ lm_head 8-bit g64 + bf16 remainder": ({"bits": 8, "group_size": 64}, "bfloat16"),
}


def measure(label: str, base, dense_ppl: dict, recipe, calib, eval_sets, source, tokenizer, prompts) -> dict:
    """One row from the decoder-quantized (model, plan) `base`: its lm_head and export dtype, perplexities, the
    artifact's bytes, bytes read per token and decode speed."""
    import shutil

    import export
    from benchmarks.decode_speed import NEW_TOKENS, _bytes_per_token, _decode
    from calibration.capture import for_each_block
    from compress import pipeline
    from compress.models import llama
    from compress.passes import PassContext
    from compress.passes.quantize_head import HeadInputs, quantize_head
    from compress.recipe import LmHeadQuant
    from compress.report import PassReport

    head, dtype = ROWS[label]
    model, plan = copy.deepcopy(base)
    cfg = recipe.passes[0].model_copy(update={"lm_head": None if head is None else LmHeadQuant(**head)})
    row: dict = {"row": label}
    t0 = time.perf_counter()
    if head is not None:  # the pass's last step: the final norm's outputs of the quantized blocks, then the head
        inputs = HeadInputs(model, -(-calib.shape[0] // recipe.calibration.batch_size))
        for_each_block(model, llama.blocks(model), calib, lambda *_: None, batch_size=recipe.calibration.batch_size,
                       finish=inputs, desc="final norm")
        report = PassReport(name="gptq")
        quantize_head(model, cfg, inputs.stats, PassContext(calibration=calib, plan=plan, batch_size=8, seed=0),
                      report)
        row["lm_head rel err"] = report.summary["lm_head"]["rel_err"]
    row["head s"] = round(time.perf_counter() - t0, 1)
    run_recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"dtype": dtype}),
                                           "passes": [cfg]})
    settings = pipeline._export_settings(run_recipe, source)
    pipeline._round_to_export(model, plan, settings)
    ppl = eval_sets.perplexities(model, pipeline.EVAL_BATCH)
    for name, value in ppl.items():
        row[f"ppl {name}"] = round(value, 3)
    row["ppl x dense (mean)"] = round(sum(v / dense_ppl[n] for n, v in ppl.items()) / len(ppl), 4)
    out = WORK / "artifacts" / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = export.Provenance(folder=source.path, source={"name": source.name, "identity": source.identity,
                                                               "path": str(source.path)},
                                   config=llama.as_causal_lm(model).config.to_dict(), recipe=run_recipe.to_dict(),
                                   recipe_yaml=run_recipe.to_yaml(), seed=0)
    export.write(out, pipeline._module_tensors(model), plan, {}, provenance, settings, check=lambda _f: {},
                 card=lambda _r: "")
    row["artifact MB"] = round(export.weights_bytes(out) / 1e6, 1)
    del model
    loaded = export.load(out, kernel="cpu")
    row["MB read/token"] = round(_bytes_per_token(loaded) / 2**20, 1)
    _, seconds, _ = _decode(loaded, tokenizer, prompts)
    row["tokens/s"] = round(len(prompts) * NEW_TOKENS / seconds, 2)
    return row


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="decode prompts per row (128 + 128 tokens each)")
    ap.add_argument("--fresh", action="store_true", help="recompute every row")
    ap.add_argument("--set", action="append", default=[], help="a recipe override (a smoke run on a tiny model)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "lm_head"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.decode_speed import _prompts
    from compress import pipeline
    from compress.models import load_model, resolve_model
    from compress.passes import PassContext, make_pass
    from compress.plan import Plan
    from compress.recipe import load_recipe

    load = os.getloadavg()[0]
    recipe = load_recipe(ROOT / "recipes" / "llama-w4.yaml", args.set)
    source = resolve_model(recipe.model)
    model, tokenizer = load_model(source)
    calib, eval_sets, _ = pipeline._texts(recipe, model, tokenizer, print)
    prompts = _prompts(tokenizer, args.prompts)
    measured = row_cache(WORK, {"recipe": recipe.to_dict(), "prompts": args.prompts, "threads": args.threads},
                         args.fresh)
    def dense_row() -> dict:
        from benchmarks.decode_speed import NEW_TOKENS, _bytes_per_token, _decode
        from export import weights_bytes

        row = {"row": "dense fp32 (source)", **{f"ppl {k}": round(v, 3) for k, v in
                                                 eval_sets.perplexities(model, pipeline.EVAL_BATCH).items()}}
        row["artifact MB"] = round(weights_bytes(source.path) / 1e6, 1)
        row["MB read/token"] = round(_bytes_per_token(model) / 2**20, 1)
        row["tokens/s"] = round(len(prompts) * NEW_TOKENS / _decode(model.eval(), tokenizer, prompts)[1], 2)
        return row

    dense = measured({"row": "dense"}, dense_row)
    dense_ppl = {k.removeprefix("ppl "): v for k, v in dense.items() if k.startswith("ppl ")}
    base: list = []

    def decoder_quantized():  # the shared GPTQ pass on the decoder, computed once when a row needs it
        if not base:
            plan = Plan.of(model)
            t0 = time.perf_counter()
            make_pass(recipe.passes[0]).run(model, PassContext(calibration=calib, plan=plan,
                                                               batch_size=recipe.calibration.batch_size, seed=0))
            print(f"decoder GPTQ: {time.perf_counter() - t0:.0f} s", flush=True)
            base.append((model, plan))
        return base[0]

    rows = [dense]
    for label in ROWS:
        rows.append(measured({"row": label}, lambda label=label: measure(
            label, decoder_quantized(), dense_ppl, recipe, calib, eval_sets, source, tokenizer, prompts)))
        print(rows[-1], flush=True)
    meta = {"model": "SmolLM2-135M (the packaged default), recipes/llama-w4.yaml's calibration, GPTQ pass and "
                     "evaluation (seq_len 256, 32 windows per text)",
            "decode": f"batch 1, greedy, {args.prompts} prompts of 128 tokens + 128 new (benchmarks/decode_speed.py), "
                      f"kernel='cpu', {args.threads} thread(s)",
            "machine": f"{os.cpu_count()} CPUs shared with other jobs, load average at start {load:.1f}"}
    order = ["row", "lm_head rel err", *(k for k in dense if k.startswith("ppl ")), "ppl x dense (mean)",
             "artifact MB", "MB read/token", "tokens/s", "head s"]
    rows = [{k: r.get(k, "") for k in order} for r in rows]
    write_results(Path(args.out), "The unquantized remainder: lm_head and export dtype", __file__, meta, rows)


if __name__ == "__main__":
    main()
