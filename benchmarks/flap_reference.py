"""Our FLAP pass against the FLAP reference (github CASIA-IVA-Lab/FLAP, "AL-AM", WIFV; re-implemented in
benchmarks/_flap_ref.py, key-value groups pruned whole), side by side in one run, and one factor at a time between
them.

    python benchmarks/flap_reference.py [--targets 0.3 0.2] [--threads 2] [--max-windows 32]

Same model (the packaged SmolLM2-135M), same calibration text (the pydoc calibration split), perplexity on held-out
pydoc and on the license texts (as `compress run` evaluates). Calibration settings: ours, 64 x 256 windows drawn
without overlap (`calibration.windows`/`seq_len` of the default recipe), and the reference's, 1024 windows of 128
tokens at uniform random starts (its data loader's draw: the split holds 91,805 tokens, so such windows overlap).
The statistics of the dense model are collected once per calibration setting (both ways: sums over tokens for our
pass, the reference's running per-window estimate) and cached (--cache); every row is then a score, a threshold and
a cut of a fresh copy of the dense model. The "compress FLAP pass" rows run the pass itself (benchmarks/_harness.py
`run_pass`), and the script asserts that they cut exactly what the cached-statistics path cuts for our settings,
and that the reference's decision as written there equals the factor-by-factor variant at the reference's settings.
Writes docs/results/flap_reference.{json,md}.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from _flap_ref import OURS, REFERENCE, LayerStats, RunningStats, Variant, keeps, means, reference_keeps, with_
from _harness import benchmark_args, default_setup, run_pass, write_results

CALIBRATIONS = {  # label: (windows, seq_len, how drawn)
    "64x256": (64, 256, "disjoint"),
    "128x128": (128, 128, "disjoint"),
    "1024x128": (1024, 128, "random starts"),
}

# (label, calibration, variant): the rows of the one-factor ablation at the first target
ABLATION: list[tuple[str, str, Variant]] = [
    ("ours, round_to 1", "64x256", with_(OURS, round_to=1)),
    ("ours, standardize channel", "64x256", with_(OURS, standardize="channel")),
    ("ours, standardize group", "64x256", with_(OURS, standardize="group")),
    ("ours, standardize none", "64x256", with_(OURS, standardize="none")),
    ("ours, attention score squared", "64x256", with_(OURS, attn_power=2)),
    ("ours, running fluctuation", "64x256", with_(OURS, fluctuation="running")),
    ("ours, round_to 1, reference threshold", "64x256", with_(OURS, round_to=1, threshold="reference")),
    ("ours, group cost as MHA heads", "64x256", with_(OURS, group_cost="mha")),
    ("ours, no compensation", "64x256", with_(OURS, compensate=False)),
    ("ours", "128x128", OURS),
    ("reference, sample variance", "1024x128", with_(REFERENCE, fluctuation="sample")),
    ("reference, attention score not squared", "1024x128", with_(REFERENCE, attn_power=1)),
    ("reference, standardize head", "1024x128", with_(REFERENCE, standardize="head")),
    ("reference, standardize group", "1024x128", with_(REFERENCE, standardize="group")),
    ("reference, our threshold", "1024x128", with_(REFERENCE, threshold="ours")),
    ("reference, our threshold, round_to 8", "1024x128", with_(REFERENCE, threshold="ours", round_to=8)),
    ("reference, no compensation", "1024x128", with_(REFERENCE, compensate=False)),
    ("reference", "128x128", REFERENCE),
]

# the pass itself (recipe data on top of the default's), and the variant whose cut it must equal
PASS_ROWS: dict[str, tuple[dict, Variant]] = {
    "ours: compress FLAP pass": ({}, OURS),
    "ours: compress FLAP pass, standardize channel": ({"standardize": "channel"}, with_(OURS, standardize="channel")),
}

# rows at every target after the sides: the settings the ablation points to
BEST: list[tuple[str, str, Variant]] = [
    ("ours, standardize channel", "64x256", with_(OURS, standardize="channel")),
    ("ours, standardize channel, uniform", "64x256", with_(OURS, standardize="channel", structure="uniform")),
    ("ours, standardize channel, uniform", "128x128", with_(OURS, standardize="channel", structure="uniform")),
    ("ours, standardize channel, round_to 1", "64x256", with_(OURS, standardize="channel", round_to=1)),
    ("ours, standardize channel, attention score squared", "64x256",
     with_(OURS, standardize="channel", attn_power=2)),
]

# rows at every target: the two sides at both calibration settings
SIDES: list[tuple[str, str, Variant]] = [
    ("reference", "1024x128", REFERENCE),
    ("reference", "64x256", REFERENCE),
    ("reference", "128x128", REFERENCE),
    ("ours", "1024x128", OURS),
    ("ours, standardize channel", "1024x128", with_(OURS, standardize="channel")),
    ("ours, standardize channel", "128x128", with_(OURS, standardize="channel")),
]


READING = "\n## Reading\n"  # the findings written under the generated table start here


def draw(tokens: torch.Tensor, label: str) -> torch.Tensor:
    """Calibration windows (N, T) int64 of a setting: disjoint (as the pipeline draws) or at uniform random starts
    in [0, len - T) (as the reference's loader draws), seed 0."""
    from calibration.sources import sample_windows

    n, seq_len, how = CALIBRATIONS[label]
    if how == "disjoint":
        return sample_windows(tokens, n, seq_len, 0, f"calibration {label}")
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=torch.Generator().manual_seed(0))
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def collect(model, windows: torch.Tensor, batch_size: int = 8) -> list[LayerStats]:
    """The dense model's o_proj / down_proj input statistics per block: the engine's sums over tokens and the
    reference's running estimate, fed one window at a time."""
    from calibration.capture import for_each_block
    from compress.models import llama

    layers = llama.blocks(model)
    hidden = llama.hidden_size(model)
    running = [(RunningStats(), RunningStats()) for _ in layers]
    out: list[LayerStats] = []

    def feed(stats: RunningStats):
        def hook(_m, args, _out):
            for x in args[0]:  # (T, in) per window
                stats.add_window(x)
        return hook

    handles = []
    for block, (o_run, down_run) in zip(layers, running, strict=True):
        lin = llama.linears(block)
        handles += [lin["o_proj"].register_forward_hook(feed(o_run)),
                    lin["down_proj"].register_forward_hook(feed(down_run))]

    def watch(_i, block):
        lin = llama.linears(block)
        return {"o_proj": lin["o_proj"], "down_proj": lin["down_proj"]}

    def visit(i, block, _inputs, _outputs, s):
        shape = llama.block_shape(block)
        lin = llama.linears(block)
        out.append(LayerStats(s["o_proj"], s["down_proj"], *running[i], lin["o_proj"].weight.detach().clone(),
                              lin["down_proj"].weight.detach().clone(), shape.num_attention_heads,
                              shape.num_key_value_heads, llama.group_params(shape, hidden),
                              llama.channel_params(hidden)))

    try:
        for_each_block(model, layers, windows, visit, watch, batch_size=batch_size, desc="statistics")
    finally:
        for h in handles:
            h.remove()
    return out


