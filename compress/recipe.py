"""Recipe: model, calibration, passes, export, evaluate, seed; YAML loading with clear errors; `--set` overrides."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from compress.errors import RecipeError
from compress.patterns import Pattern

# re-exported: compress/passes/quantize.py imports pattern_search from here
from compress.patterns import pattern_search as pattern_search  # noqa: F401
from export.medusa import MAX_HEADS

# Bounds: generous, but finite, so that a typo (an extra zero, `.inf`, 2**70) is refused by name before any work.
MAX_RECIPE_BYTES = 2**20  # a recipe is a few KB; read before parsing, so a huge file costs nothing
MAX_NAME = 100  # `name` becomes a folder name (artifacts/<name>/)
MAX_PATH = 4096  # PATH_MAX on Linux: model folders, calibration and evaluation sources
MAX_ITEMS = 256  # entries of targets, ignore, overrides, evaluate.extra
MAX_PASSES = 64  # passes of one recipe; real ones have one to three (prune, then quantize)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; random.Random takes any
MAX_TOKENS = 2**20  # seq_len: past any context length shipped today
MAX_WINDOWS = 2**16  # calibration / evaluation windows, search windows
MAX_WIDTH = 2**16  # group sizes, GPTQ block sizes, round_to: input columns or channels of one layer
MAX_SHARD_MB = 2**20  # 1 TiB per safetensors shard
MAX_CHOICES = 16  # entries of bits.choices (four distinct widths exist; repeats are harmless)
# searches (evolution, Tyr): every generation scores every offspring, so these bound how long a run takes
MAX_GENERATIONS = 100_000  # about a day at a second per generation (the defaults run 25 to 30)
MAX_OFFSPRING = 1024  # offspring per generation, survivors per stage, units switched per mutation
MAX_CUTS = 16  # stages that cut the offspring down to `survivors`; `stage_windows` has one more (the final stage)
MAX_LEVELS = 64  # Tyr sparsity levels per unit and round: each level builds and stores a variant of every unit
MAX_ROUNDS = 16  # Tyr coarse-to-fine rounds: each halves the level spacing, so the 16th works at 2**-15 of the first


DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"  # compress.device resolves it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# What a pass does to the model, in the order a recipe runs them: structure changes (prune), then one quantization,
# then corrections of the error of the passes before them (correct), then drafter heads trained on the final model
# (draft). Every pass config declares its role as a class constant; the ordering rules below read only the roles.
Role = Literal["prune", "quantize", "correct", "draft"]
ROLES: tuple[Role, ...] = get_args(Role)
# the structures a pass of role prune removes: whole key-value groups of attention (o_proj loses the input columns
# of a group's query heads), MLP channels (down_proj loses input columns)
Structure = Literal["kv_groups", "mlp_channels"]


class HasRole(Protocol):
    """What the ordering rules read of a pass config."""

    role: ClassVar[Role]

    @property
    def pass_(self) -> str: ...


@runtime_checkable
class Prunes(Protocol):
    """What a pass of role prune declares to the passes after it: the structures it removes, and the step of kept
    MLP widths (down_proj's input columns change `round_to` at a time)."""

    role: ClassVar[Role]
    removes: ClassVar[frozenset[Structure]]

    @property
    def round_to(self) -> int: ...


def check_order(passes: Sequence[HasRole]) -> None:
    """Refuses (ValueError naming both positions, `passes.i: ... passes.j ...`) a pass whose role comes before the
    role of an earlier pass (prune < quantize < correct < draft: a later pass would change what the earlier one
    quantized, corrected or trained heads on), a second quantization, and a correction with no earlier pruning or
    quantization whose error it could correct."""
    rank = {role: k for k, role in enumerate(ROLES)}
    why = {"quantize": "prunes weights that {j} already quantized; put the pruning passes first",
           "correct": "changes the weights that {j} fitted its correction to; put corrections after the passes "
                      "whose error they correct",
           "draft": "changes the model that {j} trained drafter heads on; put drafter heads after every pass that "
                    "changes the model"}
    for i, p in enumerate(passes):
        later = [j for j in range(i) if rank[passes[j].role] > rank[p.role]]
        if later:
            j = later[0]
            raise ValueError(f"passes.{i}: {p.pass_} " + why[passes[j].role].format(j=f"passes.{j}"))
        if p.role == "correct" and not any(q.role in ("prune", "quantize") for q in passes[:i]):
            raise ValueError(f"passes.{i}: {p.pass_} corrects the error of an earlier pruning or quantization pass, "
                             "and no such pass comes before it")
    quant = [i for i, p in enumerate(passes) if p.role == "quantize"]
    if len(quant) > 1:
        raise ValueError(f"passes.{quant[1]}: the model is already quantized by passes.{quant[0]}; one "
                         "quantization pass per recipe (use its targets and overrides for different settings)")


class CalibrationPart(_Strict):
    """One text of a calibration mixture: it gives `weight` / (the weights' sum) of calibration.windows."""

    source: str = Field(..., max_length=MAX_PATH)  # as calibration.source
    weight: float = Field(1.0, gt=0, le=1e6)
    field: str | None = Field(None, max_length=MAX_NAME)  # its rows' text field (default: calibration.field)


class CalibrationConfig(_Strict):
    """Where calibration text comes from and how it is cut into token windows. `source` is one text (a packaged
    corpus, or a local .txt/.jsonl/.parquet/.arrow file or folder) or a mixture: a list of {source, weight, field}
    whose windows are drawn from each text's calibration split in proportion to the weights (largest remainders) and
    interleaved by a seeded shuffle; each text's held-out split is evaluated."""

    source: (Annotated[str, Field(max_length=MAX_PATH)]
             | Annotated[list[CalibrationPart], Field(min_length=1, max_length=MAX_ITEMS)]) = "pydoc"
    field: str | None = Field(None, max_length=MAX_NAME)  # the text field of .jsonl / parquet / arrow rows
    windows: int = Field(64, ge=1, le=MAX_WINDOWS)
    seq_len: int = Field(256, ge=8, le=MAX_TOKENS)
    batch_size: int = Field(8, ge=1, le=MAX_WINDOWS)

    @field_validator("source")
    @classmethod
    def _mixture(cls, v: str | list[CalibrationPart]) -> str | list[CalibrationPart]:
        if isinstance(v, list):
            names = [p.source for p in v]
            if len(set(names)) < len(names):
                raise ValueError(f"a text appears twice in the mixture: {names}")
        return v

    @model_validator(mode="after")
    def _every_part_gets_windows(self) -> CalibrationConfig:
        for i, (part, n) in enumerate(zip(self.parts(), self.part_windows(), strict=True)):
            if n < 1:
                raise ValueError(f"source.{i} ({part.source!r}, weight {part.weight}) gets no window of the "
                                 f"{self.windows}: raise its weight or calibration.windows")
        return self

    def parts(self) -> list[CalibrationPart]:
        """The texts calibration draws from, each with its weight and its rows' field."""
        if isinstance(self.source, str):
            return [CalibrationPart(source=self.source, field=self.field)]
        return [p if p.field is not None else p.model_copy(update={"field": self.field}) for p in self.source]

    def part_windows(self) -> list[int]:
        """Windows drawn from each text: `windows` split in proportion to the weights, by largest remainders (ties
        to the earlier text), summing to `windows`."""
        parts = self.parts()
        total = sum(p.weight for p in parts)
        shares = [self.windows * p.weight / total for p in parts]
        counts = [int(s) for s in shares]
        order = sorted(range(len(parts)), key=lambda i: (-(shares[i] - counts[i]), i))
        for i in order[: self.windows - sum(counts)]:
            counts[i] += 1
        return counts

    def describe(self) -> str:
        """'pydoc' or 'pydoc 0.75 + licenses 0.25' (weights normalized)."""
        if isinstance(self.source, str):
            return self.source
        total = sum(p.weight for p in self.source)
        return " + ".join(f"{p.source} {p.weight / total:.2g}" for p in self.source)


MAX_PROMPTS = 16  # generations shown side by side
MAX_NEW_TOKENS = 512  # per generation
MAX_STEPS = 1_000_000  # optimizer steps of a trained correction
MAX_TOP_K = 4096  # teacher tokens kept per position (memory N * T * k * 8 bytes)
HELD_IN_WINDOWS = 16  # training windows a trained correction's KL is measured on before and after training


class EvaluateConfig(_Strict):
    """Held-out perplexity protocol: non-overlapping windows of seq_len over each named text."""

    seq_len: int = Field(256, ge=8, le=MAX_TOKENS)
    max_windows: int = Field(32, ge=1, le=MAX_WINDOWS)
    # other domains (the source's held-out split is always evaluated); .jsonl/table rows: text in calibration.field
    extra: list[Annotated[str, Field(max_length=MAX_PATH)]] = Field(["licenses"], max_length=MAX_ITEMS)
    enabled: bool = True
    # greedy continuations of these prompts by the dense and the compressed model, side by side in the report and
    # the model card ([] for none)
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME)]] = Field(
        ["def fibonacci(n):", "Permission is hereby granted, free of charge,", "The Python standard library"],
        max_length=MAX_PROMPTS)
    new_tokens: int = Field(24, ge=1, le=MAX_NEW_TOKENS)


