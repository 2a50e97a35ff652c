"""run(recipe) -> RunResult: load -> calibrate -> passes -> evaluate -> export -> reload and compare."""

from __future__ import annotations

import contextlib
import itertools
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

import export
from calibration.budget import check_fits
from calibration.sources import chat_renderer, draw_windows, eval_windows, load_corpus
from calibration.teacher import teacher_targets
from compress import distributed, journal
from compress import evaluate as ev
from compress.device import CPU, describe, on_device
from compress.device import resolve as resolve_device
from compress.errors import CompressError, InputError
from compress.models import ModelSource, llama, load_model, resolve_model
from compress.models.checks import check_export_dtype
from compress.models.default import runs_dir
from compress.passes import PassContext, make_pass
from compress.plan import Plan, widths_of
from compress.progress import status_lines
from compress.recipe import LoraConfig, Recipe
from compress.report import PassReport, RunResult, model_card
from compress.search.variants import fingerprint
from compress.tables import text_table
from export import weights_bytes  # noqa: F401  (compress.api and benchmarks import it from here)
from export.lowrank import round_adapters

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LOGIT_TOLERANCE = 1e-4  # reloaded vs in-memory, fp32
EVAL_BATCH = 2  # windows per forward in perplexity: logits are (B, T, vocab) fp32, 100 MB per window of 256 here


