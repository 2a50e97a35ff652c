"""Batch-1 greedy decoding on CPU: the dense default model against its shipped artifacts, one process per row.

    python benchmarks/decode_speed.py [--threads 2] [--prompts 8] [--build] [--methods all]

Every row decodes the same prompts (128-token windows of the pydoc held-out split, seed 0) for 128 new tokens each,
greedy, through transformers' generate with its KV cache: tokens/s over all new tokens, the median first-token
latency (prefill + one step), and the resident memory the loaded model added to the process. Artifacts load with
kernel='cpu' (torch's int4 kernel); each one's greedy tokens are compared with the oracle (kernel='dense': the
reference's own dequantized weights, bit for bit, at a dense model's speed): prompts identical, and the new tokens
before the first divergence. Artifacts are read from --artifacts (default ~/.cache/compress/decode_artifacts/NAME),
built there with `compress run` when --build is given (minutes each); a missing one is a row saying so.
Writes docs/results/decode_speed.{json,md,png}.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import ROOT, benchmark_args, handled_alone, pyplot, run_each, write_results  # noqa: E402

PROMPT_TOKENS = NEW_TOKENS = 128
# label -> (artifact name, recipe, --set overrides); None: the dense source model
ROWS: dict[str, tuple[str, str, list[str]] | None] = {
    "dense fp32": None,
    "dense bf16": None,
    "4-bit g64": ("llama-w4", "llama-w4.yaml", []),
    "3-bit g64": ("llama-w3", "llama-w4.yaml", ["passes.0.bits=3"]),
    "knapsack 3.0-bit": ("llama-w3-knapsack", "llama-w3-knapsack.yaml", []),
    "30% pruned": ("llama-30pct-adaptive", "llama-30pct-adaptive.yaml", []),  # the adaptive cut, no healing
    "30% pruned, healed (main job)": ("llama-30pct", "llama-30pct.yaml", []),
    "30% pruned + 4-bit": ("llama-30pct-w4", "llama-30pct-w4.yaml", []),
}
DEFAULT_ARTIFACTS = Path.home() / ".cache" / "compress" / "decode_artifacts"


def _rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _prompts(tokenizer, n: int):
    """(n, PROMPT_TOKENS) token windows of the pydoc held-out split, seed 0."""
    from calibration.sources import load_corpus, sample_windows

    tokens = load_corpus("pydoc").tokens(tokenizer, "heldout", max_tokens=400_000)
    return sample_windows(tokens, n, PROMPT_TOKENS, 0, "decode prompts")


def _bytes_per_token(model) -> int:
    """Weight bytes one decoded token reads: every linear (packed codes, scales and zero points for a quantized one;
    the lm_head too), not the embedding table (one row is gathered)."""
    from torch import nn

    from export.qlinear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            parts = [module.weight_packed, module.weight_scale, module.weight_zero_point, module.bias]
            total += sum(t.numel() * t.element_size() for t in parts if t is not None)
        elif isinstance(module, nn.Linear):
            total += sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)
    return total


def _decode(model, tokenizer, prompts) -> tuple[list[list[int]], float, list[float]]:
    """Greedy NEW_TOKENS per prompt: (tokens per prompt, total seconds, first-token seconds per prompt)."""
    from compress.evaluate import pad_token_id
    from export.generate import generate

    pad = pad_token_id(model)
    generate(model, tokenizer, prompts[:1, :16], 4, pad)  # warm-up: allocations, first-call dispatch
    runs = [generate(model, tokenizer, p[None], NEW_TOKENS, pad, min_new_tokens=NEW_TOKENS) for p in prompts]
    return [r.token_ids for r in runs], sum(r.seconds for r in runs), [r.first_token_seconds for r in runs]


def run_one(label: str, args) -> dict:
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    import export
    from compress.models import load_model, resolve_model

    spec = ROWS[label]
    source = resolve_model("smollm2-135m")
    _, tokenizer = load_model(source)
    prompts = _prompts(tokenizer, args.prompts)
    del _
    art = None if spec is None else Path(args.artifacts) / spec[0]
    if art is not None and not (art / "manifest.json").is_file():
        return {"model": label, "note": f"no artifact at {art} (run with --build)"}
    before = _rss_mb()
    if art is None:
        model = load_model(source)[0].to(torch.bfloat16 if "bf16" in label else torch.float32).eval()
    else:
        model = export.load(art, kernel="cpu")
    loaded = _rss_mb() - before
    read = _bytes_per_token(model)
    tokens, seconds, first = _decode(model, tokenizer, prompts)
    row: dict[str, object] = {"model": label, "tokens/s": round(len(prompts) * NEW_TOKENS / seconds, 2),
                              "first token s": round(statistics.median(first), 3), "loaded MB": round(loaded, 1),
                              "MB read/token": round(read / 2**20, 1)}
    if art is not None:
        del model
        oracle = export.load(art, kernel="dense")
        want, _, _ = _decode(oracle, tokenizer, prompts)
        agree = [next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), NEW_TOKENS)
                 for got, ref in zip(tokens, want, strict=True)]
        row["greedy = oracle"] = f"{sum(a == NEW_TOKENS for a in agree)}/{len(agree)} prompts"
        row["tokens before divergence"] = f"{sum(agree)}/{len(agree) * NEW_TOKENS}"
        kernels: dict[str, int] = {}
        for module in oracle.modules():
            if hasattr(module, "bits"):
                kernels[f"{module.bits}-bit"] = kernels.get(f"{module.bits}-bit", 0) + 1
        row["quantized linears"] = ", ".join(f"{v} x {k}" for k, v in sorted(kernels.items())) or "-"
    return row


def build(args, labels: list[str]) -> None:
    """`compress run` each missing artifact into --artifacts (evaluation off: only the weights matter here)."""
    for label in labels:
        spec = ROWS[label]
        if spec is None or (Path(args.artifacts) / spec[0] / "manifest.json").is_file():
            continue
        name, recipe, sets = spec
        cmd = [str(Path(sys.executable).parent / "compress"), "run", str(ROOT / "recipes" / recipe), "--out",
               str(Path(args.artifacts) / name), "--set", "evaluate.enabled=false",
               *sum((["--set", s] for s in sets), [])]
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in rows if "tokens/s" in r]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([r["model"] for r in rows], [r["tokens/s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["tokens/s"], i, f" {r['tokens/s']:.1f} ({r['loaded MB']:.0f} MB)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"tokens/s, batch 1, greedy, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = benchmark_args(__doc__, "decode_speed")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS))
    ap.add_argument("--build", action="store_true", help="build missing artifacts with compress run first")
    args = ap.parse_args()
    if handled_alone(args, run_one, plot):
        return
    labels = list(ROWS) if args.methods == ["all"] else args.methods
    if args.build:
        build(args, labels)
    extra = ["--prompts", str(args.prompts), "--artifacts", args.artifacts]
    rows = run_each(__file__, labels, args, extra_args=extra)
    meta = {"threads": args.threads, "prompts": f"{args.prompts} x {PROMPT_TOKENS} tokens, pydoc held-out, seed 0",
            "decoding": f"greedy, batch 1, {NEW_TOKENS} new tokens each, KV cache, one run",
            "kernels": "artifacts: kernel='cpu' (torch's int4 kernel, bfloat16); oracle: kernel='dense'",
            "machine": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"}
    dense = next((r for r in rows if r["model"] == "dense fp32" and "tokens/s" in r), None)
    for r in rows:
        if dense is not None and "tokens/s" in r:
            r["x fp32"] = round(r["tokens/s"] / dense["tokens/s"], 2)
            r["bytes ceiling x"] = round(dense["MB read/token"] / r["MB read/token"], 2)
    out = Path(args.out)
    write_results(out, "Decode speed (CPU, batch 1)", __file__, meta, rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