class ExportConfig(_Strict):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_size_mb: float = Field(2000, gt=0, le=MAX_SHARD_MB)
    # how quantized linears are stored: compressed-tensors pack-quantized (any widths, mixed), or the GPTQ format
    # (one symmetric width for every decoder projection; scales in fp16), which gptqmodel and vLLM read
    quant_format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"
    # models whose blocks differ in width: ship our modeling file + auto_map so that stock transformers loads them
    # with trust_remote_code=True (never by default; our loader needs no code from the artifact)
    remote_code: bool = False


class _PruneBase(_Strict):
    role: ClassVar[Role] = "prune"
    removes: ClassVar[frozenset[Structure]] = frozenset({"kv_groups", "mlp_channels"})
    target: float = Field(..., gt=0.0, lt=1.0, description="share of decoder-block projection parameters removed")
    structure: Literal["adaptive", "uniform"] = "adaptive"
    round_to: int = Field(8, ge=1, le=MAX_WIDTH, description="MLP channels are removed in multiples of this (kept "
                                                           "widths stay multiples of it when the dense width is)")


class FlapConfig(_PruneBase):
    """FLAP (An et al., 2024): fluctuation metric, standardized scores, one global threshold, bias compensation."""

    pass_: Literal["flap"] = Field("flap", alias="pass")
    metric: Literal["wifv", "ifv", "wifn"] = "wifv"
    # where attention scores are standardized within a layer before a key-value group's score is averaged: over o_proj's
    # input channels ("channel", the FLAP reference's axis and the default), over the query heads' mean scores
    # ("head", the default before 2026-11-30), or over the groups ("group"); see docs/results/flap_reference.md
    standardize: Literal["head", "group", "channel"] = "channel"
    compensate: bool = True
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WandaSpConfig(_PruneBase):
    """Wanda-style structured baseline: |W| x input norm per channel, uniform widths, no compensation."""

    pass_: Literal["wanda_sp"] = Field("wanda_sp", alias="pass")
    structure: Literal["adaptive", "uniform"] = "uniform"
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CfspConfig(_Strict):
    """CFSP (Wang et al., 2024): per-block MLP budgets from the angular distance of block inputs and outputs, MLP
    channels scored by weights and activations. Prunes MLP channels only (attention stays whole)."""

    role: ClassVar[Role] = "prune"
    removes: ClassVar[frozenset[Structure]] = frozenset({"mlp_channels"})

    pass_: Literal["cfsp"] = Field("cfsp", alias="pass")
    target: float = Field(..., gt=0.0, lt=1.0, description="share of decoder-block projection parameters removed")
    temperature: float = Field(1.0, gt=0, le=1e6, description="sigmoid sharpness of the coarse allocation")
    max_keep: float = Field(1.0, gt=0, le=1.0, description="no block keeps more than this share of its MLP")
    weight_power: float = Field(1.0, ge=0, le=100, description="b: down_proj columns weighted by ||x||^b")
    activation_power: float = Field(1.0, ge=0, le=100, description="c: channel scores scaled by ||x||^c")
    round_to: int = Field(1, ge=1, le=MAX_WIDTH,
                          description="kept MLP widths are a multiple of this (hardware-friendly)")
    compensate: bool = Field(False, description="add FLAP's bias compensation for the removed channels (not in CFSP)")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EvolutionConfig(_Strict):
    """EvoPress-style search settings: (1 + offspring) generations, staged selection on growing token sets."""

    generations: int = Field(30, ge=1, le=MAX_GENERATIONS)
    offspring: int = Field(8, ge=1, le=MAX_OFFSPRING)
    survivors: list[Annotated[int, Field(le=MAX_OFFSPRING)]] = Field(
        [2], max_length=MAX_CUTS, description="how many offspring go on after each stage but the last")
    stage_windows: list[Annotated[int, Field(ge=1, le=MAX_WINDOWS)]] = Field(
        [2, 6], min_length=1, max_length=MAX_CUTS + 1, description="calibration windows scored at each stage")
    max_switches: int = Field(3, ge=1, le=MAX_OFFSPRING, description="units raised per mutation")

    @model_validator(mode="after")
    def _stages(self) -> EvolutionConfig:
        if len(self.stage_windows) != len(self.survivors) + 1:
            raise ValueError(f"stage_windows needs one entry per stage: {len(self.survivors) + 1} for survivors "
                             f"{self.survivors}, got {len(self.stage_windows)}")
        if any(b < a for a, b in pairwise(self.stage_windows)):
            raise ValueError("stage_windows must not shrink from one stage to the next")
        if any(k < 1 for k in self.survivors):
            raise ValueError("survivors must be >= 1")
        return self


