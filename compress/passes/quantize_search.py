"""Searched mixed precision for GPTQ: a knapsack over measured per-unit errors (ROCKET-style), optionally refined by
an evolutionary search on the assembled model (EvoPress-style), both over one supernet of quantized variants."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from calibration.capture import for_each_block
from compress import distributed
from compress.errors import CompressError, InputError
from compress.models import llama
from compress.ops.gptq import gptq_quantize
from compress.passes.base import Original, PassContext, check_finite
from compress.passes.targets import (
    Modules,
    check_fused_share,
    free_average,
    layer_average,
    pins,
    quant_record,
    shared_input_name,
    spec_for,
)
from compress.progress import tqdm
from compress.recipe import GptqConfig, MixedBits
from compress.report import PassReport
from compress.search.base import Allocation, Option, Unit
from compress.search.evolution import EvolutionSettings, evolve_saved
from compress.search.knapsack import knapsack
from compress.search.scoring import StagedKL, TailKL, supernet_fitness
from compress.search.supernet import CODE_VERSION, Assembler, LoadCache, VariantDB, WeightSwap
from compress.search.variants import fingerprint, model_parts
from export.records import QuantRecord

UNIT_LABEL = {"q_proj": "qkv", "o_proj": "o", "up_proj": "gate_up", "down_proj": "down"}  # by shared input


def _record_tensors(rec: QuantRecord) -> dict[str, torch.Tensor]:
    return {"packed": rec.packed, "scale": rec.scale, "zero": rec.zero, "g_idx": rec.g_idx}


def _record_from(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> QuantRecord:
    return QuantRecord(bits=int(meta["bits"]), group_size=int(meta["group_size"]), sym=meta["sym"] == "True",
                       shape=tuple(json.loads(meta["shape"])), **tensors)


def searched_quantize(model: nn.Module, ctx: PassContext, cfg: GptqConfig, modules: Modules, where: str,
                      report: PassReport) -> None:
    """Mixed precision chosen by a multiple-choice knapsack over measured errors (ROCKET-style), optionally refined
    by an evolutionary search on the assembled model (EvoPress-style).

    1. Variants: every targeted module quantized with GPTQ at every width in `choices`, block by block; the next
       block is calibrated on the outputs of this block at the reference width (the choice nearest the average), so
       each variant sees realistic upstream error. Stored in the variant database (reused by a rerun).
    2. Errors: for each unit (a fused group: q/k/v, o, gate/up, down) and width, the KL of the model's next-token
       distribution to the dense model's on `error_windows` calibration windows with only that unit quantized.
    3. Allocation: the widths minimizing the summed KL with the average code width <= `average`.
    4. (allocator: evolution) from there, (1 + lambda) evolution whose fitness is the KL of the model assembled from
       the variants, scored in stages on the first `stage_windows` calibration windows; its state is saved in the
       variant folder after every generation, so an interrupted run resumes.
    The model is assembled from the variants of the final allocation.
    """
    mixed = cfg.bits
    assert isinstance(mixed, MixedBits)
    levels = sorted(set(mixed.choices))
    pinned = pins(cfg, modules, where)  # an override's bits: the unit has that one width
    free = free_average(mixed, modules, pinned, where)
    ref_level = min(levels, key=lambda b: (abs(b - free), b))
    widths_of = lambda name: [pinned[name]] if name in pinned else levels  # noqa: E731
    ref_of = lambda name: pinned.get(name, ref_level)  # noqa: E731
    blocks = llama.blocks(model)
    dense = {name: lin.weight.data.clone() for name, (_, _, lin) in modules.items()}
    # the variants depend on the weights, the quantizer settings, the widths, the reference width later blocks are
    # calibrated at, and the calibration windows, not on the budget or the search: a knapsack at 3.0 and at 3.5 bits
    # (reference 3 for both), or an evolution, share one database
    settings = cfg.model_dump(mode="json")
    settings["bits"] = {"choices": levels, "reference": ref_level}
    key = fingerprint(CODE_VERSION, *model_parts(model), settings, ctx.calibration)
    db = VariantDB(None if ctx.cache is None else ctx.cache / f"variants-{key[:20]}")
    specs = {(name, b): spec_for(name, lin.in_features, b, cfg, where) for name, (_, _, lin) in modules.items()
             for b in widths_of(name)}
    for b in levels:  # fused groups share group_size and sym at every width (widths: pins checked them)
        check_fused_share({n: specs[(n, pinned.get(n, b))] for n in modules}, modules, where)
    units: dict[str, list[str]] = {}  # model.layers.3.qkv -> [...q_proj, ...k_proj, ...v_proj]
    for name, (i, short, _lin) in modules.items():
        units.setdefault(f"model.layers.{i}.{UNIT_LABEL[llama.SHARED_INPUT[short]]}", []).append(name)
    layer_of = {u: modules[members[0]][0] for u, members in units.items()}
    units_of_layer = {i: [u for u in units if layer_of[u] == i] for i in range(len(blocks))}
    weights = LoadCache(lambda name, b: _record_from(*db.get(name, b)).dequantize().to(dense[name].dtype))
    linears = {name: lin for name, (_, _, lin) in modules.items()}
    supernet = Assembler(WeightSwap(linears, units, weights, dense))

    # 1. variants
    def watch(i, _block):
        if all(db.has(n, b) for n, (li, _, _) in modules.items() if li == i for b in widths_of(n)):
            return {}
        return {n: lin for n, (li, short, lin) in modules.items() if li == i and llama.SHARED_INPUT[short] == short}

    def visit(i, _block, _inputs, _outputs, stats):
        for name, (li, short, _lin) in modules.items():
            if li != i:
                continue
            for b in widths_of(name):
                if db.has(name, b):
                    continue
                s = stats[shared_input_name(name, short)]
                check_finite(name, dense[name], s.xtx)
                spec = specs[(name, b)]
                assert s.xtx is not None
                q = gptq_quantize(dense[name].to(s.xtx.device), 2.0 / s.n * s.xtx, spec)
                rec = quant_record(q, spec, (dense[name].shape[0], dense[name].shape[1]))
                notes = q.notes + ([q.fallback] if q.fallback else [])
                meta = {"bits": b, "group_size": spec.group_size, "sym": spec.sym, "shape": json.dumps(list(rec.shape)),
                        "notes": json.dumps(notes), "fallback": q.fallback or ""}
                db.put(name, b, _record_tensors(rec), meta)
        # the next block is calibrated on this one at the reference width
        supernet.assemble({u: ref_of(units[u][0]) for u in units_of_layer[i]})
        return True

    # a rerun: nothing to quantize, no pass over blocks
    reused = all(db.has(n, b) for n in modules for b in widths_of(n))
    with supernet:  # the model is dense again after the variants, the errors and the search
        if not reused:
            for_each_block(model, blocks, ctx.calibration, visit, watch, batch_size=ctx.batch_size, want_xtx=True,
                           desc="knapsack: variants", device=ctx.device, data_parallel=True)
            supernet.restore_dense()

        # 2. errors: KL with one unit quantized at a time
        errors_key = f"unit_kl-{mixed.error_windows}w"
        errors = db.read_json(errors_key) or {}
        todo = [(u, b) for u in units for b in widths_of(units[u][0]) if f"{u}@{b}" not in errors]
        if todo:
            tail = TailKL(model, ctx.calibration[: mixed.error_windows], batch_size=ctx.batch_size, device=ctx.device)
            for u, b in tqdm(todo, desc="knapsack: unit errors", unit="variant"):
                supernet.assemble({u: b})
                errors[f"{u}@{b}"] = tail.kl_from(layer_of[u])
                if not math.isfinite(errors[f"{u}@{b}"]):
                    raise CompressError(f"{u} at {b} bits: the model's KL to the dense one is {errors[f'{u}@{b}']} "
                                        "(non-finite outputs); leave this width out of bits.choices or the unit out "
                                        "of targets")
                supernet.restore_dense()
                db.write_json(errors_key, errors)
            del tail

        # 3. allocate
        unit_list = [Unit(u, tuple(Option(b, b * sum(dense[n].numel() for n in members), errors[f"{u}@{b}"])
                                   for b in widths_of(members[0])), tuple(members)) for u, members in units.items()]
        n_weights = sum(t.numel() for t in dense.values())
        try:
            alloc = knapsack(unit_list, mixed.average * n_weights)
        except ValueError as err:
            raise InputError(f"{where}.bits.average: {err}") from None
        summary = {"knapsack": {**alloc.details, "summed_unit_kl": round(alloc.error, 6)}}
        if mixed.allocator == "evolution":
            alloc, summary["evolution"] = _evolve(model, ctx, mixed, unit_list, supernet, alloc, db, key)

    # 4. assemble the model from the variants of the final allocation
    chosen = alloc.levels(unit_list)
    supernet.assemble(chosen)
    rows: dict[int, dict] = {}
    for u, members in units.items():
        b = chosen[u]
        i = layer_of[u]
        row = rows.setdefault(i, {"layer": i, "bits": "", "units": "", "unit kl": "", "notes": ""})
        row["units"] += ("/" if row["units"] else "") + u.rsplit(".", 1)[1]
        row["bits"] += ("/" if row["bits"] else "") + str(b)
        row["unit kl"] += ("/" if row["unit kl"] else "") + f"{errors[f'{u}@{b}']:.2e}"
        for name in members:
            tensors, meta = db.get(name, b)
            ctx.plan.quantize(name, _record_from(tensors, meta))
            if ctx.originals is not None:  # a later correction fits W - Wq (no X^T X: variants were made per width)
                ctx.originals[name] = Original(dense[name].cpu(), None, 0)
            for note in json.loads(meta.get("notes", "[]")):
                row["notes"] = (row["notes"] + "; " if row["notes"] else "") + f"{name.split('.')[-1]}: {note}"
            if meta.get("fallback"):
                report.fallbacks.append(f"{name}: {meta['fallback']}")
    report.rows = [rows[i] for i in sorted(rows)]
    report.summary.update({
        "method": "gptq", "allocator": mixed.allocator, "modules": len(modules), "units": len(units),
        "average_bits": round(alloc.cost / n_weights, 4), "unit_bits": chosen, "error_windows": mixed.error_windows,
        "pinned": pinned,
        **summary, "variants": str(db.folder) if db.folder else "memory", "variants_reused": reused,
        "group_size": cfg.group_size, "sym": cfg.sym,
        "layer_bits": [layer_average(i, {n: ctx.plan.quantized[n].bits for n in modules}, modules)
                       for i in range(len(blocks))],
    })


def _evolve(model: nn.Module, ctx: PassContext, mixed: MixedBits, unit_list: list[Unit], supernet: Assembler,
            start: Allocation, db: VariantDB, key: str) -> tuple[Allocation, dict]:
    """EvoPress-style refinement of the knapsack allocation; fitness = KL of the assembled model to the dense one."""
    evo = mixed.evolution
    score = StagedKL(model, ctx.calibration, evo.stage_windows, ctx.batch_size, ctx.device)  # the model is dense here
    identity = {"variants": key, "stage_windows": evo.stage_windows, "error_windows": mixed.error_windows}
    fitness = supernet_fitness(unit_list, supernet, score, distributed.SpreadExecutor("evolution: candidates"))
    return evolve_saved(unit_list, start.budget, fitness, start.choice,
                        EvolutionSettings.from_config(evo, ctx.seed), db.folder, identity)
