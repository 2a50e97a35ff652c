"""Weight quantization passes: GPTQ block by block (each block calibrated on the already-quantized blocks' outputs)
and round-to-nearest, with regex targets, per-pattern overrides and layer-wise mixed precision."""

from __future__ import annotations

import json
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.capture import for_each_block
from compress.errors import CompressError, InputError
from compress.models import llama
from compress.ops.gptq import Quantized, gptq_quantize
from compress.ops.importance import lim_score, zd_score
from compress.ops.quant import QuantSpec, pack, rtn
from compress.passes.base import PassContext, check_finite
from compress.plan import PassReport, QuantRecord
from compress.recipe import GptqConfig, MixedBits, RtnConfig, pattern_search
from compress.evaluate import TailKL
from compress.search.base import Allocation, Option, Unit
from compress.search.evolution import EvolutionSettings, evolve_saved
from compress.search.knapsack import knapsack
from compress.search.ranking import assign_by_rank
from compress.search.variants import CODE_VERSION, LoadCache, VariantDB, fingerprint, model_parts


def select_modules(model: nn.Module, targets: list[str], ignore: list[str], where: str) -> dict[str, tuple[int, str, nn.Linear]]:
    """Decoder projections whose name matches a target and no ignore pattern; refuses an empty or partial-fused set."""
    found = {name: v for name, v in llama.named_linears(model).items()
             if any(pattern_search(t, name, f"{where}.targets") for t in targets)
             and not any(pattern_search(p, name, f"{where}.ignore") for p in ignore)}
    if not found:
        raise InputError(f"{where}.targets {targets} (ignore {ignore}) matched no module; "
                         f"names look like {next(iter(llama.named_linears(model)))}")
    for name, (i, short, _) in found.items():  # fused groups are quantized together or not at all
        for other, rep in llama.SHARED_INPUT.items():
            if rep == llama.SHARED_INPUT[short] and other != short:
                sub = "self_attn" if other in llama.ATTN else "mlp"
                if f"model.layers.{i}.{sub}.{other}" not in found:
                    raise InputError(f"{where}: {name} is targeted but {other} of layer {i} is not; serving engines "
                                     "fuse q/k/v and gate/up, so they are quantized together or not at all")
    return found


def _group_field(name: str, cfg: GptqConfig | RtnConfig) -> str:
    """The recipe field `name`'s group size comes from: group_size, or the last matching override that sets one."""
    field = "group_size"
    for j, ov in enumerate(cfg.overrides):
        if ov.group_size is not None and pattern_search(ov.pattern, name, f"overrides.{j}.pattern"):
            field = f"overrides.{j}.group_size"
    return field


def _spec_for(name: str, in_features: int, bits: int, cfg: GptqConfig | RtnConfig, where: str) -> QuantSpec:
    group, sym = cfg.group_size, cfg.sym
    for j, ov in enumerate(cfg.overrides):
        if pattern_search(ov.pattern, name, f"{where}.overrides.{j}.pattern"):
            bits = ov.bits if ov.bits is not None else bits
            group = ov.group_size if ov.group_size is not None else group
            sym = ov.sym if ov.sym is not None else sym
    if group != -1 and in_features % group:
        divisors = [d for d in range(8, min(in_features, 256) + 1, 8) if in_features % d == 0]
        hint = (f" (after pruning, a pruning pass with round_to: {group} keeps MLP widths divisible)"
                if name.endswith("down_proj") else "")
        raise InputError(f"{where}.{_group_field(name, cfg)}: {group} does not divide {name}'s {in_features} input "
                         f"columns; "
                         f"pick one of {divisors or [in_features]} or -1{hint}")
    kw = {}
    if isinstance(cfg, GptqConfig):
        kw = dict(act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size)
    return QuantSpec(bits=bits, group_size=group, sym=sym, **kw)


