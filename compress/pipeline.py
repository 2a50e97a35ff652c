"""run(recipe) -> RunResult: load -> calibrate -> passes -> evaluate -> export -> reload and compare."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from calibration.budget import check_fits
from calibration.sources import chat_renderer, draw_windows, eval_windows, load_corpus
from compress import evaluate as ev
from compress import journal
from compress.errors import CompressError, InputError
from compress.models import ModelSource, llama, load_model, resolve_model
from compress.models.checks import check_export_dtype
from compress.models.default import runs_dir
from compress.passes import PassContext, make_pass
from compress.plan import Plan
from compress.passes.quantize import check_before_passes
from compress.recipe import GptqConfig, Recipe, RtnConfig
from compress.search.variants import fingerprint
from compress.tables import html_table, markdown_table, text_table
from export.format import DTYPES
from export.interop import (REMOTE_CODE_FILE, artifact_config, block_configs, gptq_tensors, quantized_tensors,
                            remote_code_auto_map, remote_code_source)
from export.loader import load as load_artifact
from export.target import TargetError, check_apart, check_target, recover_leftovers
from export.writer import ArtifactExistsError, ArtifactWriter, sha256_file, source_files

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LOGIT_TOLERANCE = 1e-4  # reloaded vs in-memory, fp32
EVAL_BATCH = 2  # windows per forward in perplexity: logits are (B, T, vocab) fp32, 100 MB per window of 256 here


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_dtype(path: Path) -> torch.dtype:
    """The floating dtype the source checkpoint stores its weights in."""
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                dt = st.get_slice(k).get_dtype()
                if dt in _ST_DTYPES:
                    return _ST_DTYPES[dt]
    return torch.float32


def decoder_params(model) -> int:
    hidden = model.config.hidden_size
    return sum(llama.block_params(llama.block_shape(b), hidden) for b in llama.blocks(model))


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@dataclass
class EvalSets:
    """Held-out token windows per named text, and what was done to the texts on the way (chat rows rendered)."""

    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # each once, in the order the texts were read

    @classmethod
    def build(cls, recipe: Recipe, tokenizer) -> "EvalSets":
        """The first evaluate.max_windows windows of the calibration source's held-out split and of each
        evaluate.extra text (whose rows are read by calibration.field); only those tokens are read."""
        e, c = recipe.evaluate, recipe.calibration
        sets, chat, want = cls(), chat_renderer(tokenizer), e.max_windows * e.seq_len
        corpus = load_corpus(c.source, c.field, chat)
        label = f"{Path(corpus.name).name}-heldout"
        sets.windows[label] = eval_windows(corpus.tokens(tokenizer, "heldout", want), e.seq_len, e.max_windows, label)
        texts = [corpus]
        for name in e.extra:
            texts.append(extra := load_corpus(name, c.field, chat))
            sets.windows[Path(name).name] = eval_windows(extra.tokens(tokenizer, "all", want), e.seq_len,
                                                         e.max_windows, f"evaluate.extra {name!r}")
        sets.notes = list(dict.fromkeys(note for text in texts for note in text.notes))
        return sets

    def perplexities(self, model, batch_size: int) -> dict[str, float]:
        return {name: ev.perplexity(model, w, batch_size) for name, w in self.windows.items()}


@dataclass
class RunResult:
    """What `compress run` produced: the artifact folder and its report."""

    artifact: Path
    report: dict

    def quality_rows(self) -> list[dict]:
        return self.report.get("quality", [])

    def summary_rows(self) -> list[dict]:
        r = self.report
        return [
            {"": "decoder params", "dense": r["decoder_params"]["dense"], "compressed": r["decoder_params"]["compressed"]},
            {"": "all params", "dense": r["params"]["dense"], "compressed": r["params"]["compressed"]},
            {"": "weights MB", "dense": round(r["weights_bytes"]["dense"] / 2**20, 1),
             "compressed": round(r["weights_bytes"]["compressed"] / 2**20, 1)},
        ] + ([{"": "bits per quantized weight", "dense": "", "compressed": r["bits_per_weight"]["stored"]}]
             if r.get("bits_per_weight") else [])

    def __str__(self) -> str:
        r = self.report
        parts = [f"artifact: {self.artifact}", text_table(self.summary_rows())]
        if self.quality_rows():
            parts.append(text_table(self.quality_rows()))
        parts.append(f"reload max |logit diff| {r['verify']['max_abs_logit_diff']:.2e}; stock config: "
                     f"{'yes' if r['stock_config'] else 'no (' + r['stock_config_reason'] + ')'}; "
                     f"{r['seconds']:.0f} s; peak memory {r['peak_memory_mb']:.0f} MB")
        return "\n\n".join(parts)

    def _repr_html_(self) -> str:
        return (f"<p>artifact: <code>{self.artifact}</code></p>" + html_table(self.summary_rows(), title="size")
                + html_table(self.quality_rows(), title="held-out perplexity"))

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), **self.report}


def _card_passes(passes: list[dict]) -> list[str]:
    """Per pass: its per-layer table (widths kept, bits chosen, errors) and any fallback it recorded."""
    lines = []
    for i, rep in enumerate(passes):
        lines += [f"## passes[{i}]: {rep['name']} ({rep['seconds']:.0f} s)", ""]
        if rep.get("rows"):
            lines += [markdown_table(rep["rows"]), ""]
        if rep.get("fallbacks"):
            lines += ["Fallbacks:", "", *[f"- {f}" for f in rep["fallbacks"]], ""]
    return lines


def _model_card(recipe: Recipe, source: ModelSource, report: dict) -> str:
    lines = [
        f"# {recipe.name}",
        "",
        f"Compressed from **{source.identity}** with `compress` ({', '.join(p['name'] for p in report['passes'])}).",
        "",
        "## Results",
        "",
        markdown_table(report["quality"]) if report["quality"] else "(evaluation disabled)",
        "",
        f"Perplexity protocol: {ev.PPL_PROTOCOL}; seq_len {recipe.evaluate.seq_len}, "
        f"at most {recipe.evaluate.max_windows} windows per text. Recovery = dense / compressed perplexity.",
        "",
        markdown_table(RunResult(Path("."), report).summary_rows()),
        "",
        *_card_passes(report["passes"]),
        "## Loading",
        "",
        "```python",
        "import export",
        "model = export.load('PATH')  # our runtime; any structure",
        "```",
    ]
    if report["stock_config"]:
        lines += ["", "Stock transformers reads it too: `AutoModelForCausalLM.from_pretrained('PATH')`."]
    else:
        lines += ["", f"Not a stock transformers layout: {report['stock_config_reason']}."]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _state_for_export(model, layers: list[dict], dtype: torch.dtype, plan: Plan,
                      quant_format: str) -> dict[str, torch.Tensor]:
    """Model weights in the export dtype (quantized linears packed), with zero biases where the stock config implies
    a bias we did not add."""
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    for name, q in plan.quantized.items():
        del state[f"{name}.weight"]
        state.update(gptq_tensors(name, q) if quant_format == "gptq" else quantized_tensors(name, q, dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for i, (block, spec) in enumerate(zip(llama.blocks(model), layers)):
        for name, lin in llama.linears(block).items():
            sub = "self_attn" if name in llama.ATTN else "mlp"
            key = f"model.layers.{i}.{sub}.{name}.bias"
            if name in spec["bias"] and key not in state:
                state[key] = torch.zeros(lin.out_features, dtype=dtype)
    return state


def _round_to_export(model, plan: Plan, dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
    """Make the in-memory weights exactly what the artifact stores: parameters rounded to the export dtype, and each
    quantized weight rebuilt from its codes with scales stored in that dtype (the dequantized product is rounded to
    it too, as every runtime that reads the artifact computes it). Buffers (rotary frequencies) are
    computed at load, not stored, and stay as they are."""
    named = llama.named_linears(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
        for name, q in plan.quantized.items():
            q.scale = q.scale.to(scale_dtype)
            named[name][2].weight.copy_(q.dequantize())


def quantized_bits(state: dict[str, torch.Tensor], plan: Plan) -> dict | None:
    """Bits per quantized weight as stored (codes, scales, zero points, group index) and as theory predicts."""
    if not plan.quantized:
        return None
    n = stored = theory = 0
    for name, q in plan.quantized.items():
        out_f, in_f = q.shape
        n += out_f * in_f
        parts = {k.removeprefix(f"{name}."): t for k, t in state.items()
                 if k.startswith(f"{name}.") and not k.endswith((".bias", ".weight_shape"))}
        stored += sum(t.numel() * t.element_size() * 8 for t in parts.values())
        g = in_f if q.group_size == -1 else q.group_size
        scale = parts.get("weight_scale", parts.get("scales"))
        zeros_stored = "qzeros" in parts or not q.sym
        g_idx_stored = "g_idx" in parts or not q.ordered_groups
        theory += out_f * in_f * q.bits + out_f * (in_f // g) * (scale.element_size() * 8 + (q.bits if zeros_stored else 0))
        theory += 32 * in_f if g_idx_stored else 0
    return {"stored": round(stored / n, 4), "theory": round(theory / n, 4), "quantized_weights": n}


def _check_output(out: Path, overwrite: bool, log) -> None:
    """Repair what interrupted runs left beside `out` (saying so), then refuse an `out` that must not be written."""
    for message in recover_leftovers(out):
        log(f"note: {message}")
    try:
        check_target(out, overwrite)
    except TargetError as err:
        raise InputError(str(err)) from None


def _check_source_apart(out: Path, source: ModelSource) -> None:
    """The artifact never lands in, on or around the model it is made from, and copies nothing from outside it."""
    try:
        check_apart(out, source.path, "the source model folder")
        source_files(source.path)
    except TargetError as err:
        raise InputError(str(err)) from None


def _check_passes_fit(recipe: Recipe, model) -> None:
    """What only the model can tell, before any pass runs (so no pass runs only for a later one to refuse): a
    quantization's targets, pins and budget, and group sizes on the dense and the pruned widths."""
    quant = (GptqConfig, RtnConfig)
    for j, q in enumerate(recipe.passes):
        if isinstance(q, quant):
            check_before_passes(model, q, f"passes[{j}]",
                                [(p, f"passes[{i}]") for i, p in enumerate(recipe.passes[:j]) if not isinstance(p, quant)])