def cached_stats(model, windows: torch.Tensor, cache: Path) -> tuple[list[LayerStats], float]:
    """collect(), its statistics stored under `cache` by a hash of the windows (the weights are the model's);
    (stats, seconds spent collecting: 0 when cached)."""
    key = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    path = cache / f"flap-stats-{windows.shape[0]}x{windows.shape[1]}-{key}.pt"
    fresh = collect(model, windows[:1])  # one window: the shapes and weights, in a second
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return [replace(s, o=o, down=d, o_run=orun, down_run=drun)
                for s, (o, d, orun, drun) in zip(fresh, saved, strict=True)], 0.0
    t0 = time.perf_counter()
    stats = collect(model, windows)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    torch.save([(s.o, s.down, s.o_run, s.down_run) for s in stats], path)
    return stats, seconds


def cut(dense, stats: list[LayerStats], v: Variant, ratio: float, faithful: bool = False):
    """A copy of `dense` pruned by variant `v` (or, with `faithful`, by reference_keeps); (model, kept per layer)."""
    from compress.models import llama
    from compress.ops.importance import compensation_bias

    kept = reference_keeps(stats, ratio) if faithful else keeps(stats, v, ratio)
    model = copy.deepcopy(dense)
    for block, k, s, (o_mean, down_mean) in zip(llama.blocks(model), kept, stats, means(stats, v), strict=True):
        shape = llama.block_shape(block)
        removed_dims = (~k.groups).repeat_interleave(shape.group_size * shape.head_dim).nonzero().flatten()
        removed_ch = (~k.channels).nonzero().flatten()
        o_bias = compensation_bias(s.o_weight, o_mean, removed_dims) if v.compensate and removed_dims.numel() else None
        down_bias = (compensation_bias(s.down_weight, down_mean, removed_ch) if v.compensate and removed_ch.numel()
                     else None)
        llama.prune_attention_groups(block, k.groups.nonzero().flatten(), o_bias)
        llama.prune_mlp_channels(block, k.channels.nonzero().flatten(), down_bias)
    return model, kept


