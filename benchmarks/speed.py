"""CPU forward speed and size of an artifact against its dense source, in one run.

    python benchmarks/speed.py artifacts/llama-30pct [--tokens 2048] [--repeats 5] [--threads 2]

Loads the dense source and the artifact (our loader), times one forward pass over (1, tokens) for each, alternating
dense and compressed so that machine noise hits both alike, keeps the best of `repeats`, and writes
docs/results/speed.json and docs/results/speed.md together with the artifact's peak memory from its report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import export
    from compress import evaluate as ev
    from compress.models import load_model, resolve_model
    from compress.pipeline import weights_bytes
    from compress.tables import markdown_table, text_table

    art = Path(args.artifact)
    manifest = json.loads((art / "manifest.json").read_text())
    report = json.loads((art / "report.json").read_text())
    source = resolve_model(manifest["source"]["name"])
    models = {"dense": load_model(source)[0], "compressed": export.load(art, dtype=torch.float32)}
    ids = torch.randint(0, models["dense"].config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    best = {k: float("inf") for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids[:, :128], use_cache=False)  # warm-up
        for _ in range(args.repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                best[k] = min(best[k], time.perf_counter() - t0)
    rows = []
    for k, m in models.items():
        path = source.path if k == "dense" else art
        rows.append({"model": k, "params": ev.count_parameters(m), "weights MB": round(weights_bytes(path) / 2**20, 1),
                     f"forward {args.tokens} tok s": round(best[k], 3),
                     "tokens/s": round(args.tokens / best[k], 1)})
    rows[1]["speedup"] = round(best["dense"] / best["compressed"], 2)
    rows[1]["size ratio"] = round(rows[1]["weights MB"] / rows[0]["weights MB"], 3)
    print(text_table(rows))
    meta = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "artifact": str(art),
            "recipe": report["recipe"]["name"], "threads": args.threads, "repeats": args.repeats,
            "peak_memory_mb_of_compress_run": report.get("peak_memory_mb"), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(["# CPU forward speed and size\n", f"Command: `{meta['command']}`\n",
                                                 *(f"- {k}: {v}" for k, v in meta.items() if k != "command"), "",
                                                 markdown_table(rows), ""]))


if __name__ == "__main__":
    main()