def run(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, log=print,
        resume: bool = False) -> RunResult:
    """Run a validated recipe end to end and write the artifact; see ARCHITECTURE.md for the data flow.

    resume: continue an interrupted run of the same artifact, refusing (with what changed) when the recipe, the
    model files or the calibration tokens differ from the interrupted run's."""
    t0 = time.perf_counter()
    out = Path(out) if out is not None else Path("artifacts") / recipe.name
    _check_output(out, overwrite, log)  # before any work, so nothing is computed only to be refused
    source = resolve_model(recipe.model)
    _check_source_apart(out, source)
    model, tokenizer = load_model(source, recipe.trust_remote_code)
    check_export_dtype(model, recipe.export.dtype)  # before any pass, not at export
    cal = recipe.calibration
    check_fits(model, cal.windows, {"calibration.seq_len": cal.seq_len,
                                    **({"evaluate.seq_len": recipe.evaluate.seq_len} if recipe.evaluate.enabled else {})})
    corpus = load_corpus(cal.source, cal.field, chat_renderer(tokenizer))
    drawn = draw_windows(corpus, tokenizer, cal.windows, cal.seq_len, recipe.seed,
                         f"calibration source {corpus.name!r} (calibration split)")
    calib = drawn.windows
    for note in corpus.notes:
        log(f"note: {note}")
    log(f"calibration: {drawn.describe(f'the calibration split of {corpus.name}')}")
    eval_sets = EvalSets.build(recipe, tokenizer) if recipe.evaluate.enabled else EvalSets()
    for note in eval_sets.notes:
        if note not in corpus.notes:  # said above
            log(f"note: {note}")
    _check_passes_fit(recipe, model)
    log(f"model {source.identity}: {len(llama.blocks(model))} blocks; calibration {tuple(calib.shape)} tokens "
        f"from {corpus.name}")
    source_sha = {p.name: sha256_file(p) for p in sorted(source.path.glob("*.safetensors"))}
    journal_file = journal.journal_path(runs_dir(), out)
    model_files = {**source_sha, "config.json": sha256_file(source.path / "config.json")}
    note = journal.start(journal_file, out, {"recipe": recipe.to_dict(), "model files sha256": model_files,
                                             "calibration tokens sha256": fingerprint(calib)}, resume)
    if note:
        log(note)
    dense_ppl = eval_sets.perplexities(model, EVAL_BATCH)
    dense_params, dense_decoder = ev.count_parameters(model), decoder_params(model)

    plan = Plan()
    # resumable state (variant databases) lives in the user cache, keyed by content, so reruns reuse it
    ctx = PassContext(calibration=calib, plan=plan, batch_size=cal.batch_size, seed=recipe.seed,
                      cache=runs_dir())
    reports = []
    for i, cfg in enumerate(recipe.passes):
        p = make_pass(cfg)
        ctx.index = i
        plan.passes.append(cfg.pass_)
        rep = p.run(model, ctx)
        reports.append(rep)
        scalars = ", ".join(f"{k}={v}" for k, v in rep.summary.items() if not isinstance(v, (list, dict)))
        log(f"\npasses[{i}] {rep.name} ({rep.seconds:.0f} s): {scalars}\n{text_table(rep.rows)}")

    dtype = source_dtype(source.path) if recipe.export.dtype == "auto" else DTYPES[recipe.export.dtype]
    qformat = recipe.export.quant_format
    _round_to_export(model, plan, dtype, torch.float16 if qformat == "gptq" else dtype)
    comp_ppl = eval_sets.perplexities(model, EVAL_BATCH)
    quality = [
        {"text": name, "dense ppl": round(dense_ppl[name], 3), "compressed ppl": round(comp_ppl[name], 3),
         "recovery": round(dense_ppl[name] / comp_ppl[name], 4)}
        for name in dense_ppl
    ]
    layers = [llama.block_shape(b).to_dict() for b in llama.blocks(model)]
    schemes = {n: {**q.scheme(), "format": qformat} for n, q in plan.quantized.items()}
    config, layers, why_not_stock = artifact_config(model.config.to_dict(), layers, schemes, qformat)
    if qformat == "gptq" and why_not_stock:
        raise InputError(f"export.quant_format: gptq cannot store this model: {why_not_stock}")
    config["dtype"] = str(dtype).removeprefix("torch.")
    views = _non_uniform_views(config, layers, why_not_stock, recipe.export.remote_code)
    state = _state_for_export(model, layers, dtype, plan, qformat)
    bits = quantized_bits(state, plan)
    report = {
        "recipe": recipe.to_dict(),
        "source": {"name": source.name, "identity": source.identity, "path": str(source.path),
                   "sha256": source_sha},
        "passes": [r.to_dict() for r in reports],
        "quality": quality,
        "perplexity_protocol": ev.PPL_PROTOCOL,
        "params": {"dense": dense_params, "compressed": ev.count_parameters(model)},
        "decoder_params": {"dense": dense_decoder, "compressed": decoder_params(model),
                           "removed": round(1 - decoder_params(model) / dense_decoder, 4)},
        "stock_config": why_not_stock is None,
        "stock_config_reason": why_not_stock or "",
        **views,
        "fallbacks": [f for r in reports for f in r.fallbacks],
        "export_dtype": str(dtype).removeprefix("torch."),
        "bits_per_weight": bits,
    }
    try:
        with ArtifactWriter(out, overwrite=overwrite) as w:
            w.write_json("config.json", config)
            if views.get("remote_code"):
                w.write_text(REMOTE_CODE_FILE, remote_code_source())
            w.write_weights(state, int(recipe.export.shard_size_mb * 2**20))
            w.copy_tokenizer(source.path)
            w.write_text("recipe.yaml", recipe.to_yaml())
            w.write_json("plan.json", plan.to_dict())
            manifest_fields = dict(
                source=report["source"], architecture={"base_model_type": model.config.model_type, "layers": layers},
                quantization=schemes,
                recipe=recipe.to_dict(), seed=recipe.seed,
            )
            w.write_manifest(**manifest_fields)
            report["verify"] = _compare_reload(model, w.tmp, calib[:2])
            report["weights_bytes"] = {"dense": weights_bytes(source.path), "compressed": weights_bytes(w.tmp)}
            report["seconds"] = round(time.perf_counter() - t0, 1)
            report["peak_memory_mb"] = round(peak_memory_mb(), 1)
            w.write_json("report.json", report)
            w.write_text("README.md", _model_card(recipe, source, report))
            w.write_manifest()
            w.commit()
        for message in w.notes:
            log(f"note: {message}")
    except ArtifactExistsError as err:
        raise InputError(str(err)) from None
    journal.finish(journal_file)
    return RunResult(out, report)


