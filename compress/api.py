"""The notebook surface: one function per CLI command, same names and arguments, returning result objects that
show as tables in a notebook (`_repr_html_`) and as text in a terminal (`str`)."""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

with warnings.catch_warnings():
    # tqdm.auto, which our passes and transformers import, warns "IProgress not found" on its first import in a
    # notebook without ipywidgets, then draws text bars, which work there; import it first, quietly (the filter is
    # scoped: other warnings, and this one from any later import, are untouched)
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from calibration.readers import reader  # noqa: E402
from calibration.sources import PACKAGED  # noqa: E402
from compress.errors import ArtifactError, CompressError, InputError  # noqa: E402
from compress.models import local_folder  # noqa: E402
from compress.models.default import DEFAULT_MODELS  # noqa: E402
from compress.pipeline import RunResult  # noqa: E402
from compress.recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from compress.tables import html_table, text_table  # noqa: E402
from export.format import MAX_DETAIL, Manifest  # noqa: E402
from export.generate import Generation  # noqa: E402
from export.speculative import DraftCounts  # noqa: E402

PROMPT_TOKENS = 16  # tokens of the prompt `eval` measures generation speed from (batch 1): a short user turn

# The library's messages name the command line's flags; a Python caller reads the argument it passes instead
PYTHON_NAMES = {"--overwrite": "overwrite=True", "--resume": "resume=True", "--set": "overrides", "--out": "out",
                "--chat": "chat=True"}
_FLAG = re.compile("|".join(rf"{re.escape(flag)}(?![\w-])" for flag in PYTHON_NAMES))
_ON_COMMAND_LINE: ContextVar[bool] = ContextVar("on_command_line", default=False)
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def command_line() -> Iterator[None]:
    """Within it, errors from this module's functions name the CLI's flags (`pass --overwrite`); outside it, the
    Python arguments (`pass overwrite=True`). The CLI enters it around each command; it restores itself."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def _python_names(fn: F) -> F:
    """Errors raised through `fn` (CompressError and its kinds, ArtifactError) name Python arguments instead of
    CLI flags (PYTHON_NAMES), unless the CLI called; the exception, its type and traceback are otherwise kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CompressError, ArtifactError) as err:
            if not _ON_COMMAND_LINE.get() and err.args and isinstance(err.args[0], str):
                err.args = (_FLAG.sub(lambda m: PYTHON_NAMES[m.group(0)], err.args[0]), *err.args[1:])
            raise

    return wrapper  # type: ignore[return-value]


def check_paths(recipe: Recipe) -> None:
    """Refuse a recipe whose local paths cannot work, naming the field: the model folder (exists, holds config.json
    and .safetensors weights) and each text source (exists; a regular file of a known type, with calibration.field
    for rows, or a folder of .txt/.md files). Reads no weights and no text, so a typo costs no model fetch or load;
    what only reading can tell (an unsupported architecture, an empty text) is refused by the run. InputError."""
    if recipe.model not in DEFAULT_MODELS:
        local_folder(recipe.model)
    c = recipe.calibration
    texts = ([("calibration.source", c.source, c.field)] if isinstance(c.source, str) else
             [(f"calibration.source.{i}.source", p.source, p.field) for i, p in enumerate(c.parts())])
    if recipe.evaluate.enabled:
        texts += [(f"evaluate.extra.{i}", name, c.field) for i, name in enumerate(recipe.evaluate.extra)]
    for where, name, rows in texts:
        if name in PACKAGED:
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise InputError(f"{where}: {name!r}: no such file or folder (packaged sources: {', '.join(PACKAGED)})")
        try:
            reader(path, rows, None, [])  # checks kinds, types and the field; reads nothing
        except InputError as err:
            raise InputError(f"{where}: {err}") from None