class TyrConfig(_Strict):
    """Tyr-the-Pruner-style search (Li et al., 2025): every block's attention (key-value groups) and MLP (channels)
    pruned locally at `levels` sparsities with a Hessian least-squares refit of o_proj / down_proj, later blocks
    calibrated on the variants of earlier ones nearest the target; an evolutionary search over the assembled model's
    KL to the dense one picks a level per unit under the global budget; each further round halves the level spacing
    around the best allocation so far."""

    role: ClassVar[Role] = "prune"
    removes: ClassVar[frozenset[Structure]] = frozenset({"kv_groups", "mlp_channels"})
    pass_: Literal["tyr"] = Field("tyr", alias="pass")
    target: float = Field(..., gt=0.0, lt=1.0, description="share of decoder-block projection parameters removed")
    levels: int = Field(9, ge=2, le=MAX_LEVELS, description="sparsity levels per unit in each round")
    rounds: int = Field(2, ge=1, le=MAX_ROUNDS, description="coarse-to-fine rounds (each halves the level spacing)")
    max_sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="no unit loses more than this share of its width")
    round_to: int = Field(8, ge=1, le=MAX_WIDTH, description="kept MLP widths are a multiple of this")
    bias: bool = Field(False, description="refit a bias with the kept weights (absorbs the removed inputs' mean)")
    damp: float = Field(0.01, gt=0, lt=1, description="ridge added to X^T X, relative to its mean diagonal")
    evolution: EvolutionConfig = EvolutionConfig(generations=25, offspring=8, survivors=[2], stage_windows=[2, 6],
                                                 max_switches=3)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MixedBits(_Strict):
    """Layer-wise mixed precision: an average code width over the quantized weights, met by ranking layers
    (`allocator: rank`, by `importance`), by a knapsack over measured per-unit errors (`allocator: knapsack`), or by an
    evolutionary search on the assembled model's KL to the dense model started from the knapsack's result
    (`allocator: evolution`)."""

    average: float = Field(..., gt=0, le=16)  # the choices bound it further (_reachable)
    choices: list[Literal[2, 3, 4, 8]] = Field([2, 3, 4, 8], min_length=1, max_length=MAX_CHOICES)
    allocator: Literal["rank", "knapsack", "evolution"] = "rank"
    importance: Literal["lim", "zd", "random"] = "lim"
    zd_threshold: float = Field(3.0, gt=0, le=1e3, description="zd: z-score above which a weight counts as an outlier")
    error_windows: int = Field(4, ge=1, le=MAX_WINDOWS,
                               description="knapsack: calibration windows the per-unit KL is measured on")
    evolution: EvolutionConfig = EvolutionConfig()  # allocator: evolution (started from the knapsack's allocation)