def _non_uniform_views(config: dict, layers: list[dict], why_not_stock: str | None, remote_code: bool) -> dict:
    """For a per-layer (non-stock) config, add in place the nemotron-nas `block_configs` view when the structure is
    expressible in it, and the remote-code `auto_map` when asked; return what the report says about both."""
    if why_not_stock is None:
        return {"block_configs": "not needed: stock config", "remote_code": False}
    views = {}
    blocks, why = block_configs(config, layers)
    if blocks is not None:
        config["block_configs"] = blocks
        views["block_configs"] = "written (nemotron-nas / DeciLM per-block view in config.json)"
    else:
        views["block_configs"] = f"not written: {why}"
    if remote_code:
        config["auto_map"] = remote_code_auto_map()
    views["remote_code"] = remote_code
    return views


@torch.no_grad()
def _compare_reload(model, folder: Path, ids: torch.Tensor) -> dict:
    """Reload the written folder with the runtime loader and compare logits with the in-memory model (fp32)."""
    reloaded = load_artifact(folder, dtype=torch.float32)
    want = model(input_ids=ids, use_cache=False).logits
    got = reloaded(input_ids=ids, use_cache=False).logits
    diff = float((want - got).abs().max())
    if not diff < LOGIT_TOLERANCE:
        raise CompressError(f"reloaded artifact differs from the in-memory model: max |logit diff| {diff:.3e} "
                            f">= {LOGIT_TOLERANCE}; not writing it")
    return {"max_abs_logit_diff": diff, "windows": int(ids.shape[0]), "tolerance": LOGIT_TOLERANCE}