def reset_peak_memory() -> None:
    """Start a new peak-resident-memory window for this process (Linux: /proc/self/clear_refs), so that a second run
    in one process (a notebook, a test session) reports its own peak, not an earlier run's; elsewhere a no-op."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def resident_memory_mb() -> float:
    """Resident memory (MB) of this process now (Linux VmRSS; elsewhere 0.0, as unknown)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_memory_mb() -> float:
    """Peak resident memory (MB) since the last reset_peak_memory (Linux VmHWM); where the kernel cannot reset it,
    the process's peak so far (getrusage)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
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
    hidden = llama.hidden_size(model)
    return sum(llama.block_params(llama.block_shape(b), hidden) for b in llama.blocks(model))


@dataclass
class EvalSets:
    """Held-out token windows per named text, and what was done to the texts on the way (chat rows rendered)."""

    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # each once, in the order the texts were read
    prompts: list[str] = field(default_factory=list)  # continued greedily by each model (evaluate.prompts)
    new_tokens: int = 0
    tokenizer: object = None

    @classmethod
    def build(cls, recipe: Recipe, tokenizer) -> EvalSets:
        """The first evaluate.max_windows windows of each calibration source's held-out split and of each
        evaluate.extra text (whose rows are read by calibration.field); only those tokens are read."""
        e, c = recipe.evaluate, recipe.calibration
        sets, chat, want = cls(), chat_renderer(tokenizer), e.max_windows * e.seq_len
        texts = []
        for part in c.parts():
            texts.append(corpus := load_corpus(part.source, part.field, chat))
            label = f"{Path(corpus.name).name}-heldout"
            sets.windows[label] = eval_windows(corpus.tokens(tokenizer, "heldout", want), e.seq_len, e.max_windows,
                                               label)
        for name in e.extra:
            texts.append(extra := load_corpus(name, c.field, chat))
            sets.windows[Path(name).name] = eval_windows(extra.tokens(tokenizer, "all", want), e.seq_len,
                                                         e.max_windows, f"evaluate.extra {name!r}")
        sets.notes = list(dict.fromkeys(note for text in texts for note in text.notes))
        sets.prompts, sets.new_tokens, sets.tokenizer = list(e.prompts), e.new_tokens, tokenizer
        return sets

    def continuations(self, model, device: torch.device = CPU, label: str | None = None) -> list[str]:
        """Greedy continuations of evaluate.prompts, computed on `device`; `label` names the model on a progress
        bar (none without it)."""
        if not self.prompts:
            return []
        with on_device(model, device):
            return ev.greedy_continuations(model, self.tokenizer, self.prompts, self.new_tokens,
                                           label and f"{label}: greedy continuations")

    def perplexities(self, model, batch_size: int, device: torch.device = CPU, label: str | None = None
                     ) -> dict[str, float]:
        """Perplexity per text, computed on `device` (the model is moved there for it and back); `label` names
        the model on a progress bar per text (none without it)."""
        with on_device(model, device):
            return {name: ev.perplexity(model, w, batch_size, desc=label and f"{label}: {name}")
                    for name, w in self.windows.items()}


class Phases:
    """Says when each phase of a run starts (so no phase is silent) and times it; `seconds` in order of start,
    with the phases still running counted up to now."""

    def __init__(self, log) -> None:
        self.log = log
        self._done: dict[str, float] = {}
        self._running: dict[str, float] = {}  # name -> start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        self._running[name] = time.perf_counter()
        self._done.setdefault(name, 0.0)
        try:
            with status_lines(name, self.log):  # a line every few seconds while the phase shows no bar
                yield
        finally:
            self._done[name] += time.perf_counter() - self._running.pop(name)

    @property
    def seconds(self) -> dict[str, float]:
        now = time.perf_counter()
        return {k: round(v + (now - self._running[k] if k in self._running else 0.0), 1)
                for k, v in self._done.items()}


def _check_passes_fit(recipe: Recipe, model) -> None:
    """What only the model can tell, before any pass runs (so no pass runs only for a later one to refuse): each
    pass checks itself against the model and the passes before it."""
    for j, cfg in enumerate(recipe.passes):
        make_pass(cfg).check(model, [(p, f"passes.{i}") for i, p in enumerate(recipe.passes[:j])], f"passes.{j}")


def run(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, log=print,
        resume: bool = False) -> RunResult:
    """Run a validated recipe end to end and write the artifact; see ARCHITECTURE.md for the data flow.

    resume: continue an interrupted run of the same artifact, refusing (with what changed) when the recipe, the
    model files or the calibration tokens differ from the interrupted run's."""
    from compress.models import streaming

    if streaming.wants_stream(recipe):  # execution: stream (or auto, for a model larger than memory)
        if distributed.active():
            raise InputError(f"execution: stream does not run over torch.distributed yet ({distributed.world_size()} "
                             "processes); run one process, or set execution: memory")
        return streaming.run(recipe, out if out is not None else Path("artifacts") / recipe.name, overwrite, log,
                             resume)
    t0, phase = time.perf_counter(), Phases(log)
    reset_peak_memory()
    resident_at_start = resident_memory_mb()  # what the process held before (a notebook's, a test session's)
    out = Path(out) if out is not None else Path("artifacts") / recipe.name
    device = resolve_device(recipe.device)
    with _refused_as_input(), phase("checking the output folder and the model files"):
        # before any work, so nothing is computed only to be refused; rank 0 alone writes (and cleans up) --out
        distributed.on_main(lambda: export.check_out(out, overwrite, log), "checking the output folder")
        source = resolve_model(recipe.model)
        export.check_source(out, source.path)
    with phase("loading the model"):
        model, tokenizer = load_model(source, recipe.trust_remote_code)
        check_export_dtype(model, recipe.export.dtype)  # before any pass, not at export
        _check_passes_fit(recipe, model)  # before any text is read, so a bad recipe costs seconds
    with phase("reading the calibration and evaluation texts"):
        calib, eval_sets, corpus_name = _texts(recipe, model, tokenizer, log)
    log(f"model {source.identity}: {len(llama.blocks(model))} blocks; calibration {tuple(calib.shape)} tokens "
        f"from {corpus_name}; computing on {describe(device)}")
    with phase("hashing the model files"):  # rank 0 alone: the journal and the report are its to write
        source_sha, journal_file = distributed.on_main(lambda: _hashes_and_journal(recipe, source, out, calib, resume,
                                                                                   log), "starting the journal")
    if distributed.is_main():  # the other ranks go on to the passes, where they are needed
        with phase("evaluating the dense model"):
            dense = _Measured.of(model, eval_sets, device, "dense")

    plan = Plan.of(model)
    reports = _run_passes(recipe, model, calib, plan, device, log, phase)
    _check_plan(plan, model)
    if not distributed.is_main():  # rank 0 evaluates, writes and checks the artifact
        return RunResult(out, {"rank": distributed.rank(), "world_size": distributed.world_size()})

    settings = _export_settings(recipe, source)
    _round_to_export(model, plan, settings)
    with phase("evaluating the compressed model"):
        comp = _Measured.of(model, eval_sets, device, "compressed")
    report = _report(recipe, source, source_sha, reports, dense, comp, device)

    def check(folder: Path) -> dict:  # on the written folder, before it is committed
        with phase("reloading the artifact and comparing logits"):
            verify = _compare_reload(model, folder, calib[:2])
        return {"verify": verify, "seconds": round(time.perf_counter() - t0, 1), "phases": phase.seconds,
                "peak_memory_mb": round(peak_memory_mb(), 1), "resident_at_start_mb": round(resident_at_start, 1)}

    provenance = export.Provenance(folder=source.path, source=report["source"],
                                   config=llama.as_causal_lm(model).config.to_dict(), recipe=report["recipe"],
                                   recipe_yaml=recipe.to_yaml(), seed=recipe.seed)
    try:
        with phase("writing the artifact"):
            notes = export.write(out, _module_tensors(model), plan, report, provenance, settings, check=check,
                                 card=lambda rep: model_card(recipe, source.identity, rep), overwrite=overwrite)
    except (export.ArtifactExistsError, export.UnwritableError) as err:
        raise InputError(str(err)) from None
    for message in notes:
        log(f"note: {message}")
    journal.finish(journal_file)
    return RunResult(out, report)


