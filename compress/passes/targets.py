"""What a quantization pass touches and how: module selection by target patterns, per-pattern overrides, widths that
overrides pin, fused groups (q/k/v, gate/up share one scheme), the per-module quantizer spec, and the pre-flight
check that runs before any pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compress.errors import InputError
from compress.models import llama
from compress.ops.gptq import Quantized
from compress.ops.quant import QuantSpec, pack
from compress.recipe import GptqConfig, MixedBits, Prunes, RtnConfig, pattern_search
from export.records import QuantRecord

# module name -> (layer index, short name such as "q_proj", the module)
Modules = dict[str, tuple[int, str, nn.Linear]]


def select_modules(model: nn.Module, targets: list[str], ignore: list[str], where: str) -> Modules:
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


def spec_for(name: str, in_features: int, bits: int, cfg: GptqConfig | RtnConfig, where: str) -> QuantSpec:
    """The quantizer settings of module `name` at `bits` after the overrides; refuses a group size that does not
    divide its `in_features` input columns."""
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
    if isinstance(cfg, GptqConfig):
        return QuantSpec(bits=bits, group_size=group, sym=sym, act_order=cfg.act_order,
                         static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size,
                         mse=cfg.scale_search == "mse")
    return QuantSpec(bits=bits, group_size=group, sym=sym, mse=cfg.scale_search == "mse")


def check_before_passes(model: nn.Module, quant: GptqConfig | RtnConfig, where_q: str,
                        pruning: Sequence[tuple[Prunes, str]]) -> None:
    """Before any pass runs, what the quantize pass would refuse only after the passes before it (a Tyr search takes
    minutes): targets, pins and the budget left, group sizes on the dense widths, overrides that split a fused group,
    and group sizes on the widths the pruning passes before it leave. MLP widths change `round_to` channels at a time
    (down_proj's input); a pass that removes key-value groups takes o_proj's input columns a group at a time. The
    pass checks again on the pruned model."""
    modules = select_modules(model, quant.targets, quant.ignore, where_q)
    if isinstance(quant.bits, MixedBits):
        free_average(quant.bits, modules, pins(quant, modules, where_q), where_q)
    # a mixed width is allocated per layer (the same for a whole fused group), so any one width stands for it here
    bits = quant.bits if isinstance(quant.bits, int) else min(quant.bits.choices)
    specs = {name: spec_for(name, lin.in_features, bits, quant, where_q)  # checks the dense widths
             for name, (_, _, lin) in modules.items()}
    check_fused_share(specs, modules, where_q)
    for name, (i, short, _lin) in modules.items():
        g = specs[name].group_size
        if g == -1:
            continue
        field = f"{where_q}.{_group_field(name, quant)}"
        for prune, where_p in pruning:
            if short == "down_proj" and prune.round_to % g:
                raise InputError(f"{where_p}.round_to: {prune.round_to} changes MLP widths in steps that {field} {g} "
                                 f"does not divide ({name} reads the MLP width); set {where_p}.round_to to a "
                                 f"multiple of {g}")
            if short != "o_proj" or "kv_groups" not in prune.removes:
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


def pins(cfg: GptqConfig | RtnConfig, modules: Modules, where: str) -> dict[str, int]:
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


def free_average(mixed: MixedBits, modules: Modules, pinned: dict[str, int], where: str) -> float:
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
        raise InputError(f"{where}.bits.average: {mixed.average} cannot be met with choices "
                         f"{sorted(set(mixed.choices))}: it must lie in [{lo}, {hi}] (no override's bits matches a "
                         "targeted module)")
    if not lo - 1e-9 <= free <= hi + 1e-9:
        widths = "/".join(str(b) for b in sorted(set(pinned.values())))
        raise InputError(f"{where}.bits.average: {mixed.average} cannot be met: the overrides fix "
                         f"{fixed / total:.0%} of the quantized weights at {widths} bits, which leaves {free:.3f} bits "
                         f"per weight for the rest, outside the choices [{lo}, {hi}]; change the average or the "
                         "overrides")
    return min(max(free, lo), hi)  # rounding can land a hair outside an exactly met bound


def check_fused_share(specs: dict[str, QuantSpec], modules: Modules, where: str) -> None:
    """Refuses overrides that give members of one fused group (q/k/v, gate/up) different quantizer settings."""
    seen: dict[tuple[int, str], tuple[str, QuantSpec]] = {}
    for name, spec in specs.items():
        i, short, _ = modules[name]
        key = (i, llama.SHARED_INPUT[short])
        if key in seen and seen[key][1] != spec:
            raise InputError(f"{where}.overrides give {seen[key][0]} and {name} different settings; fused groups "
                             "(q/k/v, gate/up) share one scheme")
        seen.setdefault(key, (name, spec))


def shared_input_name(name: str, short: str) -> str:
    """The module whose inputs `name` shares (model.layers.3.self_attn.k_proj -> ...self_attn.q_proj)."""
    return name.removesuffix(short) + llama.SHARED_INPUT[short]


def layer_average(i: int, bits: dict[str, int], modules: Modules) -> int | float | None:
    """A layer's parameter-weighted code width: an int when all its projections share one, else a float rounded to
    3 digits; None when none of them is quantized."""
    names = [n for n, (li, _, _) in modules.items() if li == i]
    if not names:
        return None
    if len({bits[n] for n in names}) == 1:
        return bits[names[0]]
    size = {n: modules[n][2].weight.numel() for n in names}
    return round(sum(bits[n] * size[n] for n in names) / sum(size.values()), 3)


def quant_record(q: Quantized, spec: QuantSpec, shape: tuple[int, int]) -> QuantRecord:
    """What the artifact stores of one quantized module: codes packed along the input dimension, scales, zeros and
    the group index; on the CPU, wherever `q` was computed (the plan outlives the block on the device)."""
    return QuantRecord(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, shape=shape,
                       packed=pack(q.codes.cpu(), spec.bits, 1), scale=q.scale.float().cpu().contiguous(),
                       zero=q.zero.round().to(torch.int32).cpu().contiguous(),
                       g_idx=q.g_idx.to(torch.int32).cpu().contiguous())
