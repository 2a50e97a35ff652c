"""Tyr-the-Pruner-style structured pruning (Li et al., 2025): a supernet of locally pruned variants, searched.

Units: each block's attention (its key-value groups) and its MLP (its channels). A round:
1. Variants: block by block, each unit is pruned at every level of the round (a kept width) by the Hessian group
   pruner of `ops.refit` (OBS removal order, then the least-squares refit of o_proj / down_proj from X^T X). The next
   block is calibrated on this block's variant at the upstream level (round 1: the level nearest the target, i.e.
   expectation error accumulation; later rounds: the best allocation so far). Stored in the variant database.
2. Search: (1 + lambda) evolution over one level per unit under the global parameter budget; fitness = KL of the
   assembled model's next-token distribution to the dense one on calibration windows, in stages.
Round 1 spaces `levels` sparsities evenly over [0, min(2 * target, max_sparsity)]; each later round halves the
spacing around every unit's chosen level (coarse to fine). The model ends as the best allocation of the last round,
physically smaller.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from calibration.capture import for_each_block
from compress.errors import InputError
from compress.models import llama
from compress.ops.refit import augment, damped, refit, removal_order, structure_columns
from compress.passes.base import Earlier, PassContext, check_finite
from compress.plan import Structure, widths_of
from compress.recipe import TyrConfig
from compress.report import PassReport
from compress.search.base import Option, Unit, cost_range, total
from compress.search.evolution import EvolutionSettings, evolve_saved
from compress.search.scoring import StagedKL, supernet_fitness
from compress.search.supernet import CODE_VERSION, Assembler, LoadCache, VariantDB
from compress.search.variants import fingerprint, model_parts

OUT_PROJ = {"attn": "o_proj", "mlp": "down_proj"}
STEPS_PER_LAYER = 256  # OBS updates per layer at most: channels are removed a few at a time above this width


@dataclass(frozen=True)
class PruneUnit:
    """One block's attention or MLP: `width` structures (key-value groups or channels) of `size` input columns of
    the output projection each, every structure worth `cost` parameters."""

    name: str  # model.layers.3.attn
    layer: int
    kind: str  # "attn" | "mlp"
    width: int
    size: int
    cost: int


# layer -> projection -> (weight (out, in), bias (out,) or None): the dense model's, restored between variants
DenseWeights = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]


def _units(model: nn.Module) -> list[PruneUnit]:
    hidden = llama.hidden_size(model)
    out = []
    for i, block in enumerate(llama.blocks(model)):
        s = llama.block_shape(block)
        out.append(PruneUnit(f"model.layers.{i}.attn", i, "attn", s.num_key_value_heads, s.group_size * s.head_dim,
                             llama.group_params(s, hidden)))
        out.append(PruneUnit(f"model.layers.{i}.mlp", i, "mlp", s.intermediate_size, 1, llama.channel_params(hidden)))
    return out


def _widths(unit: PruneUnit, sparsities: list[float], max_sparsity: float, round_to: int) -> list[int]:
    """Distinct kept widths for the given sparsities: MLP widths a multiple of `round_to` (or the full width), at
    least one structure kept, never more removed than `max_sparsity` allows."""
    step = round_to if unit.kind == "mlp" else 1
    least = max(1, math.ceil(round((1 - max_sparsity) * unit.width, 9)))  # fewest structures max_sparsity allows
    least = min(unit.width, math.ceil(least / step) * step)
    out = set()
    for s in sparsities:
        k = unit.width if s <= 0 else int(round((1 - s) * unit.width / step)) * step
        out.add(min(unit.width, max(least, k)))
    return sorted(out)


class TyrPass:
    def __init__(self, config: TyrConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """Levels that cannot reach the target, on the dense widths (after an earlier pruning pass, run checks them on
        the widths that pass leaves)."""
        if not any(p.role == "prune" for p, _ in earlier):
            units = _units(model)
            self._first_levels(units, sum(u.width * u.cost for u in units), where)

    def _first_levels(self, units: list[PruneUnit], dense_total: int, where: str) -> tuple[float, dict[str, list[int]]]:
        """Round 1: the spacing of the sparsity levels and each unit's kept widths at them; refuses levels whose
        sparsest allocation keeps more than the target allows."""
        cfg = self.config
        top = min(2 * cfg.target, cfg.max_sparsity)
        spacing = top / (cfg.levels - 1)
        levels = {u.name: _widths(u, [k * spacing for k in range(cfg.levels)], cfg.max_sparsity, cfg.round_to)
                  for u in units}
        lo = cost_range(self._search_units(units, levels))[0]
        if lo > (1.0 - cfg.target) * dense_total:
            raise InputError(f"{where}.target: the levels do not cover {cfg.target:.0%}: with every unit at its "
                             f"sparsest level ({top:.0%} of its width, max_sparsity {cfg.max_sparsity}) the blocks "
                             f"keep {lo / dense_total:.1%}; raise max_sparsity or lower the target")
        return spacing, levels

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes.{ctx.index}"
        blocks = llama.blocks(model)
        units = _units(model)
        dense_total = sum(u.width * u.cost for u in units)
        budget = (1.0 - cfg.target) * dense_total
        dense: DenseWeights = {
            i: {n: (lin.weight.data.clone(), None if lin.bias is None else lin.bias.data.clone())
                for n, lin in llama.linears(b).items()} for i, b in enumerate(blocks)}
        shapes = [llama.block_shape(b) for b in blocks]
        key0 = fingerprint(CODE_VERSION, *model_parts(model),
                           cfg.model_dump(mode="json", exclude={"evolution", "rounds"}), ctx.calibration)

        # round 1 levels; the evolution starts from the level nearest the target in every unit
        spacing, levels = self._first_levels(units, dense_total, where)
        upstream = {u.name: min(levels[u.name], key=lambda k: (abs(k / u.width - (1 - cfg.target)), -k)) for u in units}

        swap = _StructureSwap(blocks, dense, units)
        supernet = Assembler(swap)
        # on the dense model
        score = StagedKL(model, ctx.calibration, cfg.evolution.stage_windows, ctx.batch_size, ctx.device)
        rounds = []
        choice: dict[str, int] = {}  # the best allocation so far: none before the first round
        try:
            for r in range(cfg.rounds):
                if r:  # halve the spacing around the best allocation so far
                    spacing /= 2
                    half = (cfg.levels - 1) / 2
                    levels = {u.name: sorted(set(_widths(u, [1 - choice[u.name] / u.width + (j - half) * spacing
                                                             for j in range(cfg.levels)], cfg.max_sparsity,
                                                            cfg.round_to)) | {choice[u.name]})
                              for u in units}
                    upstream = dict(choice)
                key = fingerprint(key0, levels, upstream)
                db = VariantDB(None if ctx.cache is None else ctx.cache / f"variants-tyr-{key[:20]}")
                t_var = time.perf_counter()
                supernet.restore_dense()
                swap.use(db)
                self._build_variants(model, ctx, units, levels, upstream, db, supernet, dense)
                t_var = time.perf_counter() - t_var
                choice, info = self._search(units, levels, budget, choice or upstream, db, supernet, score, ctx, key)
                rounds.append({"round": r + 1, "spacing": round(spacing, 4), "variants_s": round(t_var, 1),
                               "levels_per_unit": [min(map(len, levels.values())), max(map(len, levels.values()))],
                               **info})
                supernet.assemble(choice)
        except BaseException:
            supernet.restore_dense()
            raise
        del score

        report = PassReport(name="tyr")
        kept_total = 0
        for i, block in enumerate(blocks):
            before, after = shapes[i], llama.block_shape(block)
            kept = llama.block_params(after, llama.hidden_size(model))
            kept_total += kept
            mine = [u for u in units if u.layer == i]
            groups, channels = (swap.kept[u.name] for u in mine)
            biased = tuple(OUT_PROJ[u.kind] for u in mine if cfg.bias and len(swap.kept[u.name]) < u.width)
            ctx.plan.prune(i, widths_of(before), Structure(groups.tolist(), channels.tolist(), cfg.bias,
                                                           "least squares"), biased)
            report.rows.append({"layer": i, "q_heads": f"{after.num_attention_heads}/{before.num_attention_heads}",
                                "kv_heads": f"{after.num_key_value_heads}/{before.num_key_value_heads}",
                                "mlp": f"{after.intermediate_size}/{before.intermediate_size}",
                                "kept": round(kept / llama.block_params(before, llama.hidden_size(model)), 4)})
        report.summary = {"target": cfg.target, "removed": round(1 - kept_total / dense_total, 4),
                          "decoder_params_before": dense_total, "decoder_params_after": kept_total,
                          "levels": cfg.levels, "rounds": rounds, "bias": cfg.bias, "damp": cfg.damp,
                          "evaluations": sum(r["evaluations"] for r in rounds)}
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _search_units(units: list[PruneUnit], levels: dict[str, list[int]]) -> list[Unit]:
        return [Unit(u.name, tuple(Option(k, float(k * u.cost)) for k in levels[u.name])) for u in units]

    def _build_variants(self, model, ctx: PassContext, units: list[PruneUnit], levels: dict[str, list[int]],
                        upstream: dict[str, int], db: VariantDB, supernet: Assembler, dense: dict) -> None:
        """Every unit at every level of the round (the full width is the dense unit itself), block by block, each
        block calibrated on the upstream variants of the blocks before it."""
        cfg = self.config
        by_layer: dict[int, list[PruneUnit]] = {}
        for u in units:
            by_layer.setdefault(u.layer, []).append(u)

        def todo(u: PruneUnit) -> list[int]:
            return [k for k in levels[u.name] if k < u.width and not db.has(u.name, k)]

        def watch(i, block):
            lin = llama.linears(block)
            return {OUT_PROJ[u.kind]: lin[OUT_PROJ[u.kind]] for u in by_layer[i] if todo(u)}

        def visit(i, _block, _inputs, _outputs, stats):
            for u in by_layer[i]:
                missing = todo(u)
                if not missing:
                    continue
                s = stats[OUT_PROJ[u.kind]]
                assert s.xtx is not None
                dev = s.xtx.device  # the block's device (compress.device): the refits run there
                W, b = (None if t is None else t.to(dev) for t in dense[i][OUT_PROJ[u.kind]])
                assert W is not None
                check_finite(f"model.layers.{i}.{OUT_PROJ[u.kind]}", W, s.xtx)
                n_cols = u.width * u.size
                if cfg.bias:  # the bias is one more input column, fixed at 1, never removed
                    H = damped(augment(s.xtx, s.total, s.n), cfg.damp)
                    bias_column = (b if b is not None else W.new_zeros(W.shape[0]))[:, None]
                    W = torch.cat([W, bias_column], 1).double()
                else:
                    H = damped(s.xtx, cfg.damp)
                order = removal_order(W, H, u.size, u.width - min(missing), n_structures=u.width,
                                      per_step=max(1, u.width // STEPS_PER_LAYER))
                for k in missing:
                    keep = torch.tensor(sorted(set(range(u.width)) - set(order[: u.width - k])), dtype=torch.int64,
                                        device=dev)
                    cols = structure_columns(keep, u.size)
                    if cfg.bias:
                        cols = torch.cat([cols, torch.tensor([n_cols], device=dev)])
                    W_kept = refit(W, H, cols).float()  # (out, k * size [+ 1])
                    tensors = {"keep": keep, "weight": W_kept[:, : k * u.size].contiguous()}
                    if cfg.bias:
                        tensors["bias"] = W_kept[:, -1].contiguous()
                    db.put(u.name, k, tensors, {"unit": u.name, "kept": k, "width": u.width})
            supernet.assemble({u.name: upstream[u.name] for u in by_layer[i]})
            return True

        for_each_block(model, llama.blocks(model), ctx.calibration, visit, watch, batch_size=ctx.batch_size,
                       want_xtx=True, desc="tyr: variants", device=ctx.device)

    def _search(self, units: list[PruneUnit], levels: dict[str, list[int]], budget: float,
                start_levels: dict[str, int], db: VariantDB, supernet: Assembler, score: StagedKL, ctx: PassContext,
                key: str) -> tuple[dict[str, int], dict]:
        evo = self.config.evolution
        search_units = self._search_units(units, levels)
        start = {su.name: min(range(len(su.options)), key=lambda j: abs(su.options[j].level - start_levels[su.name]))
                 for su in search_units}
        start = _fit_budget(search_units, start, budget)
        alloc, summary = evolve_saved(search_units, budget, supernet_fitness(search_units, supernet, score), start,
                                      EvolutionSettings.from_config(evo, ctx.seed), db.folder,
                                      {"variants": key, "stage_windows": evo.stage_windows})
        return alloc.levels(search_units), summary


def _fit_budget(units: list[Unit], choice: dict[str, int], budget: float) -> dict[str, int]:
    """Lower units one level at a time (the one keeping the largest share of its width first) until within budget."""
    choice = dict(choice)
    while total(units, choice) > budget + 1e-9:
        lowerable = [u for u in units if choice[u.name] > 0]
        u = max(lowerable, key=lambda u: u.options[choice[u.name]].cost / u.options[-1].cost)
        choice[u.name] -= 1
    return choice


class _StructureSwap:
    """Puts a unit's variant into its block: the kept rows of q/k/v or gate/up come from the dense weights, the
    refitted o_proj / down_proj from the round's variant database (`use`); the full width is the dense unit.
    `kept[unit]` is the kept key-value groups or channels the unit holds now."""

    def __init__(self, blocks: nn.ModuleList, dense: DenseWeights, units: list[PruneUnit]):
        self.blocks, self.dense = blocks, dense
        self.units = {u.name: u for u in units}
        self.kept: dict[str, torch.Tensor] = {}
        self._load: LoadCache | None = None

    def use(self, db: VariantDB) -> None:
        """Read variants from `db` (this round's), through a bounded in-memory cache: a search revisits the same few
        levels per unit."""
        self._load = LoadCache(lambda name, k: db.get(name, k)[0])

    def restore(self) -> None:
        for i, block in enumerate(self.blocks):
            for name, lin in llama.linears(block).items():
                llama.set_linear(lin, *self.dense[i][name])
            llama.sync_widths(block)
        self.kept = {u.name: torch.arange(u.width) for u in self.units.values()}

    def put(self, name: str, k: int) -> None:
        u = self.units[name]
        block, dense = self.blocks[u.layer], self.dense[u.layer]
        lin = llama.linears(block)
        if k == u.width:
            keep, W, b = torch.arange(u.width), *dense[OUT_PROJ[u.kind]]
        else:
            assert self._load is not None, "use(db) before put"
            v = self._load(name, k)
            keep, W, b = v["keep"], v["weight"], v.get("bias", dense[OUT_PROJ[u.kind]][1])
        if u.kind == "attn":
            q_dims, kv_dims = llama.group_dims(llama.block_shape(block), keep)
            rows = {"q_proj": q_dims, "k_proj": kv_dims, "v_proj": kv_dims}
        else:
            rows = {"gate_proj": keep, "up_proj": keep}
        for proj, r in rows.items():
            w, bias = dense[proj]
            llama.set_linear(lin[proj], w[r], None if bias is None else bias[r])
        llama.set_linear(lin[OUT_PROJ[u.kind]], W, b)
        llama.sync_widths(block)
        self.kept[name] = keep
