"""A meta-device skeleton whose blocks are read from safetensors on demand, and the streamed run (issue 16).

`StreamedModel.open(folder)` builds the model of a checked Llama-family folder with every parameter on the meta device
(buffers such as the rotary tables are real: they are computed, not stored) and memory-maps its safetensors files.
A module is materialized for its turn in the compute dtype (`loaded(module)`) and put back on the meta device after,
so the weights in memory are those of the modules under work, never the model's. The block engine
(calibration.capture.for_each_block) recognises a streamed model by the `STREAM_ATTR` attribute it sets, loads the
embeddings while it captures block 0's inputs and each block for its own turn, and hands every finished block to the
`on_block_done` callbacks before releasing it. `resident_bytes` counts the materialized parameters now, `peak_bytes`
their maximum since open.

`run(recipe, out)` is `compress run` for `execution: stream` (pipeline.run dispatches to it): GPTQ at fixed bits
through the engine, perplexities through the engine with the head applied per batch, the artifact written module by
module from the source and the plan (`as_exported`, `module_tensors`). Each finished block's packed records leave the
plan for a spill file next to the output, and the reload check reads the written artifact block by block
(compress.models.stream_export), so nothing held grows with depth.

Pruning (FLAP, uniform or adaptive, with its bias compensation; Wanda-sp), alone or before GPTQ: the pass collects its
statistics and scores each block through the engine (one pass of the dense model), chooses the widths over all layers as
in memory, and cuts each block through `prune_block`, which on a streamed model is `StreamedModel.cut`: the surgery is
applied to the skeleton at once (its pruned shapes and new biases, on meta) and replayed on the checkpoint's dense
tensors each time the block is read again, for the engine, the evaluation or the export (`cut_tensor`). The surgery
holds only which groups and channels stay and per-channel means; recomputing a compensation bias is one matrix-vector
product, so nothing is spilled. Same code, same float32 inputs: the same bytes as in memory.

A model that cannot fit even one block at a time is refused before work (compress.models.stream_fit). Not streamed
yet: the other pruning passes (cfsp, tyr), searches, round-to-nearest and a quantized lm_head (refused by name),
greedy continuations (skipped, recorded), --resume (refused).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from calibration.capture import STREAM_ATTR, for_each_block
from compress.device import CPU, move
from compress.errors import InputError
from compress.models import llama
from compress.models.checks import checkpoint_tensors
from compress.models.stream_fit import check_fits, memory_limit
from export.heap import give_back_freed, map_large_allocations
from export.records import QuantRecord

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from compress.recipe import Recipe
    from compress.report import RunResult
    from export import ExportSettings

BlockDone = Callable[[int, nn.Module], None]
T = TypeVar("T")
Surgery = Callable[[nn.Module], object]  # in-place surgery on a materialized block (a pruning pass's cut)


@dataclass(frozen=True)
class Exported:
    """What the artifact stores, for `StreamedModel.read` to materialize instead of the source: every tensor rounded
    through the export dtype, each quantized linear's weight rebuilt from its record (pipeline._round_to_export's
    rules: scales in settings.scale_dtype, the product rounded to settings.dequantized_dtype)."""

    dtype: torch.dtype
    dequantized_dtype: torch.dtype
    quantized: Mapping[str, QuantRecord]  # module name -> its record


class BlockSource:
    """A skeleton model (parameters on meta) whose modules a subclass materializes for their turn (`load`): what the
    block engine calls (calibration.capture.Streamed), and the forwards built on it, one block in memory at a time."""

    model: PreTrainedModel
    on_block_done: list[BlockDone]

    def load(self, module: nn.Module) -> None:
        """Materialize every parameter and buffer of `module` (a submodule of the model)."""
        raise NotImplementedError

    def release(self, module: nn.Module) -> None:
        """Put `module`'s parameters and buffers back on the meta device, freeing their memory."""
        module.to(device="meta")

    @contextmanager
    def loaded(self, *modules: nn.Module) -> Iterator[None]:
        """`modules` materialized inside the block, released after (also on an error)."""
        with ExitStack() as stack:
            for module in modules:
                stack.callback(self.release, module)
                self.load(module)
            yield

    # what the block engine calls (calibration.capture.Streamed)
    def embedding(self) -> AbstractContextManager[None]:
        """The input embeddings, materialized while block 0's inputs are captured."""
        return self.loaded(self.model.get_input_embeddings())

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block i materialized for its turn; on a normal exit the on_block_done callbacks see it, then it is freed
        and the freed heap handed back to the system (give_back_freed)."""
        block = llama.blocks(self.model)[i]
        with self.loaded(block):
            yield block
            for done in self.on_block_done:
                done(i, block)
        give_back_freed()

    def final_hidden(self, input_ids: torch.Tensor, batch_size: int, device: torch.device = CPU
                     ) -> list[torch.Tensor]:
        """The last block's outputs per batch (B, T, H), on `device`, for windows `input_ids` (N, T), through the block
        engine (each block computed on `device`)."""
        layers = llama.blocks(self.model)
        last: list[torch.Tensor] = []

        def keep_last(i: int, _block, _inputs, outputs: list[torch.Tensor], _stats) -> None:
            if i == len(layers) - 1:
                last.extend(outputs)

        for_each_block(self.model, layers, input_ids, keep_last, batch_size=batch_size, desc="streamed forward",
                       device=device)
        return last

    @contextmanager
    def _head(self, device: torch.device) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The final norm and lm_head materialized on `device`: hidden (B, T, H) -> logits (B, T, vocab) float32."""
        lm = llama.as_causal_lm(self.model)
        try:
            with self.loaded(lm.model.norm, lm.lm_head):
                move(lm.model.norm, device)
                move(lm.lm_head, device)
                yield lambda hidden: lm.lm_head(lm.model.norm(hidden)).float()
        finally:
            give_back_freed()  # the head (vocab x hidden, float32) and the logits made under it

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, batch_size: int, device: torch.device = CPU) -> torch.Tensor:
        """Logits (N, T, vocab) float32 on the CPU of windows `input_ids` (N, T), the model never materialized whole."""
        hidden = self.final_hidden(input_ids, batch_size, device)
        with self._head(device) as head:
            return torch.cat([head(h).cpu() for h in hidden])

    @torch.no_grad()
    def perplexity(self, windows: torch.Tensor, batch_size: int, device: torch.device = CPU) -> float:
        """exp(mean next-token NLL) over windows (N, T), as compress.evaluate.perplexity computes it (each window on
        its own), with logits made `batch_size` windows at a time after the last block."""
        hidden = torch.cat(self.final_hidden(windows, batch_size, device))  # (N, T, H)
        nll, count = 0.0, 0
        with self._head(device) as head:
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start : start + batch_size].to(device)
                logits = head(hidden[start : start + batch_size])  # (B, T, vocab)
                nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
                count += ids[:, 1:].numel()
        return math.exp(nll / count)

    def _prefix(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return f"{name}." if name else ""
        raise ValueError("StreamedModel: the module is not part of this model")



@dataclass
class StreamedModel(BlockSource):
    """A skeleton model (parameters on meta) over memory-mapped safetensors; see the module docstring."""

    model: PreTrainedModel
    folder: Path
    dtype: torch.dtype
    files: dict[str, Path]  # tensor name -> the shard that holds it
    tied: dict[str, str]  # tensor name the checkpoint may omit -> the name it is read from (lm_head -> embeddings)
    on_block_done: list[BlockDone] = field(default_factory=list)
    exported: Exported | None = None  # set by as_exported: read() gives what the artifact stores
    resident_bytes: int = 0
    peak_bytes: int = 0
    # pruned blocks (cut): block -> its skeleton as the checkpoint stores it (meta, no memory), the surgeries
    # replayed on it in order, and its tensor names' prefix (model.layers.3.)
    dense_blocks: dict[int, nn.Module] = field(default_factory=dict)
    surgeries: dict[int, list[Surgery]] = field(default_factory=dict)
    cut_prefixes: dict[str, int] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # one cut block's tensors not read yet

    @classmethod
    def open(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamedModel:
        """The skeleton of the model in `folder` (headers checked; no weight read), computing in `dtype`."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        files = {name: entry.file for name, entry in checkpoint_tensors(folder).items()}
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
            model = AutoModelForCausalLM.from_config(config)
        model.eval().requires_grad_(False)
        tied = {k: v for k, v in model.get_expanded_tied_weights_keys().items() if k not in files}
        missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in files and n not in tied]
        if missing:
            raise InputError(f"{folder}: the checkpoint lacks {missing[:3]} ({len(missing)} tensors) that config.json "
                             "implies")
        streamed = cls(model, folder, dtype, files, tied)
        setattr(model, STREAM_ATTR, streamed)
        return streamed

    def read(self, name: str, compute: bool = True) -> torch.Tensor:
        """Tensor `name` read from its memory-mapped shard, in the compute dtype (a tied name reads its source; in a
        pruned block, the tensor as the cuts leave it, cut_tensor); after as_exported, the tensor as the artifact
        stores it (a quantized weight rebuilt from its record), left in the export dtype when not `compute`."""
        module, _, leaf = name.rpartition(".")
        block = self._cut_block_of(name)
        if self.exported is not None and leaf == "weight" and module in self.exported.quantized:
            return self.exported.quantized[module].dequantize(self.exported.dequantized_dtype).to(self.dtype)
        if block is not None:  # in the compute dtype, as the in-memory pass leaves it
            value = self.cut_tensor(block, name)
        else:
            source = self.tied.get(name, name)
            # opened per read (a header parse, microseconds): a mapping kept open would keep every page read so far
            # resident (file-backed, but counted), growing with depth
            with safe_open(self.files[source], framework="pt") as shard:
                value = owned(shard.get_tensor(source))
        if self.exported is not None:
            value = value.to(self.exported.dtype)
            if not compute:
                return value
        return value.to(self.dtype)

    def _read_source(self, name: str) -> torch.Tensor:
        """Tensor `name` as the checkpoint stores it, in the compute dtype (no cut, no export rounding)."""
        with safe_open(self.files[name], framework="pt") as shard:
            return owned(shard.get_tensor(name)).to(self.dtype)

    def _cut_block_of(self, name: str) -> int | None:
        """The pruned block tensor `name` belongs to, or None."""
        if not self.cut_prefixes:
            return None
        head, _, _ = name.rpartition(".")
        while head:
            if (block := self.cut_prefixes.get(f"{head}.")) is not None:
                return block
            head = head.rpartition(".")[0]
        return None

    def cut(self, i: int, surgery: Callable[[nn.Module], T]) -> T:
        """Prune block i by `surgery` (in place on a materialized block, deterministic): applied now to the block as
        it is (its skeleton takes the new shapes), and replayed on the checkpoint's tensors (after the earlier
        surgeries) each time the block is read again; returns what `surgery` returns. Nothing of the cut block is
        kept in memory: only what `surgery` holds (a pruning pass's indices and per-channel means)."""
        block = llama.blocks(self.model)[i]
        if i not in self.dense_blocks:
            self.dense_blocks[i] = copy.deepcopy(block)  # parameters on meta: shapes only
            self.cut_prefixes[self._prefix(block)] = i
        start = self.resident_bytes
        self.load(block)  # as the earlier surgeries left it
        try:
            result = surgery(block)
        finally:
            self.release(block)  # the surgery replaced the parameters load counted
            self.resident_bytes = start
            self.pending.clear()
            give_back_freed()
        self.surgeries.setdefault(i, []).append(surgery)
        return result

    def cut_tensor(self, i: int, name: str) -> torch.Tensor:
        """Tensor `name` of pruned block i in the compute dtype: the block's dense tensors read from the checkpoint
        and cut by its surgeries in order, all of them at once, then handed out one read each (`pending`: a block
        read whole, as the engine and the export read it, is cut once per materialization)."""
        if name not in self.pending:
            self.pending = self._cut_state(i)
            if self.exported is not None:  # weights read() rebuilds from their records: not kept
                for key in [k for k in self.pending if k.endswith(".weight")
                            and k.removesuffix(".weight") in self.exported.quantized]:
                    del self.pending[key]
        if name not in self.pending:
            raise KeyError(f"{name}: not a tensor of pruned block {i}")
        return self.pending.pop(name)

    def _cut_state(self, i: int) -> dict[str, torch.Tensor]:
        """Every tensor of pruned block i (full names), cut from the checkpoint's."""
        block = copy.deepcopy(self.dense_blocks[i])
        prefix = next(p for p, b in self.cut_prefixes.items() if b == i)
        start = self.resident_bytes
        self._fill(block, prefix, self._read_source)  # counted while it lives: the dense block is the peak here
        for surgery in self.surgeries.get(i, []):  # none yet while the first cut reads the block
            surgery(block)
        self.resident_bytes = start  # what is kept is counted when it is loaded
        return {prefix + name: tensor for name, tensor in block.state_dict().items()}

    def as_exported(self, quantized: Mapping[str, QuantRecord], settings: ExportSettings) -> None:
        """From now on materialize what the artifact stores: `quantized` (the plan's records, their scales rounded to
        settings.scale_dtype here, in place, as the in-memory path rounds them) and every other tensor rounded
        through settings.dtype."""
        from compress.models.stream_export import SpilledRecords

        if isinstance(quantized, SpilledRecords):  # rounded as each record is read back
            quantized.scale_dtype = settings.scale_dtype
        else:
            for record in quantized.values():
                record.scale = record.scale.to(settings.scale_dtype)
        self.exported = Exported(settings.dtype, settings.dequantized_dtype, quantized)

    def module_tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """The model's tensors module by module in state-dict order, (module name, {tensor name: tensor}), each read
        when its turn comes (export.write's input; one module in memory at a time, in the export dtype after
        as_exported: the float32 copy would only be rounded back). A quantized linear's weight comes as a meta tensor
        of its shape: export.write stores the linear's record, never its weight, so rebuilding it would be wasted."""
        state = self.model.state_dict()  # meta tensors: names and shapes only, no memory
        quantized = self.exported.quantized if self.exported is not None else {}

        def module_of(name: str) -> str:
            return name.rpartition(".")[0]

        def value(name: str) -> torch.Tensor:
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in quantized:
                return state[name]
            return self.read(name, compute=False)

        for module, group in itertools.groupby(state, key=module_of):
            yield module, {name: value(name) for name in group}

    def load(self, module: nn.Module) -> None:
        """Materialize every parameter of `module` (a submodule of the model) from the checkpoint."""
        self._fill(module, self._prefix(module), self.read)

    def _fill(self, module: nn.Module, prefix: str, read: Callable[[str], torch.Tensor]) -> None:
        """Give every parameter of `module` its value `read(prefix + name)`, checking shapes; counted as resident."""
        for name, param in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = read(prefix + name)
            if tuple(value.shape) != tuple(param.shape):
                where = self.files.get(self.tied.get(prefix + name, prefix + name), self.folder)
                raise InputError(f"{where}: tensor {prefix + name} has shape {list(value.shape)}, the model expects "
                                 f"{list(param.shape)}")
            setattr(holder, leaf, nn.Parameter(value, requires_grad=False))
            self.resident_bytes += value.numel() * value.element_size()
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def release(self, module: nn.Module) -> None:
        """Put every parameter of `module` back on the meta device (shape and dtype kept), freeing its memory."""
        for name, param in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            if param.device.type != "meta":
                self.resident_bytes -= param.numel() * param.element_size()
            setattr(holder, leaf, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))

# a run whose estimated need (stream_fit) is above this share of its memory limit maps its large allocations
# (export/heap.map_large_allocations): a page fault per 4 KB of every tensor of 1 MB or more, time a run with room to
# spare need not spend, against a heap that keeps freed tensors (a 168-layer model under a 700 MB limit was
# OOM-killed without it; docs/scale.md)
TIGHT = 0.5


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor read from safetensors that holds no file mapping: safetensors 0.8's get_tensor returns a
    lazy view of a mapping of the whole file, which stays mapped (and its touched pages resident) while the tensor
    lives: tensors held until a shard is written kept resident pages growing with depth (measured: 150 MB more in the
    writing phase at 64 layers than at 16)."""
    return tensor.clone()


def prune_block(model: nn.Module, i: int, surgery: Callable[[nn.Module], T]) -> T:
    """Apply `surgery` (in-place, deterministic, on a materialized block) to block i of `model` and return what it
    returns: directly on an in-memory model; on a streamed one (StreamedModel.cut) to the skeleton now and to the
    checkpoint's tensors each time the block is read again, so the block is never kept in memory."""
    stream = getattr(model, STREAM_ATTR, None)
    if stream is None:
        return surgery(llama.blocks(model)[i])
    if not isinstance(stream, StreamedModel):
        raise TypeError(f"prune_block: a {type(stream).__name__} cannot be pruned (only a StreamedModel)")
    return stream.cut(i, surgery)


def check_streamable(recipe: Recipe) -> None:
    """Refuse (RecipeError naming the pass) a recipe the streamed run cannot do yet. Streamed: FLAP and Wanda-sp
    (statistics and scores through the block engine, each block cut as it is read: StreamedModel.cut), then at most
    one GPTQ pass at fixed bits (its passes read weights only through the block engine). Not yet: the other pruning
    passes, searches and round-to-nearest, which read or change weights outside it."""
    from compress.errors import RecipeError
    from compress.recipe import FlapConfig, GptqConfig, MixedBits, WandaSpConfig

    for i, cfg in enumerate(recipe.passes):
        if isinstance(cfg, (FlapConfig, WandaSpConfig)):
            continue
        if not isinstance(cfg, GptqConfig) or isinstance(cfg.bits, MixedBits):
            raise RecipeError(f"passes.{i}: pass {cfg.pass_!r} does not stream yet; a streamed run takes flap and "
                              "wanda_sp passes, then one gptq pass at fixed bits (use the in-memory run for this "
                              "recipe)")
        if any(isinstance(p, GptqConfig) for p in recipe.passes[:i]):
            # the records of finished blocks leave the plan, so a second pass could not see them
            raise RecipeError(f"passes.{i}: a streamed run takes one gptq pass (use the in-memory run for this recipe)")
        if cfg.lm_head is not None:
            raise RecipeError(f"passes.{i}.lm_head: a streamed run does not quantize the lm_head yet (use the "
                              "in-memory run for this recipe)")


def wants_stream(recipe: Recipe) -> bool:
    """Whether `recipe` runs streamed: execution stream; or auto, when the recipe streams (check_streamable) and
    the model's weights in float32 exceed half of the memory available now (Linux sysconf; elsewhere never)."""
    if recipe.execution != "auto":
        return recipe.execution == "stream"
    from compress.errors import RecipeError
    from compress.models import resolve_model

    try:
        check_streamable(recipe)
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (RecipeError, ValueError, OSError, AttributeError):
        return False
    weights = sum(e.numel for e in checkpoint_tensors(resolve_model(recipe.model).path).values())
    return weights * torch.float32.itemsize > available / 2


def run(recipe: Recipe, out: str | Path, overwrite: bool = False, log: Callable[[str], None] = print,
        resume: bool = False) -> RunResult:
    """`compress run` with the model never materialized whole: the skeleton is opened over the source's safetensors,
    pruning (FLAP, Wanda-sp: each block cut as it is read) and GPTQ run block by block through the engine, dense and
    compressed perplexities are computed through it, and the artifact is written module by module from the memory-mapped
    source and the plan (its records spilled to disk as blocks finish). The report says execution: stream. The written
    artifact is read back block by block (ArtifactBlocks: packed codes, as export.load builds them) and its logits
    compared with the streamed model's, as the in-memory run does. Raises InputError (exit 2) before any work when one
    block cannot fit (check_fits). Not yet: evaluate.prompts (continuations are skipped and recorded), --resume, a
    recipe field choosing this path."""
    with ExitStack() as stack:  # holds the spill folder of the records, removed at the end
        return _run(recipe, Path(out), overwrite, log, resume, stack)


def _run(recipe: Recipe, out: Path, overwrite: bool, log: Callable[[str], None], resume: bool,
         stack: ExitStack) -> RunResult:
    import export
    from compress import pipeline as pl
    from compress.device import describe
    from compress.device import resolve as resolve_device
    from compress.errors import CompressError
    from compress.models import resolve_model
    from compress.models.checks import check_finite
    from compress.models.stream_export import ArtifactBlocks, SpilledPlan, SpilledRecords
    from compress.plan import Plan
    from compress.report import RunResult, model_card

    if resume:
        raise InputError("--resume: a streamed run (execution: stream) does not resume yet; run it again")
    t0, phase = time.perf_counter(), pl.Phases(log)
    pl.reset_peak_memory()
    resident_at_start = pl.resident_memory_mb()
    device = resolve_device(recipe.device)
    check_streamable(recipe)
    mapped = False
    with pl._refused_as_input(), phase("checking the output folder and the model files"):
        export.check_out(out, overwrite, log)
        source = resolve_model(recipe.model)
        export.check_source(out, source.path)
    with phase("opening the model (streamed)"):
        from transformers import AutoTokenizer

        streamed = StreamedModel.open(source.path)
        model = streamed.model
        if device.type == "cpu":  # before any weight is read; on an accelerator the block's terms are on it
            c = recipe.calibration  # logits: the reload check's 2 windows, or a batch of evaluation windows
            logit_tokens = max(2 * c.seq_len, pl.EVAL_BATCH * recipe.evaluate.seq_len)
            shard = int(recipe.export.shard_size_mb * 2**20)
            need = check_fits(model, c.windows, c.seq_len, c.batch_size, logit_tokens, shard, str(source.path))
            if need.total > memory_limit()[0] * TIGHT:  # freed tensors must leave at once (export/heap.py)
                mapped = map_large_allocations()
        check_finite(((name, streamed.read(name)) for name in streamed.files), str(source.path))  # one at a time
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=recipe.trust_remote_code)
        pl._check_passes_fit(recipe, model)
    with phase("reading the calibration and evaluation texts"):
        calib, eval_sets, corpus_name = pl._texts(recipe, model, tokenizer, log)
    log(f"model {source.identity}: {len(llama.blocks(model))} blocks, streamed; calibration {tuple(calib.shape)} "
        f"tokens from {corpus_name}; computing on {describe(device)}")
    with phase("hashing the model files"):
        source_sha = {p.name: export.sha256_file(p) for p in sorted(source.path.glob("*.safetensors"))}

    def measured(label: str) -> pl._Measured:
        with phase(f"evaluating the {label} model (streamed)"):
            ppl = {name: streamed.perplexity(w, pl.EVAL_BATCH, device) for name, w in eval_sets.windows.items()}
        params = sum(p.numel() for n, p in model.named_parameters() if n not in streamed.tied)  # pruned: fewer
        return pl._Measured(ppl, params, pl.decoder_params(model), [])

    dense = measured("dense")
    plan = Plan.of(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{out.name}.records-", dir=out.parent))
    records = SpilledRecords(Path(spill))  # each finished block's records leave the heap for this folder
    streamed.on_block_done.append(records.on_block_done(plan))
    reports = pl._run_passes(recipe, model, calib, plan, device, log, phase)
    pl._check_plan(plan, model)
    settings = pl._export_settings(recipe, source)
    streamed.as_exported(records, settings)
    comp = measured("compressed")
    report = pl._report(recipe, source, source_sha, reports, dense, comp, device)
    report["execution"] = "stream"
    report["large_allocations_mapped"] = mapped  # only when memory is tight (TIGHT), and on glibc
    if eval_sets.prompts:
        report["fallbacks"].append("execution stream: evaluate.prompts not continued (no streamed generation yet)")

    def check(folder: Path) -> dict:  # on the written folder, before it is committed
        with phase("reloading the artifact and comparing logits (streamed)"):
            ids = calib[:2]
            want = streamed.logits(ids, recipe.calibration.batch_size, device)  # (2, T, vocab)
            got = ArtifactBlocks(folder).logits(ids, recipe.calibration.batch_size, device)  # block by block
            diff = float((want - got).abs().max())
        if not diff < pl.LOGIT_TOLERANCE:
            raise CompressError(f"reloaded artifact differs from the streamed model: max |logit diff| {diff:.3e} "
                                f">= {pl.LOGIT_TOLERANCE}; not writing it")
        return {"verify": {"max_abs_logit_diff": diff, "windows": int(ids.shape[0]),
                           "tolerance": pl.LOGIT_TOLERANCE},
                "seconds": round(time.perf_counter() - t0, 1), "phases": phase.seconds,
                "peak_memory_mb": round(pl.peak_memory_mb(), 1), "resident_at_start_mb": round(resident_at_start, 1),
                "streamed_peak_weights_mb": round(streamed.peak_bytes / 2**20, 1)}

    provenance = export.Provenance(folder=source.path, source=report["source"],
                                   config=llama.as_causal_lm(model).config.to_dict(), recipe=report["recipe"],
                                   recipe_yaml=recipe.to_yaml(), seed=recipe.seed)
    try:
        with phase("writing the artifact"):
            notes = export.write(out, streamed.module_tensors(), SpilledPlan(plan, records), report, provenance,
                                 settings, check=check,
                                 card=lambda rep: model_card(recipe, source.identity, rep), overwrite=overwrite)
    except (export.ArtifactExistsError, export.UnwritableError) as err:
        raise InputError(str(err)) from None
    for message in notes:
        log(f"note: {message}")
    return RunResult(out, report)


def main(argv: list[str] | None = None) -> None:
    """python -m compress.models.streaming RECIPE --out OUT: the streamed run (until a recipe field selects it)."""
    import argparse

    from compress.errors import CompressError
    from compress.recipe import load_recipe

    ap = argparse.ArgumentParser(prog="python -m compress.models.streaming", description=run.__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = run(load_recipe(args.recipe), args.out, args.overwrite)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    except CompressError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{result.artifact}: peak {result.report['peak_memory_mb']} MB, {result.report['seconds']} s")


if __name__ == "__main__":
    main()