def row(label: str, calib: str, ratio: float, model, dense_params: int, sets, kept=None) -> dict:
    """The table row of a pruned (or the dense) model: what it kept and its perplexities."""
    from compress.pipeline import EVAL_BATCH, decoder_params

    r = {"method": label, "calibration": calib, "target": ratio, "eval windows": _n_windows(sets),
         "removed": round(1 - decoder_params(model) / dense_params, 4) if ratio else ""}
    if kept is not None:
        r["kv groups kept"] = sum(int(k.groups.sum()) for k in kept)
        r["mlp kept"] = sum(int(k.channels.sum()) for k in kept)
        r["min mlp"] = min(int(k.channels.sum()) for k in kept)
    r.update({f"ppl {k}": round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
    print(r, flush=True)
    return r


def _n_windows(sets) -> int:
    return max(w.shape[0] for w in sets.windows.values())


def first_windows(sets, n: int):
    """The evaluation sets cut to their first `n` windows per text (what max_windows = n would have read)."""
    from compress.pipeline import EvalSets

    return EvalSets({k: w[:n] for k, w in sets.windows.items()}, sets.notes)


class RowCache:
    """Rows already measured, by (method, calibration, variant, target, evaluation windows): a JSON file, so an
    interrupted run or a rerun with more rows measures each row once."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, make) -> dict:
        if key not in self.rows:
            row = make()
            if self.path.exists():  # rows another run added meanwhile
                self.rows.update(json.loads(self.path.read_text()))
            self.rows[key] = row
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1))
        return self.rows[key]


def main() -> None:
    ap = benchmark_args(__doc__, "flap_reference")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.2])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "compress" / "flap_reference")
    ap.add_argument("--no-ablation", action="store_true", help="only the two sides at each target")
    ap.add_argument("--ablation-windows", type=int, default=None,
                    help="evaluate the one-factor rows on the first N of the --max-windows windows (a cheaper screen)")
    ap.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS),
                    help="only the rows calibrated on these settings (a partial table while statistics are missing)")
    ap.add_argument("--cached-only", action="store_true", help="write the table from the rows measured so far")
    args = ap.parse_args()
    from calibration.sources import load_corpus, tokenize
    from compress.models import load_model, resolve_model
    from compress.pipeline import decoder_params

    recipe, dense, calib64, sets = default_setup(64, args.max_windows, args.threads)
    dense.eval()
    _, tok = load_model(resolve_model(recipe.model))
    tokens = tokenize(tok, load_corpus("pydoc").split("calibration"))
    windows = {label: draw(tokens, label) for label in CALIBRATIONS}
    if not torch.equal(windows["64x256"], calib64):
        raise SystemExit("the 64x256 windows differ from the harness's")
    stats: dict[str, list[LayerStats]] = {}
    collect_s: dict[str, float] = {}

    def stats_of(calib: str) -> list[LayerStats]:
        if calib not in stats:
            stats[calib], collect_s[calib] = cached_stats(dense, windows[calib], args.cache)
        return stats[calib]

    dense_params = decoder_params(dense)
    cache = RowCache(args.cache / "rows.json")
    n_full, n_screen = args.max_windows, args.ablation_windows or args.max_windows
    screens = {n_full: sets, n_screen: first_windows(sets, n_screen)}

    def measure(label: str, calib: str, v: Variant | None, ratio: float, n: int) -> dict | None:
        def make() -> dict:
            if v is None:  # the pass itself, checked against the cached-statistics path
                spec, same = PASS_ROWS[label]
                model = copy.deepcopy(dense)
                _, plan, _ = run_pass(recipe, {"pass": "flap", "target": ratio, **spec}, model, windows[calib])
                _, kept = cut(dense, stats_of(calib), same, ratio)
                for i, k in enumerate(kept):
                    s = plan.blocks[i].pruned[0]
                    if (s.kept_kv_groups != k.groups.nonzero().flatten().tolist()
                            or s.kept_mlp_channels != k.channels.nonzero().flatten().tolist()):
                        raise SystemExit(f"layer {i}: the pass and the cached-statistics path keep different units")
                return row(label, calib, ratio, model, dense_params, screens[n], kept)
            model, kept = cut(dense, stats_of(calib), v, ratio)
            if v == REFERENCE:
                _, faithful = cut(dense, stats_of(calib), v, ratio, faithful=True)
                for i, (a, b) in enumerate(zip(kept, faithful, strict=True)):
                    if not (torch.equal(a.groups, b.groups) and torch.equal(a.channels, b.channels)):
                        raise SystemExit(f"layer {i}: reference_keeps and the REFERENCE variant differ ({calib})")
            return row(label, calib, ratio, model, dense_params, screens[n], kept)

        key = f"{label}|{calib}|{v!r}|{ratio}|{n}"
        return cache.rows.get(key) if args.cached_only else cache.get(key, make)

    plan_rows: list[tuple[str, str, Variant | None, float, int]] = []
    for ratio in args.targets:
        plan_rows += [("ours: compress FLAP pass", "64x256", None, ratio, n_full),
                      ("ours: compress FLAP pass, standardize channel", "128x128", None, ratio, n_full),
                      *[(label, calib, v, ratio, n_full) for label, calib, v in SIDES + BEST]]
    if not args.no_ablation:
        ratio = args.targets[0]
        if n_screen != n_full:
            plan_rows += [("ours", "64x256", OURS, ratio, n_screen),
                          ("reference", "64x256", REFERENCE, ratio, n_screen),
                          ("reference", "1024x128", REFERENCE, ratio, n_screen)]
        plan_rows += [(label, calib, v, ratio, n_screen) for label, calib, v in ABLATION]
    rows = [cache.get(f"dense||None|0|{n}", lambda n=n: row("dense", "", 0.0, dense, dense_params, screens[n]))
            for n in sorted({n_full, n_screen}, reverse=True)]
    rows += [r for spec in plan_rows if spec[1] in args.calibrations and (r := measure(*spec)) is not None]
    base = "1024x128" if "1024x128" in args.calibrations else "64x256"
    for r in rows:  # perplexity relative to the reference (at `base`), same target and evaluation windows
        ref = next((x for x in rows if x["method"] == "reference" and x["calibration"] == base
                    and x["target"] == r["target"] and x["eval windows"] == r["eval windows"]), None)
        for key in [k for k in r if k.startswith("ppl ")]:
            r[f"vs ref {key[4:]} %"] = round(100 * (r[key] / ref[key] - 1), 1) if ref and r["target"] else ""
    out = Path(args.out)
    md = out.with_suffix(".md")
    reading = md.read_text().partition(READING)[2] if md.exists() else ""  # the hand-written findings survive a rerun
    write_results(out, "FLAP: our pass against the reference (CASIA-IVA-Lab/FLAP), one factor at a time",
                  __file__, {
                      "model": recipe.model,
                      "calibration": "pydoc calibration split (91,805 tokens): " + "; ".join(
                          f"{k} = {n} windows of {t} tokens, {how}" for k, (n, t, how) in CALIBRATIONS.items()),
                      "statistics seconds": {k: round(v, 1) if v else "cached" for k, v in collect_s.items()},
                      "perplexity": f"seq_len 256, the first {args.max_windows} windows per text (one-factor rows: "
                                    f"the first {n_screen}, column 'eval windows')",
                      "vs ref": f"perplexity relative to the reference calibrated on {base}, same target and "
                                "evaluation windows",
                      "threads": args.threads,
                      "removed": "share of decoder-block projection parameters removed",
                      "kv groups kept": "of 30 x 3; mlp kept: of 30 x 1536; min mlp: the narrowest layer's",
                      "reference": "benchmarks/_flap_ref.py (factors listed there); ours: round_to 8, head "
                                   "standardization, sample variance, forced best unit per layer",
                      "cache": str(args.cache.relative_to(Path.home()) if args.cache.is_relative_to(Path.home())
                                   else args.cache),
                  }, rows)
    if reading:
        md.write_text(md.read_text() + READING + reading)


if __name__ == "__main__":
    main()