def check_before_passes(model: nn.Module, quant: GptqConfig | RtnConfig, where_q: str,
                        pruning: list[tuple[object, str]]) -> None:
    """Before any pass runs, what the quantize pass would refuse only after the passes before it (a Tyr search takes
    minutes): targets, pins and the budget left, group sizes on the dense widths, and on the widths the pruning
    passes before it leave. MLP widths change `round_to` channels at a time (down_proj's input); key-value groups
    (every pruning pass but CFSP) take o_proj's input columns a group at a time. The pass checks again on the
    pruned model."""
    modules = select_modules(model, quant.targets, quant.ignore, where_q)
    if isinstance(quant.bits, MixedBits):
        _free_average(quant.bits, modules, _pins(quant, modules, where_q), where_q)
    for name, (i, short, lin) in modules.items():
        g = _spec_for(name, lin.in_features, 4, quant, where_q).group_size  # checks the dense widths
        if g == -1:
            continue
        field = f"{where_q}.{_group_field(name, quant)}"
        for prune, where_p in pruning:
            if short == "down_proj" and prune.round_to % g:
                raise InputError(f"{where_p}.round_to: {prune.round_to} changes MLP widths in steps that {field} {g} "
                                 f"does not divide ({name} reads the MLP width); set {where_p}.round_to to a "
                                 f"multiple of {g}")
            if short != "o_proj" or prune.pass_ == "cfsp":  # CFSP keeps attention whole
                continue
            shape = llama.block_shape(llama.blocks(model)[i])
            step = shape.group_size * shape.head_dim  # o_proj input columns of one key-value group
            if shape.num_key_value_heads > 1 and step % g:
                raise InputError(f"{field}: {g} does not divide the {step} input columns of {name} that {where_p} "
                                 f"removes with each key-value group; pick a group size dividing {step}, or -1, or "
                                 "leave o_proj out with ignore")


def _pinned_bits(name: str, cfg: GptqConfig | RtnConfig) -> int | None:
    """The width an override fixes for `name` (the last matching override that sets `bits`), or None."""
    bits = None
    for j, ov in enumerate(cfg.overrides):
        if ov.bits is not None and pattern_search(ov.pattern, name, f"overrides.{j}.pattern"):
            bits = ov.bits
    return bits


def _pins(cfg: GptqConfig | RtnConfig, modules: dict, where: str) -> dict[str, int]:
    """Module -> the width an override pins it to; refuses a fused group (q/k/v, gate/up) pinned only in part."""
    pinned = {n: b for n in modules if (b := _pinned_bits(n, cfg)) is not None}
    seen: dict[tuple[int, str], str] = {}
    for name, (i, short, _) in modules.items():
        other = seen.setdefault((i, llama.SHARED_INPUT[short]), name)
        if pinned.get(name) != pinned.get(other):
            say = lambda n: f"pin {n} to {pinned[n]} bits" if n in pinned else f"leave {n} to the allocation"  # noqa: E731
            raise InputError(f"{where}.overrides {say(other)} but {say(name)}; fused groups (q/k/v, gate/up) share "
                             "one scheme, so pin the whole group or none of it")
    return pinned


def _free_average(mixed: MixedBits, modules: dict, pinned: dict[str, int], where: str) -> float:
    """The average width left for the modules no override pins, so that all quantized weights together meet
    `mixed.average`; an input error when the pinned widths leave an average outside the choices."""
    size = {n: lin.weight.numel() for n, (_, _, lin) in modules.items()}
    total, fixed = sum(size.values()), sum(size[n] for n in pinned)
    if fixed == total:
        raise InputError(f"{where}.overrides fix the width of every targeted module, so bits.average has nothing to "
                         "allocate; give bits a single width or pin fewer modules")
    free = (mixed.average * total - sum(b * size[n] for n, b in pinned.items())) / (total - fixed)
    lo, hi = min(mixed.choices), max(mixed.choices)
    if not pinned and not lo <= free <= hi:  # overrides with bits that match no targeted module
        raise InputError(f"{where}.bits.average: {mixed.average} cannot be met with choices {sorted(set(mixed.choices))}"
                         f": it must lie in [{lo}, {hi}] (no override's bits matches a targeted module)")
    if not lo - 1e-9 <= free <= hi + 1e-9:
        widths = "/".join(str(b) for b in sorted(set(pinned.values())))
        raise InputError(f"{where}.bits.average: {mixed.average} cannot be met: the overrides fix "
                         f"{fixed / total:.0%} of the quantized weights at {widths} bits, which leaves {free:.3f} bits "
                         f"per weight for the rest, outside the choices [{lo}, {hi}]; change the average or the "
                         "overrides")
    return min(max(free, lo), hi)  # rounding can land a hair outside an exactly met bound