@_python_names
def validate(recipe: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and check a recipe (and `--set` overrides) and its local paths (check_paths), without reading any model
    weights or text."""
    checked = load_recipe(recipe, overrides)
    check_paths(checked)
    return checked


@_python_names
def run(recipe: str | Path | dict | Recipe, out: str | Path | None = None, overwrite: bool = False,
        overrides: list[str] | tuple[str, ...] = (), log=print, resume: bool = False) -> RunResult:
    """Run a recipe end to end; writes the artifact to `out` (default artifacts/<recipe name>/). `resume=True`
    continues an interrupted run of the same `out`, refusing (with what changed) if its inputs changed. Local
    paths are checked (check_paths) before the model is fetched or loaded."""
    from compress import pipeline

    checked = validate(recipe, overrides)
    return pipeline.run(checked, out=out, overwrite=overwrite, log=log, resume=resume)


@dataclass
class VerifyResult:
    artifact: Path
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.artifact}: OK (every file and tensor matches the manifest)"
        return f"{self.artifact}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)

    def _repr_html_(self) -> str:
        if self.ok:
            return html_table([{"artifact": str(self.artifact), "ok": True, "checked": "every file and tensor"}])
        return html_table([{"problem": p} for p in self.problems],
                          title=f"{self.artifact}: {len(self.problems)} problem(s)")

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "ok": self.ok, "problems": self.problems}


@_python_names
def verify(artifact: str | Path) -> VerifyResult:
    """Check an artifact folder against its manifest; each problem names the file or tensor."""
    import export

    return VerifyResult(Path(artifact), export.verify(artifact))


def _manifest(artifact: Path) -> Manifest:
    from export.loader import read_manifest

    manifest, problems = read_manifest(artifact)
    if manifest is None:
        raise ArtifactError(f"{artifact}: " + "; ".join(problems))
    return manifest


class _PassName(BaseModel):
    name: str


class _DecoderParams(BaseModel):
    removed: float | None = None


class _ReportView(BaseModel):
    """The parts of report.json that inspect shows (the rest is kept, unread)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    passes: list[_PassName] = []
    decoder_params: _DecoderParams = _DecoderParams()
    stock_config: bool | None = None


@dataclass
class InspectResult:
    artifact: Path
    manifest: Manifest
    report: _ReportView

    def layer_rows(self) -> list[dict]:
        return [{"layer": i, "q_heads": layer.num_attention_heads, "kv_heads": layer.num_key_value_heads,
                 "mlp": layer.intermediate_size, "bias": ",".join(b.removesuffix("_proj") for b in layer.bias) or "-"}
                for i, layer in enumerate(self.manifest.architecture.layers)]

    def summary(self) -> dict:
        r = self.report
        return {
            "source": self.manifest.source.identity,
            "passes": ", ".join(p.name for p in r.passes),
            "decoder params removed": r.decoder_params.removed,
            "stock config": r.stock_config,
            "weights MB": round(sum(f.bytes for n, f in self.manifest.files.items()
                                    if n.endswith(".safetensors")) / 2**20, 1),
            "format": f"{self.manifest.format} v{self.manifest.format_version}",
        }

    def __str__(self) -> str:
        s = self.summary()
        head = "\n".join(f"{k:>24}: {v}" for k, v in s.items())
        return f"{self.artifact}\n{head}\n\n{text_table(self.layer_rows())}"

    def _repr_html_(self) -> str:
        return html_table([self.summary()], title=str(self.artifact)) + html_table(self.layer_rows(), title="layers")

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "summary": self.summary(), "layers": self.layer_rows()}


@_python_names
def inspect(artifact: str | Path) -> InspectResult:
    """What an artifact holds: source, passes, per-layer widths, size."""
    artifact = Path(artifact)
    manifest = _manifest(artifact)
    report_path = artifact / "report.json"
    try:
        report = _ReportView.model_validate(json.loads(report_path.read_text("utf-8")) if report_path.is_file() else {})
    except (ValueError, RecursionError, OSError) as err:  # ValidationError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"{report_path}: not a report ({type(err).__name__}: {str(err)[:MAX_DETAIL]})") from None
    return InspectResult(artifact, manifest, report)


@dataclass
class EvalResult:
    artifact: Path
    rows: list[dict] = field(default_factory=list)
    protocol: str = ""

    def __str__(self) -> str:
        return f"{self.artifact}\n{text_table(self.rows)}\n\nperplexity: {self.protocol}"

    def _repr_html_(self) -> str:
        return html_table(self.rows, title=str(self.artifact))

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "protocol": self.protocol, "rows": self.rows}


def source_changes(recorded: dict[str, str], folder: Path) -> list[str]:
    """How the safetensors files of a source folder differ from the sha256 the manifest recorded at run time, one
    line per file; [] when they are the same.

    `compress eval` refuses (exit 2) rather than warns: its output is a table of perplexity and recovery numbers
    that scripts and model cards copy, and a warning line above it is lost, while a recovery measured against another
    model is simply wrong."""
    from export.writer import sha256_file

    now = {p.name: p for p in sorted(Path(folder).glob("*.safetensors"))}
    lines = [f"{name}: missing" for name in recorded if name not in now]
    lines += [f"{name}: not there at run time" for name in now if name not in recorded]
    lines += [f"{name}: sha256 differs from the one recorded at run time" for name, p in now.items()
              if name in recorded and sha256_file(p) != recorded[name]]
    return lines


