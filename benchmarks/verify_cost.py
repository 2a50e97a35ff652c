"""What one draft-and-verify step costs on CPU against one plain decoding step, batch 1: the part of speculative
decoding's speedup that does not depend on the drafter.

    python benchmarks/verify_cost.py [--threads 2] [--artifact W4_ARTIFACT] [--context 200] [--repeats 15]

For the dense default model (float32) and, with --artifact, a quantized artifact (kernel='cpu'): the model's forward
over 1 new token behind a KV cache of --context tokens (plain decoding's step, lm_head on that row), over k + 1 new
tokens (a verifying forward for k drafts, lm_head on every row) with and without export.speculative's
exact_verification (rows computed as one-token forwards would compute them; greedy: the lm_head read once), and four
Medusa heads' drafting through the full lm_head and through the 8192 first rows of it (the cost of a truncated draft
vocabulary, vLLM Medusa's token_map). Each figure is the lower quartile of --repeats runs, milliseconds, one process,
rows in one run. The break-even line: a step of cost c (in plain steps) pays only when it yields more than c tokens,
i.e. the mean accepted length exceeds c - 1. Writes docs/results/verify_cost.{json,md}.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import ROOT, write_results  # noqa: E402

TRUNCATED = 8192


def lower_quartile_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 4]


def measure(label: str, model, context: int, repeats: int) -> list[dict]:
    import torch
    from transformers import DynamicCache

    from export.medusa import MedusaHeads
    from export.speculative import exact_verification

    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    ids = torch.randint(100, 20000, (1, context + 8), generator=torch.Generator().manual_seed(0))
    heads = MedusaHeads(model.config.hidden_size, 4)
    cache = DynamicCache(config=model.config)
    rows: list[dict] = []
    with torch.no_grad():
        decoder(input_ids=ids[:, :context], cache=cache, use_cache=True)

        def forward(n: int) -> None:  # n new tokens behind the cache, lm_head on every row, then the cache restored
            h = decoder(input_ids=ids[:, context:context + n], cache=cache, use_cache=True).last_hidden_state
            lm_head(h).argmax(-1)
            cache.crop(context - cache.get_seq_length())

        plain = lower_quartile_ms(lambda: forward(1), repeats)

        def row(what: str, ms: float) -> None:
            rows.append({"model": label, "step part": what, "ms": round(ms, 1), "x plain step": round(ms / plain, 2)})

        row("plain decoding step (1 token)", plain)
        for k in (2, 4):
            row(f"verifying forward, {k} drafts, as is", lower_quartile_ms(lambda k=k: forward(k + 1), repeats))
            with exact_verification(model, greedy=True):
                row(f"verifying forward, {k} drafts, exact (greedy)",
                    lower_quartile_ms(lambda k=k: forward(k + 1), repeats))
        hidden = torch.randn(model.config.hidden_size)
        weight = lm_head.weight.detach() if hasattr(lm_head, "weight") else None
        row("drafting, 4 heads, full vocabulary", lower_quartile_ms(lambda: heads(hidden, lm_head).argmax(-1), repeats))
        if weight is not None:
            top = weight[:TRUNCATED].contiguous()
            row(f"drafting, 4 heads, {TRUNCATED} tokens",
                lower_quartile_ms(lambda: torch.nn.functional.linear(heads.hidden(hidden), top).argmax(-1), repeats))
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--artifact", help="a quantized artifact (e.g. of recipes/llama-w4.yaml)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "verify_cost"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import export
    from compress.models import load_model, resolve_model

    dense, _ = load_model(resolve_model("smollm2-135m"))
    rows = measure("dense fp32", dense.eval(), args.context, args.repeats)
    del dense
    if args.artifact:
        rows += measure(f"{Path(args.artifact).name} (kernel cpu)", export.load(args.artifact, kernel="cpu"),
                        args.context, args.repeats)
    meta = {"threads": args.threads, "context": f"{args.context} tokens in the KV cache",
            "figure": f"lower quartile of {args.repeats} runs, one process",
            "machine": f"{torch.get_num_threads()} torch threads; "
                       f"load average at start {open('/proc/loadavg').read().split()[0]}"}
    write_results(Path(args.out), "Cost of a verifying step (CPU, batch 1)", __file__, meta, rows)


if __name__ == "__main__":
    main()
