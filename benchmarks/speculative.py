"""Draft-and-verify decoding on CPU, batch 1: plain greedy against n-gram, Medusa-heads and draft-model drafting, for
the dense default model and its 4-bit artifact, one process per row.

    python benchmarks/speculative.py --heads DENSE_HEADS_ARTIFACT [--heads-w4 W4_HEADS_ARTIFACT] \
        [--threads 2] [--prompts 50] [--new-tokens 128] [--methods all]

Prompts: --prompts windows of PROMPT_TOKENS tokens, half from the pydoc held-out split (code documentation), half
from the news held-out split (prose that seldom repeats its prompt), seed 0. Every row decodes all of them greedily
for --new-tokens tokens (fewer where the model ends its text): tokens/s over all new tokens, the speedup over the
same model's plain greedy row, drafted / accepted tokens and the mean accepted length (accepted drafts per
verifying forward), and how many outputs equal plain greedy's token for token. Heads rows also give each head's
top-1 accuracy on the plain greedy continuations (head k at position t against the token at t + k + 2). Heads come
from artifacts with a medusa pass (export.medusa.load_heads): --heads for the dense model, --heads-w4 for the 4-bit
one (a missing one is a row saying so). The 4-bit artifact is decode_speed's (--artifacts/llama-w4, kernel='cpu').
Rows are cached in --cache (the plain rows' tokens too), so an interrupted run continues; --fresh starts over.
Writes docs/results/speculative.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import ROOT, benchmark_args, handled_alone, pyplot, write_results  # noqa: E402

PROMPT_TOKENS = 128
DOMAINS = ("pydoc", "news")
DEFAULT_ARTIFACTS = Path.home() / ".cache" / "compress" / "decode_artifacts"
# label -> (target model: "dense" or an artifact name under --artifacts, draft: none | ngram | heads | model:NAME)
ROWS: dict[str, tuple[str, str]] = {
    "dense": ("dense", "none"),
    "dense + ngram": ("dense", "ngram"),
    "dense + heads": ("dense", "heads"),
    "dense + 4-bit drafts": ("dense", "model:llama-w4"),
    "4-bit": ("llama-w4", "none"),
    "4-bit + ngram": ("llama-w4", "ngram"),
    "4-bit + heads": ("llama-w4", "heads"),
}


def _prompts(tokenizer, n: int):
    """(n, PROMPT_TOKENS) token windows: the first half from pydoc's held-out split, the rest from news', seed 0."""
    import torch

    from calibration.sources import load_corpus, sample_windows

    counts = (n - n // 2, n // 2)
    return torch.cat([sample_windows(load_corpus(d).tokens(tokenizer, "heldout", max_tokens=400_000), c, PROMPT_TOKENS,
                                     0, f"{d} prompts") for d, c in zip(DOMAINS, counts, strict=True)])


def _head_accuracy(model, heads, prompts, outputs: list[list[int]]) -> list[float]:
    """Top-1 accuracy of each head on the model's own continuations: head k at position t against token t + k + 2,
    over positions from the prompt's last token on."""
    import torch

    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    right = torch.zeros(heads.num_heads)
    total = torch.zeros(heads.num_heads)
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs, strict=True):
            seq = torch.cat([prompt, torch.tensor(out, dtype=prompt.dtype)])  # (T + new,)
            hidden = decoder(input_ids=seq[None]).last_hidden_state[0]  # (T + new, H)
            start = prompt.shape[0] - 1
            for k in range(heads.num_heads):
                positions = torch.arange(start, seq.shape[0] - k - 2)  # t with a token at t + k + 2
                if positions.numel() == 0:
                    continue
                guess = lm_head(heads.blocks[k](hidden[positions])).argmax(-1)  # (P,)
                right[k] += (guess == seq[positions + k + 2]).sum()
                total[k] += positions.numel()
    return (right / total.clamp(min=1)).tolist()