class QuantOverride(_Strict):
    """Settings for the modules whose name matches `pattern` (regex, searched), applied in order."""

    pattern: Pattern
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = Field(None, le=MAX_WIDTH)
    sym: bool | None = None


def _group_size(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("group_size is a positive number of input columns, or -1")
    return v


GroupSize = Annotated[int, Field(le=MAX_WIDTH), AfterValidator(_group_size)]  # columns per scale, or -1 (per row)


class LmHeadQuant(_Strict):
    """The output projection (vocab, hidden) quantized too (GPTQModel's `lm_head: true`): by GPTQ on the final norm's
    outputs or by rounding, as the pass does the decoder; a head tied to the embeddings is untied (they stay)."""

    bits: Literal[2, 3, 4, 8]  # what the kernels run: 2-4 bits in int4 lanes, 8 bits dequantized once
    group_size: GroupSize = Field(64, description="input columns per scale; -1 for one scale per row")
    sym: bool = True


class _QuantBase(_Strict):
    role: ClassVar[Role] = "quantize"
    bits: Literal[2, 3, 4, 8] | MixedBits = 4
    group_size: GroupSize = Field(128, description="input columns per scale; -1 for one scale per output row")
    sym: bool = True
    # minmax: each group's scale spans its range; mse: the range shrunk to minimize the group's rounding error
    # (compress.ops.quant.grid), which clips outliers
    scale_search: Literal["minmax", "mse"] = "minmax"
    # regexes searched in module names (model.layers.3.mlp.up_proj), with pattern_search
    targets: list[Pattern] = Field([r"\.(self_attn|mlp)\."], max_length=MAX_ITEMS)
    ignore: list[Pattern] = Field([], max_length=MAX_ITEMS)
    overrides: list[QuantOverride] = Field([], max_length=MAX_ITEMS)
    lm_head: LmHeadQuant | None = None  # None: the output projection stays as it is
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_serializer(mode="wrap")
    def _lm_head_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No `lm_head` key when it is not quantized: recipes (and artifacts' recipe.yaml) read as before."""
        data = handler(self)
        if data.get("lm_head") is None:
            data.pop("lm_head", None)
        return data

    @model_validator(mode="after")
    def _reachable(self) -> _QuantBase:
        """An average outside the choices cannot be met, unless overrides pin some modules' widths (then the pass
        checks what is left for the others)."""
        if isinstance(self.bits, MixedBits) and not any(o.bits is not None for o in self.overrides):
            lo, hi = min(self.bits.choices), max(self.bits.choices)
            if not lo <= self.bits.average <= hi:
                raise ValueError(f"bits.average {self.bits.average} cannot be met with choices "
                                 f"{sorted(set(self.bits.choices))}: it must lie in [{lo}, {hi}]")
        return self


class GptqConfig(_QuantBase):
    """GPTQ (Frantar et al., 2022), block by block, each block calibrated on the already-quantized blocks' outputs."""

    pass_: Literal["gptq"] = Field("gptq", alias="pass")
    act_order: bool = False
    static_groups: bool = True  # with act_order: group boundaries stay contiguous, so kernels need no g_idx gather
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1, le=MAX_WIDTH)


class RtnConfig(_QuantBase):
    """Round-to-nearest per group: the baseline every quantizer is compared against."""

    pass_: Literal["rtn"] = Field("rtn", alias="pass")


class TrainConfig(_Strict):
    """Training of low-rank terms against the dense model: AdamW on A and B only, `steps` batches of `batch_size`
    calibration windows drawn (seeded) from the first `windows_used`, learning rate warmed up over the first 5% of the
    steps and decayed to 0 by a cosine; the loss is the KL divergence of the model's next-token distributions from
    the dense model's top `top_k` (compress.ops.distill)."""

    steps: int = Field(100, ge=0, le=MAX_STEPS, description="optimizer steps (0: the fitted initialization only)")
    lr: float = Field(1e-3, gt=0, le=1)
    windows: int | None = Field(None, ge=1, le=MAX_WINDOWS, description="calibration windows trained on (the first "
                                "ones; None: as many as the steps draw)")
    batch_size: int = Field(8, ge=1, le=MAX_WINDOWS)
    loss: Literal["kl"] = "kl"
    top_k: int = Field(64, ge=1, le=MAX_TOP_K, description="teacher tokens kept per position")

    def windows_used(self, available: int) -> int:
        """How many of the first `available` calibration windows training reads: `windows` when given; else as many
        as the steps draw (steps x batch_size, one epoch at most, and at least the 16 the held-in KL is measured on),
        so the dense model's distributions are computed for no window that is never trained on."""
        if self.windows is not None:
            return min(self.windows, available)
        return min(available, max(self.steps * self.batch_size, HELD_IN_WINDOWS))


class RankBudget(_Strict):
    """Ranks per module chosen by a knapsack (compress.search.knapsack) over `choices`: each quantized module's
    options cost their adapter bits (rank x (in + out) x 16) and are worth the error the fitted correction of that
    rank leaves (compress.ops.lowrank.error_by_rank: output error with init eora, weight error with svd); the total
    stays within `bits_per_weight` x the quantized weights. Rank 0 leaves a module uncorrected."""

    bits_per_weight: float = Field(..., gt=0, le=16, description="adapter bits per quantized weight, on average")
    choices: list[Annotated[int, Field(ge=0, le=MAX_WIDTH)]] = Field([0, 4, 8, 16, 32, 64], min_length=1,
                                                                      max_length=MAX_CHOICES)


class LoraConfig(_Strict):
    """Low-rank correction (LoRC / EoRA / INT2.1 / RILQ; METHODS.md): every targeted linear gets y += (x A^T) B^T
    with A (rank, in), B (out, rank), fitted to what quantization lost (`init`), then trained so that the whole
    model's next-token distributions match the dense model's (`train`). After pruning alone it heals: modules that
    are not quantized start from B = 0 and the trained product is merged into their weights (`merge`), so the artifact
    stays a plain pruned model."""

    role: ClassVar[Role] = "correct"
    pass_: Literal["lora"] = Field("lora", alias="pass")
    rank: Annotated[int, Field(ge=1, le=MAX_WIDTH)] | RankBudget = 16  # one rank, or ranks chosen per module
    # quantized modules: svd = SVD of W - Q(W) (LoRC); eora = SVD in the eigenspace of the inputs' X^T X (EoRA);
    # zero = B = 0. Modules that are not quantized always start from B = 0 (nothing was lost in their weights).
    init: Literal["svd", "eora", "zero"] = "svd"
    targets: list[Pattern] = Field([r"\.(self_attn|mlp)\."], max_length=MAX_ITEMS)
    ignore: list[Pattern] = Field([], max_length=MAX_ITEMS)
    # merge B @ A into the weights of modules that are not quantized (a packed weight keeps its adapter beside it)
    merge: bool = True
    train: TrainConfig = TrainConfig()
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


MAX_HEAD_LAYERS = 8  # residual layers per drafter head (the paper uses one; each adds hidden^2 weights per head)


class SelfGenerated(_Strict):
    """Continuations the model generates itself (greedy) from the first `prompt_tokens` tokens of calibration
    windows, up to the calibration's seq_len, added as training windows: on them the token after each position is
    the model's own choice, as in decoding (Medusa-2's self-distillation)."""

    windows: int = Field(16, ge=1, le=MAX_WINDOWS, description="training windows whose starts are continued")
    prompt_tokens: int = Field(32, ge=1, le=MAX_TOKENS, description="tokens of each window kept as the prompt")


class MedusaTrainConfig(_Strict):
    """Training of the heads alone (backbone and lm_head frozen): AdamW, `steps` batches of `batch_size` positions
    drawn (seeded, without replacement per epoch) from the training windows, learning rate warmed up over the first
    5% of the steps and decayed to 0 by a cosine; the loss is each head's KL from the model's own top `top_k`
    distribution at its offset (compress.ops.medusa), head k weighted by `decay`**k (Medusa-1's lambda_k)."""

    steps: int = Field(100, ge=0, le=MAX_STEPS)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(256, ge=1, le=MAX_WINDOWS * 64, description="positions per step")
    top_k: int = Field(32, ge=1, le=MAX_TOP_K, description="teacher tokens kept per position")
    decay: float = Field(0.8, gt=0, le=1, description="weight of head k in the loss is decay**k")


class MedusaConfig(_Strict):
    """Medusa drafter heads (Cai et al., 2024; METHODS.md): `num_heads` residual blocks on the final hidden state
    over the model's own lm_head, head k guessing the token k + 2 positions ahead, trained by self-distillation on
    the model being exported (the last pass's). The last `held_out` calibration windows are not trained on: each
    head's top-1 accuracy against the model's own choice is measured on them."""

    role: ClassVar[Role] = "draft"
    pass_: Literal["medusa"] = Field("medusa", alias="pass")
    num_heads: int = Field(4, ge=1, le=MAX_HEADS)
    num_layers: int = Field(1, ge=1, le=MAX_HEAD_LAYERS, description="residual layers per head")
    held_out: int = Field(8, ge=1, le=MAX_WINDOWS, description="last calibration windows kept out of training")
    train: MedusaTrainConfig = MedusaTrainConfig()
    generate: SelfGenerated | None = None  # None: calibration text only
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


PassConfig = Annotated[FlapConfig | WandaSpConfig | CfspConfig | TyrConfig | GptqConfig | RtnConfig | LoraConfig
                       | MedusaConfig, Field(discriminator="pass_")]
PASS_CONFIGS = get_args(get_args(PassConfig)[0])  # the pass config classes, in the union's order


def _medusa_fits(p: MedusaConfig, i: int, cal: CalibrationConfig) -> None:
    """At least one calibration window left to train on; windows long enough for every head's target; prompts of
    self-generated windows shorter than a window, and no more of them than the training windows."""
    if p.held_out >= cal.windows:
        raise ValueError(f"passes.{i}.held_out: {p.held_out} held-out windows leave none of calibration.windows "
                         f"{cal.windows} to train on")
    if cal.seq_len <= p.num_heads + 1:
        raise ValueError(f"passes.{i}.num_heads: {p.num_heads} heads need windows longer than {p.num_heads + 1} "
                         f"tokens; calibration.seq_len is {cal.seq_len}")
    if p.generate is not None and p.generate.prompt_tokens >= cal.seq_len:
        raise ValueError(f"passes.{i}.generate.prompt_tokens: {p.generate.prompt_tokens} leaves nothing to generate "
                         f"in windows of calibration.seq_len {cal.seq_len}")
    if p.generate is not None and p.generate.windows > cal.windows - p.held_out:
        raise ValueError(f"passes.{i}.generate.windows: {p.generate.windows} prompts, but only "
                         f"{cal.windows - p.held_out} calibration windows are trained on")


class Recipe(_Strict):
    name: str = Field(..., max_length=MAX_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field("smollm2-135m", max_length=MAX_PATH)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # where the block under work computes: auto = the first GPU torch sees, else the CPU (compress.device)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[PassConfig] = Field(..., min_length=1, max_length=MAX_PASSES)
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    trust_remote_code: bool = False
    # memory: the model in memory; stream: blocks read from the source's safetensors on demand, for models larger
    # than memory (compress.models.streaming; gptq at fixed bits for now); auto: stream when the float32 weights
    # exceed half of the available memory and the recipe streams
    execution: Literal["auto", "memory", "stream"] = "memory"

    @model_validator(mode="after")
    def _remote_code_fits(self) -> Recipe:
        if self.export.remote_code and any(p.role == "quantize" for p in self.passes):
            raise ValueError("export.remote_code: the shipped modeling code loads pruned models in the export dtype, "
                             "not quantized ones (quantized artifacts load with export.load, or stock transformers "
                             "when uniform)")
        return self

    @model_validator(mode="after")
    def _order_fits(self) -> Recipe:
        check_order(self.passes)
        return self

    @model_validator(mode="after")
    def _searches_fit(self) -> Recipe:
        for i, p in enumerate(self.passes):
            if isinstance(p, TyrConfig) and max(p.evolution.stage_windows) > self.calibration.windows:
                raise ValueError(f"passes.{i}.evolution.stage_windows: the search scores on "
                                 f"{max(p.evolution.stage_windows)} calibration windows but calibration.windows is "
                                 f"{self.calibration.windows}")
            bits = getattr(p, "bits", None)
            if not isinstance(bits, MixedBits) or bits.allocator == "rank":
                continue
            if isinstance(p, RtnConfig):
                raise ValueError(f"passes.{i}.bits.allocator: {bits.allocator} searches over GPTQ variants; "
                                 "use pass: gptq (or allocator: rank)")
            need = max([bits.error_windows, *(bits.evolution.stage_windows if bits.allocator == "evolution" else [])])
            if need > self.calibration.windows:
                raise ValueError(f"passes.{i}.bits: the search scores on {need} calibration windows but "
                                 f"calibration.windows is {self.calibration.windows}")
        return self

    @model_validator(mode="after")
    def _training_fits(self) -> Recipe:
        for i, p in enumerate(self.passes):
            if isinstance(p, LoraConfig) and p.train.windows is not None and p.train.windows > self.calibration.windows:
                raise ValueError(f"passes.{i}.train.windows: {p.train.windows} windows to train on, but "
                                 f"calibration.windows is {self.calibration.windows}")
            if isinstance(p, MedusaConfig):
                _medusa_fits(p, i, self.calibration)
                if quantized := [j for j, q in enumerate(self.passes[:i]) if getattr(q, "lm_head", None)]:
                    raise ValueError(f"passes.{quantized[0]}.lm_head: passes.{i} (medusa) trains heads that share "
                                     "a plain lm_head; leave the lm_head unquantized (lm_head: null)")
        return self

    @model_validator(mode="after")
    def _gptq_format_fits(self) -> Recipe:
        if self.export.quant_format != "gptq":
            return self
        quant = [(i, p) for i, p in enumerate(self.passes) if isinstance(p, _QuantBase)]
        if not quant:
            raise ValueError("export.quant_format: gptq needs a gptq or rtn pass")
        for i, p in quant:
            if not isinstance(p.bits, int) or not p.sym or p.overrides:
                raise ValueError(f"export.quant_format: gptq stores one symmetric width for the whole model; "
                                 f"passes.{i} has mixed, asymmetric or overridden settings (use compressed-tensors)")
            if p.ignore or p.targets != type(p).model_fields["targets"].default:
                raise ValueError(f"export.quant_format: gptq quantizes every decoder projection; passes.{i} "
                                 "narrows targets or ignore (use compressed-tensors)")
            head = p.lm_head
            if head is not None and (head.bits, head.group_size, head.sym) != (p.bits, p.group_size, p.sym):
                raise ValueError(f"passes.{i}.lm_head: the GPTQ format quantizes the lm_head with the model's one "
                                 f"scheme ({p.bits} bits, group_size {p.group_size}, sym {p.sym}); give it the same "
                                 "or use export.quant_format: compressed-tensors")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data as it would be written in YAML (`pass:` keys, not `pass_`); execution only when not the default
        memory (so recipes and artifacts written before the field existed read the same)."""
        data = self.model_dump(mode="json", by_alias=True)
        if data["execution"] == "memory":
            del data["execution"]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _repr_html_(self) -> str:
        """A notebook shows the recipe as tables, as it shows results: its inputs, then one row per pass with the
        settings that differ from the defaults (`to_yaml()` has every field)."""
        from compress.tables import html_table

        c = self.calibration
        head = {"model": self.model, "calibration": f"{c.describe()}: {c.windows} x {c.seq_len} tokens",
                "evaluate": ", ".join([*(f"{p.source} held out" for p in c.parts()), *self.evaluate.extra])
                if self.evaluate.enabled
                else "off", "seed": self.seed}
        passes = [{"": f"passes.{i}", "pass": p.pass_, "role": p.role,
                   "settings": yaml.safe_dump(p.model_dump(mode="json", exclude_defaults=True, exclude={"pass_"}),
                                              default_flow_style=True, sort_keys=False, width=MAX_PATH).strip()[1:-1]
                   or "defaults"} for i, p in enumerate(self.passes)]
        return html_table([head], title=f"recipe {self.name}") + html_table(passes, title="passes")


# ---- YAML loading -------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool, type(None))):  # a list or mapping as a key
            raise RecipeError(f"a {type(key).__name__} used as a key at line {key_node.start_mark.line + 1}")
        if key in seen:
            raise RecipeError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first at line {seen[key] + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# pydantic names the union branch it tried in an error's path (passes.0.flap.target, bits.MixedBits.average)
_UNION_BRANCHES = {c.model_fields["pass_"].default for c in PASS_CONFIGS} | {MixedBits.__name__}


def _format_validation(err: ValidationError, where: str) -> str:
    """One line per problem: `<file>: <field path>: <what is wrong>`; union branches that do not apply are dropped."""
    found: dict[str, list[str]] = {}
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        parts = [p for p in parts if p not in _UNION_BRANCHES and "[" not in p]
        path = ".".join(parts).replace("pass_", "pass") or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        found.setdefault(path, [])
        if msg not in found[path]:
            found[path].append(msg)
    lines = []
    for path, msgs in found.items():
        specific = [m for m in msgs if not m.startswith("Input should be a valid dictionary")]
        lines += [f"{where}: {path}: {m}" for m in (specific or msgs)]
    return "\n".join(lines)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Validate plain data into a Recipe; errors name the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where)) from None


def read_recipe_data(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if (size := path.stat().st_size) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); a recipe is a YAML text file") from None
    except ValueError as err:  # an integer of more digits than Python converts (4300)
        raise RecipeError(f"{path}: {err}") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` to nested plain data in place; unknown keys fail validation afterwards."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. passes.0.target=0.2")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise RecipeError(f"--set {key}: {raw!r} is not a YAML value ({type(err).__name__})") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {here}: no such list item (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            # unknown keys are created here and refused by validation, which names the path
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"--set {key}: {here}: cannot descend into a {type(node).__name__}")


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe from a YAML path, plain data, or a Recipe, then apply `--set` overrides."""
    if isinstance(source, Recipe):
        data, where = source.to_dict(), f"recipe {source.name}"
    elif isinstance(source, dict):
        data, where = source, "recipe"
    else:
        data, where = read_recipe_data(source), str(source)
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    return parse_recipe(data, where)