@contextmanager
def _refused_as_input() -> Iterator[None]:
    """An output folder or source folder that export refuses is bad input (exit 2), with export's message."""
    try:
        yield
    except export.TargetError as err:
        raise InputError(str(err)) from None


def _texts(recipe: Recipe, model, tokenizer, log) -> tuple[torch.Tensor, EvalSets, str]:
    """Calibration windows (N, T) drawn from the calibration split, the held-out evaluation sets, and the
    calibration text's name, after checking that the windows fit in memory."""
    cal = recipe.calibration
    seq_lens = {"calibration.seq_len": cal.seq_len,
                **({"evaluate.seq_len": recipe.evaluate.seq_len} if recipe.evaluate.enabled else {})}
    check_fits(model, cal.windows, seq_lens)
    chat, windows, notes = chat_renderer(tokenizer), [], []
    for part, n in zip(cal.parts(), cal.part_windows(), strict=True):
        corpus = load_corpus(part.source, part.field, chat)
        drawn = draw_windows(corpus, tokenizer, n, cal.seq_len, recipe.seed,
                             f"calibration source {corpus.name!r} (calibration split)")
        notes += [note for note in corpus.notes if note not in notes]
        log(f"calibration: {drawn.describe(f'the calibration split of {corpus.name}')}")
        windows.append(drawn.windows)
    for note in notes:
        log(f"note: {note}")
    calib = windows[0]
    if len(windows) > 1:  # interleaved, so that the first windows (which training reads first) mix the texts too
        calib = torch.cat(windows)
        calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(recipe.seed))]
    eval_sets = EvalSets.build(recipe, tokenizer) if recipe.evaluate.enabled else EvalSets()
    for note in eval_sets.notes:
        if note not in notes:  # said above
            log(f"note: {note}")
    return calib, eval_sets, cal.describe() if len(windows) > 1 else corpus.name


