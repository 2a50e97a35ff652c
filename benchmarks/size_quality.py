"""Quality against size for every method measured so far: structured pruning and quantization on one axis.

    python benchmarks/size_quality.py

Reads the committed results (prune_compare.json, alloc_compare.json, quant_compare.json; rerun those scripts to
refresh them) and puts every method on one axis: the bytes of the decoder blocks' weights as exported (pruned models
in bf16, 16 bits per weight; quantized ones at their bits per weight, codes + scales). Embeddings and head are the
same for all (the 28M-parameter tied embedding, 56.6 MB in bf16) and left out. Writes docs/results/size_quality.{md,
json,png}: which compression buys the most quality per byte on the default model, in and out of the calibration
domain.
"""

from __future__ import annotations

import json
from pathlib import Path

from _harness import ROOT, ppl_panels, write_results

RESULTS = ROOT / "docs" / "results"
SKIP = ("damp 0.01", "random", "gptqmodel", "zd")  # diagnostics and controls, not choices a user would ship


def rows() -> list[dict]:
    prune = json.loads((RESULTS / "prune_compare.json").read_text())["rows"]
    dense_params = prune[0]["decoder params"]
    out = [{"family": "dense", "method": "dense (bf16)", "decoder MB": round(dense_params * 2 / 1e6, 1),
            **{k: v for k, v in prune[0].items() if k.startswith("ppl ")}, "source": "prune_compare"}]
    for r in prune[1:]:
        out.append({"family": "pruning", "method": f"{r['method']} {round(100 * r['target'])}%",
                    "decoder MB": round(r["decoder params"] * 2 / 1e6, 1),
                    **{k: v for k, v in r.items() if k.startswith("ppl ")}, "source": "prune_compare"})
    seen = set()
    for name in ("alloc_compare", "quant_compare"):
        for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"][1:]:
            method = r["method"] if name == "quant_compare" else f"gptq {r['method']}".replace("gptq uniform w", "gptq w")
            if any(s in method for s in SKIP) or method in seen:
                continue
            seen.add(method)
            out.append({"family": "quantization", "method": method,
                        "decoder MB": round(dense_params * r["bits/weight"] / 8 / 1e6, 1),
                        **{k: v for k, v in r.items() if k.startswith("ppl ")}, "source": name})
    return sorted(out, key=lambda r: -r["decoder MB"])


def plot(table: list[dict], path: Path) -> None:
    style = {"dense": ("*", "black"), "pruning": ("o", "tab:red"), "quantization": ("s", "tab:blue")}

    def draw(ax, key):
        for fam, (marker, colour) in style.items():
            pts = [r for r in table if r["family"] == fam]
            ax.scatter([r["decoder MB"] for r in pts], [r[key] for r in pts], marker=marker, color=colour, label=fam)
        for r in table:
            if r["family"] != "dense":
                ax.annotate(r["method"], (r["decoder MB"], r[key]), fontsize=5, xytext=(3, 2),
                            textcoords="offset points")
        ax.set_xscale("log")

    ppl_panels(table, draw, "decoder-block weights as exported (MB, log)",
               "SmolLM2-135M: quality against size, pruning (bf16) and quantization (packed)", path)


def main() -> None:
    table = rows()
    out = RESULTS / "size_quality"
    write_results(out, "Quality against size, every method", __file__, {
        "decoder MB": "decoder-block parameters x bits per weight / 8 (pruned: 16 bits; quantized: codes + scales)",
        "sources": "the committed prune_compare, alloc_compare and quant_compare results (see their commands)",
        "left out": "diagnostic and control rows (damp 0.01, random and ZD rankings, gptqmodel)"}, table)
    plot(table, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
