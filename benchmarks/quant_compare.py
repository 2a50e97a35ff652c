"""Quantization methods side by side on the packaged default model, one run, same calibration windows.

    python benchmarks/quant_compare.py [--methods all] [--windows 64] [--max-windows 32] [--threads 2]

Each method runs in its own subprocess (so its peak memory is its own) on a fresh copy of the dense model:
RTN and GPTQ at 4 and 3 bits (group 64, symmetric, act-order with static groups; damping 0.1 as the recipes use,
and the paper's 0.01), gptqmodel 7.6.0's GPTQ at exactly our settings (same windows, batch 8, fp32, desc_act with
static groups, damp 0.1, no true-sequential, no GAR/MSE extras; needs the `interop` extra), and mixed precision at an average of 3.25 bits with LIM, ZD and three random layer rankings
against uniform 3-bit. Reports held-out perplexity in the calibration domain (pydoc) and
out of it (licenses), bits per weight (codes + scales), quantization seconds and peak resident memory; writes
docs/results/quant_compare.{json,md} and, when matplotlib is installed, quant_compare.png (perplexity vs bits).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from _harness import benchmark_args, default_setup, handled_alone, ppl_panels, quantized_bits, run_pass, run_table
G = 64
GPTQ = {"pass": "gptq", "group_size": G, "act_order": True, "static_groups": True, "damp": 0.1}  # the recipes'
METHODS = {
    "rtn w4": {"pass": "rtn", "bits": 4, "group_size": G},
    "gptq w4 (damp 0.01)": {**GPTQ, "bits": 4, "damp": 0.01},
    "gptq w4": {**GPTQ, "bits": 4},
    "rtn w3": {"pass": "rtn", "bits": 3, "group_size": G},
    "gptq w3 (damp 0.01)": {**GPTQ, "bits": 3, "damp": 0.01},
    "gptq w3": {**GPTQ, "bits": 3},
    "gptq mixed 3.25 lim": {**GPTQ, "bits": {"average": 3.25, "choices": [3, 4], "importance": "lim"}},
    "gptq mixed 3.25 zd": {**GPTQ, "bits": {"average": 3.25, "choices": [3, 4], "importance": "zd"}},
}
GPTQMODEL = {"gptqmodel w4": 4, "gptqmodel w3": 3}
for _seed in range(3):  # one random ranking is an anecdote: the control is several seeds
    METHODS[f"gptq mixed 3.25 random s{_seed}"] = {
        **GPTQ, "bits": {"average": 3.25, "choices": [3, 4], "importance": "random"}, "_seed": _seed}


def run_one(label: str, args) -> dict:
    """Quantize a fresh dense model with one method and evaluate it (runs inside the child process)."""
    from compress.pipeline import EVAL_BATCH

    recipe, model, calib, sets = default_setup(args.windows, args.max_windows, args.threads)
    row = {"method": label}
    if label in GPTQMODEL:
        from compress.models import resolve_model

        row.update(run_gptqmodel(model, resolve_model(recipe.model).path, calib, GPTQMODEL[label]))
    elif label != "dense":
        spec = dict(METHODS[label])
        seed = spec.pop("_seed", 0)
        rep, plan, seconds = run_pass(recipe, spec, model, calib, seed)
        if not isinstance(spec["bits"], int):  # mixed precision: which layers got the wider width
            row["4-bit layers"] = " ".join(str(i) for i, b in enumerate(rep.summary["layer_bits"]) if b == 4)
        row.update({**quantized_bits(plan), "quant s": round(seconds, 1), "fallbacks": len(rep.fallbacks)})
    row.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    row["peak MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def run_gptqmodel(model, path: Path, calib, bits: int) -> dict:
    """Quantize with gptqmodel at our settings, then copy the weights its runtime dequantizes into our fp32 model, so
    both are scored by the same evaluation code."""
    import tempfile

    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qc = QuantizeConfig(bits=bits, group_size=G, sym=True, desc_act=True, static_groups=True, act_group_aware=False,
                        damp_percent=GPTQ["damp"], true_sequential=False, mse=0.0)
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
    m = GPTQModel.load(str(path), qc, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    m.quantize(data, batch_size=8)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        m.save(tmp)
        del m
        q = GPTQModel.load(tmp, device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
        n = bits_total = 0
        with torch.no_grad():
            for name, mod in q.named_modules():
                if type(mod).__name__ != "TorchLinear":
                    continue
                w = mod.dequantize_weight().T.float()
                model.get_submodule(name).weight.copy_(w)
                n += w.numel()
                bits_total += bits * w.numel() + mod.scales.numel() * 16
    ours = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name)
    if n != ours:
        raise SystemExit(f"gptqmodel quantized {n} decoder weights, ours {ours}: not the same layers")
    return {"avg bits": float(bits), "bits/weight": round(bits_total / n, 3), "quant s": round(seconds, 1),
            "fallbacks": None}


def main() -> None:
    args = benchmark_args(__doc__, "quant_compare").parse_args()
    if handled_alone(args, run_one, plot):
        return
    rows, out = run_table(__file__, args, ["dense", *METHODS, *GPTQMODEL], "Quantization compared",
                          {"bits/weight": "codes + one 16-bit scale per group of 64 (symmetric: no zero points)"},
                          {"GPTQMODEL_CPU_WORKERS": str(min(args.threads, os.cpu_count() or 1))})
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against bits per weight, one panel per text; marker by method family."""
    style = {"gptqmodel": ("D", "tab:orange"), "rtn": ("s", "tab:red"), "gptq w": ("o", "tab:blue"), "lim": ("^", "tab:green"),
             "zd": ("v", "tab:purple"), "random": ("x", "tab:gray")}

    def draw(ax, key):
        for r in rows[1:]:
            marker, color = next(v for k, v in style.items() if k in r["method"])
            filled = "0.01" not in r["method"]
            if marker == "x":  # an unfilled marker takes only a colour
                ax.scatter(r["bits/weight"], r[key], marker=marker, s=50, label=r["method"], color=color)
            else:
                ax.scatter(r["bits/weight"], r[key], marker=marker, s=50, label=r["method"],
                           color=color if filled else "none", edgecolors=color)
        ax.axhline(rows[0][key], color="black", linestyle="--", linewidth=1, label="dense")

    ppl_panels(rows, draw, "bits per weight (codes + 16-bit scales)",
               "SmolLM2-135M, group 64 symmetric; hollow = damp 0.01", path)


if __name__ == "__main__":
    main()