def _hashes_and_journal(recipe: Recipe, source: ModelSource, out: Path, calib: torch.Tensor, resume: bool,
                        log) -> tuple[dict[str, str], Path]:
    """The model files' sha256 and the started journal (_start_journal)."""
    source_sha = {p.name: export.sha256_file(p) for p in sorted(source.path.glob("*.safetensors"))}
    return source_sha, _start_journal(recipe, source, source_sha, out, calib, resume, log)


def _start_journal(recipe: Recipe, source: ModelSource, source_sha: dict[str, str], out: Path,
                   calib: torch.Tensor, resume: bool, log) -> Path:
    """Record (or, resuming, check) what this run is made of; returns the journal file."""
    journal_file = journal.journal_path(runs_dir(), out)
    model_files = {**source_sha, "config.json": export.sha256_file(source.path / "config.json")}
    note = journal.start(journal_file, out, {"recipe": recipe.to_dict(), "model files sha256": model_files,
                                             "calibration tokens sha256": fingerprint(calib)}, resume)
    if note:
        log(note)
    return journal_file


def _run_passes(recipe: Recipe, model, calib: torch.Tensor, plan: Plan, device: torch.device, log,
                phase: Phases) -> list[PassReport]:
    """Each pass of the recipe in order, recording its decisions in `plan`; logs each one's table."""
    # resumable state (variant databases) lives in the user cache, keyed by content, so reruns reuse it
    ctx = PassContext(calibration=calib, plan=plan, batch_size=recipe.calibration.batch_size, seed=recipe.seed,
                      cache=runs_dir(), device=device)
    trained = [p for p in recipe.passes if isinstance(p, LoraConfig)]
    if trained:  # the dense model's distributions, before any pass changes it
        windows = max(p.train.windows_used(len(calib)) for p in trained)
        with phase("teacher: the dense model's next-token distributions"):
            ctx.teacher = teacher_targets(model, calib[:windows], max(p.train.top_k for p in trained),
                                          recipe.calibration.batch_size, device)
        if any(p.init != "zero" for p in trained):
            ctx.originals = {}
    reports = []
    for i, cfg in enumerate(recipe.passes):
        ctx.index = i
        plan.passes.append(cfg.pass_)
        with phase(f"passes.{i} {cfg.pass_}"):
            rep = make_pass(cfg).run(model, ctx)
        reports.append(rep)
        scalars = ", ".join(f"{k}={v}" for k, v in rep.summary.items() if not isinstance(v, (list, dict)))
        log(f"\npasses[{i}] {rep.name} ({rep.seconds:.0f} s): {scalars}\n{text_table(rep.rows)}")
    return reports


def _check_plan(plan: Plan, model) -> None:
    """The plan's widths are the model's: a pass that cut a block without recording it (or recorded something
    else) stops the run here, not in a reader of the artifact."""
    blocks, widths = llama.blocks(model), plan.widths
    if len(blocks) != len(widths):
        raise CompressError(f"the plan has {len(widths)} layers, the model {len(blocks)}; a pass removed or added a "
                            "block without recording it")
    for i, (block, planned) in enumerate(zip(blocks, widths, strict=True)):
        actual = widths_of(llama.block_shape(block))
        if actual != planned:
            raise CompressError(f"layer {i}: the plan says {planned}, the model is {actual}; a pass did not record "
                                "what it cut")


def _export_settings(recipe: Recipe, source: ModelSource) -> export.ExportSettings:
    e = recipe.export
    dtype = source_dtype(source.path) if e.dtype == "auto" else export.DTYPES[e.dtype]
    return export.ExportSettings(dtype=dtype, quant_format=e.quant_format,
                                 shard_bytes=int(e.shard_size_mb * 2**20), remote_code=e.remote_code)