@_python_names
def eval(artifact: str | Path, max_windows: int | None = None, new_tokens: int = 32) -> EvalResult:  # noqa: A001
    """Dense source vs artifact side by side: held-out perplexity per text, parameters, size on disk, CPU tokens/s."""
    import export
    from compress import evaluate as ev
    from compress.models import DEFAULT_MODELS, load_model, resolve_model
    from compress.pipeline import EVAL_BATCH, EvalSets, weights_bytes

    artifact = Path(artifact)
    manifest = _manifest(artifact)
    try:
        recipe = load_recipe(manifest.recipe)
    except RecipeError as err:
        raise ArtifactError(f"{artifact}: manifest.json: {err}") from None
    if max_windows is not None:
        recipe = load_recipe(recipe, [f"evaluate.max_windows={max_windows}"])
    src = manifest.source
    try:  # a packaged name resolves anywhere; a local folder by the absolute path recorded at run time
        source = resolve_model(src.name if src.name in DEFAULT_MODELS else src.path)
    except InputError as err:
        raise InputError(f"{artifact}: its source model {src.name!r} is not available here: {err}") from None
    compressed = export.load(artifact, dtype=torch.float32)  # a damaged artifact is refused before the source is read
    if changed := source_changes(src.sha256, source.path):
        raise InputError(f"{artifact}: its source model {source.path} changed since the run ("
                         + "; ".join(changed) + "): a comparison with it would not describe this artifact; restore "
                         "the source, or run the recipe again")
    dense, tokenizer = load_model(source)
    sets = EvalSets.build(recipe, tokenizer)
    prompt = next(iter(sets.windows.values()))[:1, :PROMPT_TOKENS]  # (1, PROMPT_TOKENS)
    rows: list[dict[str, object]] = []
    ppls: list[dict[str, float]] = []  # per model: perplexity by evaluation set, as the table shows it
    for label, model, path in (("dense", dense, source.path), ("compressed", compressed, artifact)):
        ppls.append({k: round(v, 3) for k, v in sets.perplexities(model, EVAL_BATCH).items()})
        row = {"model": label, **{f"ppl {k}": v for k, v in ppls[-1].items()},
               "params": ev.count_parameters(model), "weights MB": round(weights_bytes(path) / 2**20, 1),
               "tokens/s": round(ev.generation_tokens_per_second(model, prompt, new_tokens), 1)}
        rows.append(row)
    for key in ppls[0]:
        rows[1][f"recovery {key}"] = round(ppls[0][key] / ppls[1][key], 4)
    return EvalResult(artifact, rows, ev.PPL_PROTOCOL + "; recovery = dense / compressed perplexity")


@dataclass(frozen=True)
class GenerateResult(Generation):
    """A generation (export.generate.Generation: text, new token ids, timings) with what it was asked for, and with
    a drafter what drafting did (export.speculative.DraftCounts)."""

    artifact: Path = Path()
    prompt: str = ""
    kernels: dict[str, int] = field(default_factory=dict)  # how many quantized linears took each compute path
    draft: str = "none"
    counts: DraftCounts | None = None  # None without a drafter

    def speed_line(self) -> str:
        line = (f"{self.new_tokens} new tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s; "
                f"first token after {self.first_token_seconds:.2f} s, prompt {self.prompt_tokens} tokens)")
        if self.counts is not None:
            line += (f"\ndraft {self.draft}: {self.counts.accepted} of {self.counts.drafted} drafted tokens accepted, "
                     f"{self.counts.mean_accepted:.2f} a step over {self.counts.steps} steps")
        return line

    def __str__(self) -> str:
        return f"{self.text}\n\n{self.speed_line()}"

    def _repr_html_(self) -> str:
        return html_table([{"text": self.text, "new tokens": self.new_tokens,
                            "tokens/s": round(self.tokens_per_second, 1)}], title=str(self.artifact))

    def to_dict(self) -> dict:
        out = {"artifact": str(self.artifact), "text": self.text, "token_ids": self.token_ids,
               "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens, "seconds": round(self.seconds, 4),
               "first_token_seconds": round(self.first_token_seconds, 4),
               "tokens_per_second": round(self.tokens_per_second, 2), "kernels": self.kernels, "draft": self.draft}
        if self.counts is not None:
            out.update({"drafted": self.counts.drafted, "accepted": self.counts.accepted, "steps": self.counts.steps,
                        "mean_accepted_length": round(self.counts.mean_accepted, 4)})
        return out


def _load_for_generate(path: Path, kernel: str, field_name: str) -> torch.nn.Module:
    """An artifact (export.load with `kernel`), or a dense source: a packaged model name or a Hugging Face folder
    without a manifest (float32). ArtifactError / InputError naming `field_name` and the path."""
    import export
    from compress.models import load_model, resolve_model

    if str(path) in DEFAULT_MODELS or (path.is_dir() and not (path / "manifest.json").exists()
                                       and (path / "config.json").is_file()):
        return load_model(resolve_model(str(path)))[0]
    if not path.exists():
        raise InputError(f"{field_name}: {path}: no such artifact folder")
    return export.load(path, kernel=kernel)  # type: ignore[arg-type]  # the caller checked it against KERNELS