def _check_fused_share(specs: dict[str, QuantSpec], modules: dict, where: str) -> None:
    seen: dict[tuple[int, str], tuple[str, QuantSpec]] = {}
    for name, spec in specs.items():
        i, short, _ = modules[name]
        key = (i, llama.SHARED_INPUT[short])
        if key in seen and seen[key][1] != spec:
            raise InputError(f"{where}.overrides give {seen[key][0]} and {name} different settings; fused groups "
                             "(q/k/v, gate/up) share one scheme")
        seen.setdefault(key, (name, spec))


def layer_importance(model: nn.Module, ctx: PassContext, mixed: MixedBits, modules: dict) -> list[float]:
    """One score per decoder layer: LIM (1 - cos of block input and output, dense), ZD (weight outliers), or random."""
    n_layers = len(llama.blocks(model))
    if mixed.importance == "random":
        g = torch.Generator().manual_seed(ctx.seed)
        return torch.rand(n_layers, generator=g, dtype=torch.float64).tolist()
    if mixed.importance == "zd":
        return [zd_score([lin.weight for (i, _, lin) in modules.values() if i == layer] or [torch.zeros(2)],
                         mixed.zd_threshold) for layer in range(n_layers)]
    scores = [0.0] * n_layers

    def visit(i, _block, inputs, outputs, _stats):
        total, count = 0.0, 0
        for x_in, x_out in zip(inputs, outputs):
            t, c = lim_score(x_in, x_out)
            total, count = total + t, count + c
        scores[i] = total / count

    for_each_block(model, llama.blocks(model), ctx.calibration, visit, batch_size=ctx.batch_size, desc="lim: importance")
    return scores


UNIT_LABEL = {"q_proj": "qkv", "o_proj": "o", "up_proj": "gate_up", "down_proj": "down"}  # by shared input


def _record_tensors(rec: QuantRecord) -> dict[str, torch.Tensor]:
    return {"packed": rec.packed, "scale": rec.scale, "zero": rec.zero, "g_idx": rec.g_idx}