def run_one(label: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import export
    from compress.evaluate import pad_token_id
    from compress.models import load_model, resolve_model
    from export.generate import generate
    from export.speculative import DraftCounts, library_generate, timed_speculative

    target, draft = ROWS[label]
    source = resolve_model("smollm2-135m")
    dense, tokenizer = load_model(source)
    prompts = _prompts(tokenizer, args.prompts)
    if target == "dense":
        model = dense.eval()
    else:
        if not (Path(args.artifacts) / target / "manifest.json").is_file():
            return {"row": label, "note": f"no artifact at {Path(args.artifacts) / target} (decode_speed.py --build)"}
        del dense
        model = export.load(Path(args.artifacts) / target, kernel="cpu")
    pad = pad_token_id(model)
    drafter = None
    if draft == "heads":
        heads_path = args.heads if target == "dense" else args.heads_w4
        from export.medusa import load_heads

        drafter = load_heads(Path(heads_path)) if heads_path else None
        if drafter is None:
            return {"row": label, "note": f"no heads (--heads{'' if target == 'dense' else '-w4'} {heads_path})"}
    elif draft.startswith("model:"):
        drafter = export.load(Path(args.artifacts) / draft[len("model:"):], kernel="cpu")
    elif draft == "ngram":
        drafter = "ngram"

    def decode(ids):
        if drafter is None:
            return generate(model, tokenizer, ids, args.new_tokens, pad), DraftCounts(0, 0, 0)
        if draft == "heads":
            return timed_speculative(model, drafter, tokenizer, ids, args.new_tokens)
        return library_generate(model, tokenizer, ids, args.new_tokens, pad, drafter)

    decode(prompts[:1, :16])  # warm-up: allocations, first-call dispatch
    runs = [decode(p[None]) for p in prompts]
    seconds = sum(g.seconds for g, _ in runs)
    new = sum(g.new_tokens for g, _ in runs)
    steps, drafted, accepted = (sum(getattr(c, f) for _, c in runs) for f in ("steps", "drafted", "accepted"))
    row: dict[str, object] = {"row": label, "tokens/s": round(new / seconds, 2), "new tokens": new,
                              "drafted": drafted, "accepted": accepted,
                              "mean accepted": round(accepted / steps, 3) if steps else None,
                              "tokens": [g.token_ids for g, _ in runs]}
    if draft == "heads":
        acc = _head_accuracy(model, drafter, prompts, [g.token_ids for g, _ in runs])
        row["head accuracy"] = " / ".join(f"{a:.2f}" for a in acc)
    return row


def _key(label: str, args) -> str:
    heads = args.heads if ROWS[label][0] == "dense" else args.heads_w4
    return json.dumps([label, args.prompts, args.new_tokens, args.threads, heads if "heads" in label else None])


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in rows if "tokens/s" in r]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([r["row"] for r in rows], [r["tokens/s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["tokens/s"], i, f" {r['tokens/s']:.1f} ({r.get('speedup', 1):.2f}x)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s, batch 1, greedy (speedup over the same model without drafts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = benchmark_args(__doc__, "speculative")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--heads", help="an artifact with heads trained on the dense model (recipes/llama-medusa.yaml)")
    ap.add_argument("--heads-w4", help="an artifact with heads trained on the 4-bit model (llama-w4-medusa.yaml)")
    ap.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "compress" / "bench" / "speculative_rows.json"))
    ap.add_argument("--fresh", action="store_true", help="forget the cached rows")
    args = ap.parse_args()
    if handled_alone(args, run_one, plot):
        return
    cache_path = Path(args.cache)
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    labels = list(ROWS) if args.methods == ["all"] else args.methods
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    for label in labels:
        if _key(label, args) in cache:
            continue
        cmd = [sys.executable, __file__, "--one", label, "--threads", str(args.threads), "--prompts",
               str(args.prompts), "--new-tokens", str(args.new_tokens), "--artifacts", args.artifacts,
               *(["--heads", args.heads] if args.heads else []), *(["--heads-w4", args.heads_w4] if args.heads_w4
                                                                    else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        cache[_key(label, args)] = json.loads(proc.stdout.strip().splitlines()[-1])
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
        print(label, {k: v for k, v in cache[_key(label, args)].items() if k != "tokens"}, flush=True)
    rows = []
    for label in labels:
        row = dict(cache[_key(label, args)])
        plain_label = next(p for p, (t, d) in ROWS.items() if t == ROWS[label][0] and d == "none")
        plain = cache.get(_key(plain_label, args), {})
        tokens = row.pop("tokens", None)
        if tokens is not None and "tokens" in plain:
            row["speedup"] = round(row["tokens/s"] / plain["tokens/s"], 2)
            same = sum(a == b for a, b in zip(tokens, plain["tokens"], strict=True))
            row["= plain greedy"] = f"{same}/{len(tokens)}"
        rows.append(row)
    meta = {"threads": args.threads,
            "prompts": f"{args.prompts} x {PROMPT_TOKENS} tokens, held-out splits of {' and '.join(DOMAINS)} "
                       "(half each), seed 0",
            "decoding": f"greedy, batch 1, up to {args.new_tokens} new tokens each, KV cache, one run",
            "drafts": "heads: export.speculative (4 a step); ngram: transformers' prompt lookup (4 a step); "
                      "4-bit drafts: transformers' assisted generation with the 4-bit artifact (kernel='cpu')",
            "counts": "heads: exact; library rows: counted from the model's forward calls (see library_generate)",
            "heads": f"dense: {args.heads}; 4-bit: {args.heads_w4}",
            "machine": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"}
    out = Path(args.out)
    write_results(out, "Speculative decoding (CPU, batch 1)", __file__, meta, rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