def _tokenizer_path(path: Path) -> Path:
    from compress.models.default import packaged_model_path

    return packaged_model_path(str(path)) if str(path) in DEFAULT_MODELS else path


def _drafter(draft: str, artifact: Path, tokenizer: Any, kernel: str) -> Any:
    """What `draft` names: None ("none"), "ngram", MedusaHeads ("heads": the artifact's own), or a draft model
    ("model:PATH", same vocabulary as the artifact's tokenizer). InputError naming the field or file."""
    if draft in ("none", "ngram"):
        return None if draft == "none" else "ngram"
    if draft == "heads":
        from export.medusa import load_heads

        heads = load_heads(artifact) if (artifact / "manifest.json").is_file() else None
        if heads is None:
            raise InputError(f"draft: heads: {artifact} has no drafter heads (a recipe with a medusa pass adds them); "
                             "use --draft ngram, model:PATH or none")
        return heads
    if not draft.startswith("model:") or not draft[len("model:"):]:
        raise InputError(f"draft: {draft!r}; expected heads, ngram, none or model:PATH")
    path = Path(draft[len("model:"):]).expanduser()
    if str(path) not in DEFAULT_MODELS and not path.is_dir():
        raise InputError(f"draft: model:{path}: no such folder")
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(_tokenizer_path(path))
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"draft: {_tokenizer_path(path) / 'tokenizer.json'}: another tokenizer than {artifact}'s "
                         f"({len(theirs)} tokens against {len(tokenizer)}, or the same count mapped differently); "
                         "a draft model must share the model's vocabulary")
    return _load_for_generate(path, kernel, "draft")


@_python_names
def generate(artifact: str | Path, prompt: str, max_new_tokens: int = 64, chat: bool = False,
             do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, kernel: str = "auto", draft: str = "none") -> GenerateResult:
    """Continue `prompt` with the artifact (greedy unless do_sample; sampling seeded by `seed`, options named as in
    transformers), on CPU, its quantized linears through `kernel` (export.load). `artifact` may also be a dense
    source (a packaged model name or a Hugging Face folder). `draft` speculates: "heads" (the artifact's Medusa
    heads, export.speculative), "ngram" (transformers' prompt lookup), "model:PATH" (transformers' assisted
    generation with that artifact or model drafting) or "none"; greedy output is the same with any of them.
    InputError for max_new_tokens < 1, --chat without a chat template, a prompt that with max_new_tokens exceeds the
    model's context, an unknown draft, heads the artifact lacks, a draft model that is missing or has another
    tokenizer; ArtifactError for a folder that is not a loadable artifact."""
    from compress.evaluate import pad_token_id
    from export.generate import generate as run_generate
    from export.generate import prompt_ids
    from export.medusa import MedusaHeads
    from export.qlinear import KERNELS, QuantLinear
    from export.speculative import library_generate, timed_speculative

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens: {max_new_tokens}; at least 1 new token")
    if kernel not in KERNELS:
        raise InputError(f"kernel: {kernel!r}; expected one of {', '.join(KERNELS)}")
    artifact = Path(artifact)
    if str(artifact) not in DEFAULT_MODELS and not artifact.exists():
        raise InputError(f"artifact: {artifact}: no such artifact folder")
    model = _load_for_generate(artifact, kernel, "artifact")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(artifact))
    drafter = _drafter(draft, artifact, tokenizer, kernel)
    try:
        ids = prompt_ids(tokenizer, prompt, chat)
    except ValueError as err:
        raise InputError(f"--chat: {artifact}: {err}") from None
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and ids.shape[1] + max_new_tokens > context:
        raise InputError(f"prompt: {ids.shape[1]} tokens + max_new_tokens {max_new_tokens} exceed the model's context "
                         f"of {context} tokens; shorten the prompt or ask for fewer new tokens")
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling.update({k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
                         if v is not None})
    kernels: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kernels[module.kernel] = kernels.get(module.kernel, 0) + 1
    counts = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if drafter is None:
            out = run_generate(model, tokenizer, ids, max_new_tokens, pad_token_id(model), **sampling)
        elif isinstance(drafter, MedusaHeads):
            out, counts = timed_speculative(model, drafter, tokenizer, ids, max_new_tokens, **sampling)
        else:
            out, counts = library_generate(model, tokenizer, ids, max_new_tokens, pad_token_id(model), drafter,
                                           **sampling)
    return GenerateResult(**vars(out), artifact=artifact, prompt=prompt, kernels=kernels, draft=draft, counts=counts)