def _record_from(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> QuantRecord:
    return QuantRecord(bits=int(meta["bits"]), group_size=int(meta["group_size"]), sym=meta["sym"] == "True",
                       shape=tuple(json.loads(meta["shape"])), **tensors)


def _searched_quantize(model: nn.Module, ctx: PassContext, cfg: GptqConfig, modules: dict, where: str,
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
    mixed: MixedBits = cfg.bits
    levels = sorted(set(mixed.choices))
    pinned = _pins(cfg, modules, where)  # an override's bits: the unit has that one width
    free_average = _free_average(mixed, modules, pinned, where)
    ref_level = min(levels, key=lambda b: (abs(b - free_average), b))
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
    specs = {(name, b): _spec_for(name, lin.in_features, b, cfg, where) for name, (_, _, lin) in modules.items()
             for b in widths_of(name)}
    for b in levels:  # fused groups share group_size and sym at every width (widths: _pins checked them)
        _check_fused_share({n: specs[(n, pinned.get(n, b))] for n in modules}, modules, where)
    units: dict[str, list[str]] = {}  # model.layers.3.qkv -> [...q_proj, ...k_proj, ...v_proj]
    for name, (i, short, _lin) in modules.items():
        units.setdefault(f"model.layers.{i}.{UNIT_LABEL[llama.SHARED_INPUT[short]]}", []).append(name)
    layer_of = {u: modules[members[0]][0] for u, members in units.items()}

    def load_variant(name: str, b: int) -> QuantRecord:
        tensors, meta = db.get(name, b)
        return _record_from(tensors, meta)

    # 1. variants
    def watch(i, _block):
        if all(db.has(n, b) for n, (li, _, _) in modules.items() if li == i for b in widths_of(n)):
            return {}
        return {n: lin for n, (li, short, lin) in modules.items() if li == i and llama.SHARED_INPUT[short] == short}

    def visit(i, _block, _inputs, _outputs, stats):
        for name, (li, short, lin) in modules.items():
            if li != i:
                continue
            for b in widths_of(name):
                if db.has(name, b):
                    continue
                s = stats[_shared_input_name(name, short)]
                check_finite(name, dense[name], s.xtx)
                spec = specs[(name, b)]
                q = gptq_quantize(dense[name], 2.0 / s.n * s.xtx, spec)
                rec = _record(q, spec, tuple(dense[name].shape))
                notes = q.notes + ([q.fallback] if q.fallback else [])
                db.put(name, b, _record_tensors(rec), {"bits": b, "group_size": spec.group_size, "sym": spec.sym,
                                                        "shape": json.dumps(list(rec.shape)), "notes": json.dumps(notes),
                                                        "fallback": q.fallback or ""})
            lin.weight.data = load_variant(name, ref_of(name)).dequantize().to(lin.weight.dtype)
        return True

    reused = all(db.has(n, b) for n in modules for b in widths_of(n))  # a rerun: nothing to quantize, no pass over blocks
    if not reused:
        for_each_block(model, blocks, ctx.calibration, visit, watch, batch_size=ctx.batch_size, want_xtx=True,
                       desc="knapsack: variants")
        for name, (_, _, lin) in modules.items():
            lin.weight.data = dense[name]

    # 2. errors: KL with one unit quantized at a time
    errors_key = f"unit_kl-{mixed.error_windows}w"
    errors = db.read_json(errors_key) or {}
    todo = [(u, b) for u in units for b in widths_of(units[u][0]) if f"{u}@{b}" not in errors]
    if todo:
        tail = TailKL(model, ctx.calibration[: mixed.error_windows], batch_size=ctx.batch_size)
        for u, b in tqdm(todo, desc="knapsack: unit errors", unit="variant"):
            for name in units[u]:
                modules[name][2].weight.data = load_variant(name, b).dequantize().to(dense[name].dtype)
            errors[f"{u}@{b}"] = tail.kl_from(layer_of[u])
            if not math.isfinite(errors[f"{u}@{b}"]):
                raise CompressError(f"{u} at {b} bits: the model's KL to the dense one is {errors[f'{u}@{b}']} "
                                    "(non-finite outputs); leave this width out of bits.choices or the unit out "
                                    "of targets")
            for name in units[u]:
                modules[name][2].weight.data = dense[name]
            db.write_json(errors_key, errors)
        del tail

    # 3. allocate and assemble
    unit_list = [Unit(u, tuple(Option(b, b * sum(dense[n].numel() for n in members), errors[f"{u}@{b}"])
                               for b in widths_of(members[0])), tuple(members)) for u, members in units.items()]
    n_weights = sum(t.numel() for t in dense.values())
    try:
        alloc = knapsack(unit_list, mixed.average * n_weights)
    except ValueError as err:
        raise InputError(f"{where}.bits.average: {err}") from None
    summary = {"knapsack": {**alloc.details, "summed_unit_kl": round(alloc.error, 6)}}
    if mixed.allocator == "evolution":
        alloc, summary["evolution"] = _evolve(model, ctx, mixed, unit_list, units, modules, dense, alloc, db, key,
                                              load_variant)
    chosen = alloc.levels(unit_list)
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
            rec = _record_from(tensors, meta)
            modules[name][2].weight.data = rec.dequantize().to(dense[name].dtype)
            ctx.plan.quantized[name] = rec
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
        "layer_bits": [_layer_average(i, {n: ctx.plan.quantized[n].bits for n in modules}, modules)
                       for i in range(len(blocks))],
    })