def _round_to_export(model, plan: Plan, settings: export.ExportSettings) -> None:
    """Make the in-memory weights exactly what the artifact stores: parameters rounded to the export dtype, and each
    quantized weight rebuilt from its codes with scales stored as the artifact stores them (the dequantized product
    is rounded to the export dtype too, as every runtime that reads the artifact computes it). Buffers (rotary
    frequencies) are computed at load, not stored, and stay as they are."""
    named = llama.named_linears(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(settings.dtype))
        for name, q in plan.quantized.items():
            q.scale = q.scale.to(settings.scale_dtype)
            linear = named[name][2] if name in named else model.get_submodule(name)  # the lm_head
            linear.weight.copy_(q.dequantize(settings.dequantized_dtype))
        round_adapters(model, settings.adapter_dtype)  # as the artifact stores the low-rank corrections
        for a in plan.adapters.values():
            a.A, a.B = a.A.to(settings.adapter_dtype).float(), a.B.to(settings.adapter_dtype).float()


def _module_tensors(model) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The model's stored tensors module by module, in state-dict order: (module name, {tensor name: tensor})."""
    def module_of(item: tuple[str, torch.Tensor]) -> str:
        return item[0].rpartition(".")[0]

    for module, items in itertools.groupby(model.state_dict().items(), key=module_of):
        yield module, dict(items)


@dataclass(frozen=True)
class _Measured:
    """What the report compares dense and compressed on: held-out perplexities, all and decoder parameters."""

    ppl: dict[str, float]
    params: int
    decoder: int
    continuations: list[str]

    @classmethod
    def of(cls, model, eval_sets: EvalSets, device: torch.device, label: str) -> _Measured:
        return cls(eval_sets.perplexities(model, EVAL_BATCH, device, label), ev.count_parameters(model),
                   decoder_params(model), eval_sets.continuations(model, device, label))


def _report(recipe: Recipe, source: ModelSource, source_sha: dict[str, str], reports: list[PassReport],
            dense: _Measured, comp: _Measured, device: torch.device) -> dict:
    """report.json as far as the pipeline knows it; export.write adds what it decides and the check's results."""
    quality = [
        {"text": name, "dense ppl": round(dense.ppl[name], 3), "compressed ppl": round(comp.ppl[name], 3),
         "recovery": round(dense.ppl[name] / comp.ppl[name], 4)}
        for name in dense.ppl
    ]
    return {
        "recipe": recipe.to_dict(),
        "source": {"name": source.name, "identity": source.identity, "path": str(source.path), "sha256": source_sha},
        "passes": [r.to_dict() for r in reports],
        "quality": quality,
        "perplexity_protocol": ev.PPL_PROTOCOL,
        "generations": [{"prompt": p, "dense": d, "compressed": c} for p, d, c in
                        zip(recipe.evaluate.prompts, dense.continuations, comp.continuations, strict=False)],
        "device": describe(device),
        # processes that computed the run (torchrun); absent for one, so one process's report (golden bytes) is as was
        **({"world_size": distributed.world_size()} if distributed.active() else {}),
        "params": {"dense": dense.params, "compressed": comp.params},
        "decoder_params": {"dense": dense.decoder, "compressed": comp.decoder,
                           "removed": round(1 - comp.decoder / dense.decoder, 4)},
        "fallbacks": [f for r in reports for f in r.fallbacks],
    }


@torch.no_grad()
def _compare_reload(model, folder: Path, ids: torch.Tensor) -> dict:
    """Reload the written folder with the runtime loader and compare logits with the in-memory model (fp32)."""
    reloaded = export.load(folder, dtype=torch.float32)
    want = model(input_ids=ids, use_cache=False).logits
    got = reloaded(input_ids=ids, use_cache=False).logits
    diff = float((want - got).abs().max())
    if not diff < LOGIT_TOLERANCE:
        raise CompressError(f"reloaded artifact differs from the in-memory model: max |logit diff| {diff:.3e} "
                            f">= {LOGIT_TOLERANCE}; not writing it")
    return {"max_abs_logit_diff": diff, "windows": int(ids.shape[0]), "tolerance": LOGIT_TOLERANCE}
