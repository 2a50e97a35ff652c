"""GPU smoke check: the default recipes run end to end with `device: cuda` (the block under work, its activations
and the searches' scoring on the GPU, the rest of the model on the CPU), and each artifact loads on the GPU with
`export.load(path, device="cuda")` and gives the CPU's logits within 1e-3 (fp32, on held-out pydoc windows).

    python benchmarks/gpu_smoke.py                      # llama-30pct and llama-w4, about a minute each on an H200
    python benchmarks/gpu_smoke.py --recipes llama-w3-knapsack

Writes docs/results/gpu_smoke.{json,md}; exits 2 without a CUDA device, 1 when a logit check fails."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOLERANCE = 1e-3  # max |logit| difference, GPU vs CPU, fp32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["llama-30pct", "llama-w4"])
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens the logits are compared on")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "gpu_smoke"))
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every recipe, e.g. calibration.windows=8")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's own code (compares CPU to CPU)")
    args = ap.parse_args()

    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing run")
        return 2
    from _harness import weights_sha256, write_results

    import export
    from calibration.sources import eval_windows, load_corpus
    from compress import pipeline
    from compress.models import load_model, resolve_model
    from compress.recipe import load_recipe

    rows = []
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"device={args.device}", *args.set])
        t0 = time.perf_counter()
        result = pipeline.run(recipe, out=ROOT / "artifacts" / f"gpu-{name}", overwrite=True, log=print)
        seconds = time.perf_counter() - t0
        _, tokenizer = load_model(resolve_model(recipe.model))
        corpus = load_corpus("pydoc")
        ids = eval_windows(corpus.tokens(tokenizer, "heldout", args.windows * 256), 256, args.windows, "pydoc")
        with torch.no_grad():
            on_cpu = export.load(result.artifact, device="cpu", dtype=torch.float32)(input_ids=ids).logits
            on_gpu = export.load(result.artifact, device=args.device,
                                 dtype=torch.float32)(input_ids=ids.to(args.device)).logits.cpu()
        diff = float((on_cpu - on_gpu).abs().max())
        report = result.report
        rows.append({"recipe": name, "device": report["device"], "run s": round(seconds, 1),
                     **{f"ppl {q['text']}": q["compressed ppl"] for q in report["quality"]},
                     "bits/weight": (report.get("bits_per_weight") or {}).get("stored", ""),
                     "max |logit diff| cuda vs cpu": f"{diff:.2e}", "within 1e-3": diff < TOLERANCE,
                     "weights sha256": weights_sha256(result.artifact)})
        print(rows[-1], flush=True)
    write_results(Path(args.out), "GPU smoke check: default recipes on CUDA, artifacts loaded on the GPU",
                  __file__, {"torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else "none (dry run)",
                             "tolerance": TOLERANCE, "windows": f"{args.windows} x 256 held-out pydoc tokens"}, rows)
    return 0 if all(r["within 1e-3"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