def _evolve(model, ctx: PassContext, mixed: MixedBits, unit_list: list[Unit], units: dict[str, list[str]],
            modules: dict, dense: dict, start: Allocation, db: VariantDB, key: str, load_variant):
    """EvoPress-style refinement of the knapsack allocation; fitness = KL of the assembled model to the dense one."""
    evo = mixed.evolution
    stages = [TailKL(model, ctx.calibration[:n], batch_size=ctx.batch_size, any_start=False) for n in evo.stage_windows]
    current: dict[str, int] = {}  # unit -> level the model holds now (absent: dense)
    weights = LoadCache(lambda name, level: load_variant(name, level).dequantize().to(dense[name].dtype))

    def assemble(choice: dict[str, int]) -> None:
        for u in unit_list:
            level = u.options[choice[u.name]].level
            if current.get(u.name) == level:
                continue
            for name in units[u.name]:
                modules[name][2].weight.data = weights(name, level)
            current[u.name] = level

    def fitness(choice: dict[str, int], stage: int) -> float:
        assemble(choice)
        return stages[stage].kl_from(0)

    identity = {"variants": key, "stage_windows": evo.stage_windows, "error_windows": mixed.error_windows}
    try:
        return evolve_saved(unit_list, start.budget, fitness, start.choice,
                            EvolutionSettings.from_config(evo, ctx.seed), db.folder, identity)
    finally:
        for name, (_, _, lin) in modules.items():
            lin.weight.data = dense[name]


def _layer_average(i: int, bits: dict[str, int], modules: dict) -> int | float | None:
    """A layer's parameter-weighted code width: an int when all its projections share one, else a float rounded to
    3 digits; None when none of them is quantized."""
    names = [n for n, (li, _, _) in modules.items() if li == i]
    if not names:
        return None
    if len({bits[n] for n in names}) == 1:
        return bits[names[0]]
    size = {n: modules[n][2].weight.numel() for n in names}
    return round(sum(bits[n] * size[n] for n in names) / sum(size.values()), 3)


def _shared_input_name(name: str, short: str) -> str:
    """The module whose inputs `name` shares (model.layers.3.self_attn.k_proj -> ...self_attn.q_proj)."""
    return name.removesuffix(short) + llama.SHARED_INPUT[short]


def _record(q: Quantized, spec: QuantSpec, shape: tuple[int, int]) -> QuantRecord:
    return QuantRecord(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, shape=shape,
                       packed=pack(q.codes, spec.bits, 1), scale=q.scale.float().contiguous(),
                       zero=q.zero.round().to(torch.int32).contiguous(), g_idx=q.g_idx.to(torch.int32).contiguous())


def _relative_error(W: torch.Tensor, Wq: torch.Tensor, xtx: torch.Tensor | None) -> float:
    """tr(dW H dW^T) / tr(W H W^T) with H = X^T X: the share of output energy the quantization error adds."""
    dW = (Wq - W).double()
    if xtx is None:
        return float((dW**2).sum() / (W.double() ** 2).sum())
    H = xtx.double()
    return float(((dW @ H) * dW).sum() / ((W.double() @ H) * W.double()).sum())


