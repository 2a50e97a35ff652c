"""The shipped recipes as they run now: held-out perplexity per text, bits per quantized weight as stored, weights
size and the weights' sha256, from `compress run` itself. The README quotes these rows, and
tests/unit/test_readme_figures.py checks that it quotes them as they are here.

    OMP_NUM_THREADS=2 python benchmarks/default_recipes.py                       # llama-30pct and llama-w4
    python benchmarks/default_recipes.py --reuse artifacts/llama-w4 --recipes llama-w4   # read a finished run

--reuse reads an artifact's report.json instead of running again, if its recipe.yaml is the recipe's current text
(with any defaults added since); otherwise the recipe runs. Writes docs/results/default_recipes.{json,md}, merging
rows into the JSON already there (one row per recipe)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def row_of(name: str, artifact: Path, report: dict) -> dict:
    from _harness import weights_sha256

    bits = report.get("bits_per_weight") or {}
    return {"recipe": name, **{f"ppl {q['text']}": q["compressed ppl"] for q in report["quality"]},
            "bits/weight": bits.get("stored", ""),
            "weights MB": round(report["weights_bytes"]["compressed"] / 2**20, 1),
            "removed": report["decoder_params"]["removed"], "run s": report["seconds"],
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or "", "weights sha256": weights_sha256(artifact)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["llama-30pct", "llama-w4"])
    ap.add_argument("--reuse", nargs="*", default=[], help="artifact folders to read instead of running")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "default_recipes"))
    args = ap.parse_args()
    from _harness import write_results

    from compress import pipeline
    from compress.recipe import load_recipe

    reuse = {load_recipe(Path(p) / "recipe.yaml").name: Path(p) for p in args.reuse}
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else []
    rows = {r["recipe"]: r for r in old}
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        art = reuse.get(name)
        if art is not None and load_recipe(art / "recipe.yaml").to_dict() == recipe.to_dict():
            rows[name] = row_of(name, art, json.loads((art / "report.json").read_text()))
            rows[name]["threads"] = "(reused run)"
        else:
            if art is not None:
                print(f"{art}: made by another recipe text than recipes/{name}.yaml; running it")
            with tempfile.TemporaryDirectory() as tmp:
                result = pipeline.run(recipe, out=Path(tmp) / name, log=print)
                rows[name] = row_of(name, result.artifact, result.report)
        print(rows[name], flush=True)
    write_results(out, "The shipped recipes as they run now (the README's figures)", __file__,
                  {"model": "smollm2-135m (packaged default)", "perplexity": "32 windows of 256 tokens per text"},
                  list(rows.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