class QuantizePass:
    def __init__(self, config: GptqConfig | RtnConfig):
        self.config = config
        self.method = "gptq" if isinstance(config, GptqConfig) else "rtn"

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes[{ctx.index}]"
        if getattr(model.config, "quantization_config", None) is not None or ctx.plan.quantized:
            raise InputError(f"{where}: the model is already quantized; quantize the dense source instead")
        modules = select_modules(model, cfg.targets, cfg.ignore, where)
        n_layers = len(llama.blocks(model))
        report = PassReport(name=self.method)
        if isinstance(cfg.bits, MixedBits) and cfg.bits.allocator in ("knapsack", "evolution"):
            if self.method != "gptq":
                raise InputError(f"{where}.bits.allocator: {cfg.bits.allocator} searches over GPTQ variants; "
                                 "use pass: gptq")
            _searched_quantize(model, ctx, cfg, modules, where, report)
            report.seconds = time.perf_counter() - t0
            return report
        if isinstance(cfg.bits, MixedBits):
            pinned = _pins(cfg, modules, where)
            free_average = _free_average(cfg.bits, modules, pinned, where)
            importance = layer_importance(model, ctx, cfg.bits, modules)
            sizes = [sum(lin.weight.numel() for n, (i, _, lin) in modules.items() if i == layer and n not in pinned)
                     for layer in range(n_layers)]  # pinned modules keep their width outside the ranking
            layer_bits = assign_by_rank(importance, sizes, free_average, cfg.bits.choices)
            report.summary["pinned"] = pinned
            report.summary["importance"] = {"method": cfg.bits.importance, "scores": [round(s, 6) for s in importance]}
        else:
            layer_bits = [cfg.bits] * n_layers
        specs = {name: _spec_for(name, lin.in_features, layer_bits[i], cfg, where) for name, (i, _, lin) in modules.items()}
        _check_fused_share(specs, modules, where)

        rows: dict[int, dict] = {}

        def quantize_one(name: str, xtx: torch.Tensor | None, n: int) -> None:
            i, _short, lin = modules[name]
            spec = specs[name]
            W = lin.weight.data
            check_finite(name, W, xtx)
            if xtx is None:
                codes, scale, zero = rtn(W, spec)
                g = W.shape[1] if spec.group_size == -1 else spec.group_size
                q = Quantized(codes, scale, zero, (torch.arange(W.shape[1]) // g).to(torch.int32))
            else:
                q = gptq_quantize(W, 2.0 / n * xtx, spec)
            Wq = q.dequantize().to(W.dtype)
            err = _relative_error(W, Wq, xtx)
            lin.weight.data = Wq
            ctx.plan.quantized[name] = _record(q, spec, tuple(W.shape))
            row = rows.setdefault(i, {"layer": i, "bits": spec.bits, "modules": 0, "rel err mean": 0.0,
                                      "rel err max": 0.0, "notes": ""})
            if str(spec.bits) not in str(row["bits"]).split("/"):  # a pinned module beside allocated ones
                row["bits"] = f"{row['bits']}/{spec.bits}"
            row["modules"] += 1
            row["rel err mean"] += err
            row["rel err max"] = max(row["rel err max"], err)
            for note in q.notes + ([q.fallback] if q.fallback else []):
                row["notes"] = (row["notes"] + "; " if row["notes"] else "") + f"{name.split('.')[-1]}: {note}"
            if q.fallback:
                report.fallbacks.append(f"{name}: {q.fallback}")

        if self.method == "rtn":
            for name in modules:
                quantize_one(name, None, 0)
        else:
            def watch(i, _block):  # one watched module per shared input
                reps = {}
                for name, (li, short, lin) in modules.items():
                    if li == i and llama.SHARED_INPUT[short] == short:
                        reps[name] = lin
                return reps

            def visit(i, _block, _inputs, _outputs, stats):
                for name, (li, short, _lin) in modules.items():
                    if li == i:
                        s = stats[_shared_input_name(name, short)]
                        quantize_one(name, s.xtx, s.n)
                return True  # the block changed: recompute its outputs for the next block

            for_each_block(model, llama.blocks(model), ctx.calibration, visit, watch, batch_size=ctx.batch_size,
                           want_xtx=True, desc="gptq: blocks")
        for row in rows.values():
            row["rel err mean"] = round(row["rel err mean"] / row["modules"], 6)
            row["rel err max"] = round(row["rel err max"], 6)
        report.rows = [rows[i] for i in sorted(rows)]
        total = sum(lin.weight.numel() for (_, _, lin) in modules.values())
        report.summary.update({
            "method": self.method, "modules": len(modules),
            "average_bits": round(sum(specs[n].bits * modules[n][2].weight.numel() for n in modules) / total, 4),
            "layer_bits": [_layer_average(i, {n: s.bits for n, s in specs.items()}, modules) for i in range(n_layers)],
            "group_size": cfg.group_size, "sym": cfg.sym,
        })
        report.seconds = time.perf_counter() - t0
        return report
