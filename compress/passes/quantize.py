"""Weight quantization passes: GPTQ block by block (each block calibrated on the already-quantized blocks' outputs)
and round-to-nearest, with regex targets, per-pattern overrides and layer-wise mixed precision (ranked by layer
importance here; searched over variants in `quantize_search`). What is targeted and how: `targets`."""

from __future__ import annotations

import time

import torch
from torch import nn

from calibration.capture import for_each_block
from compress import distributed
from compress.errors import InputError
from compress.models import llama
from compress.ops.gptq import Quantized, gptq_quantize
from compress.ops.importance import lim_score, zd_score
from compress.ops.quant import rtn
from compress.passes.base import Earlier, Original, PassContext, check_finite
from compress.passes.quantize_head import HeadInputs, check_head, quantize_head
from compress.passes.quantize_search import searched_quantize
from compress.passes.targets import (
    Modules,
    check_before_passes,
    check_fused_share,
    free_average,
    layer_average,
    pins,
    quant_record,
    select_modules,
    shared_input_name,
    spec_for,
)
from compress.recipe import GptqConfig, MixedBits, Prunes, RtnConfig
from compress.report import PassReport
from compress.search.ranking import assign_by_rank

__all__ = ["QuantizePass", "layer_importance", "select_modules"]


def layer_importance(model: nn.Module, ctx: PassContext, mixed: MixedBits, modules: Modules) -> list[float]:
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
        for x_in, x_out in zip(inputs, outputs, strict=True):
            t, c = lim_score(x_in, x_out)
            total, count = total + t, count + c
        scores[i] = total / count

    for_each_block(model, llama.blocks(model), ctx.calibration, visit, batch_size=ctx.batch_size,
                   desc="lim: importance", device=ctx.device)
    return scores


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

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """Targets, pins and budget, group sizes and fused groups on the dense widths and on the widths that the
        earlier passes of role prune leave."""
        check_before_passes(model, self.config, where, [(p, w) for p, w in earlier if isinstance(p, Prunes)])
        check_head(model, self.config, where)

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes.{ctx.index}"
        if getattr(model.config, "quantization_config", None) is not None or ctx.plan.quantized:
            raise InputError(f"{where}: the model is already quantized; quantize the dense source instead")
        modules = select_modules(model, cfg.targets, cfg.ignore, where)
        n_layers = len(llama.blocks(model))
        report = PassReport(name=self.method)
        if isinstance(cfg.bits, MixedBits) and cfg.bits.allocator in ("knapsack", "evolution"):
            if not isinstance(cfg, GptqConfig):
                raise InputError(f"{where}.bits.allocator: {cfg.bits.allocator} searches over GPTQ variants; "
                                 "use pass: gptq")
            searched_quantize(model, ctx, cfg, modules, where, report)
            report.seconds = time.perf_counter() - t0
            return report
        if isinstance(cfg.bits, MixedBits):
            pinned = pins(cfg, modules, where)
            free = free_average(cfg.bits, modules, pinned, where)
            importance = layer_importance(model, ctx, cfg.bits, modules)
            sizes = [sum(lin.weight.numel() for n, (i, _, lin) in modules.items() if i == layer and n not in pinned)
                     for layer in range(n_layers)]  # pinned modules keep their width outside the ranking
            layer_bits = assign_by_rank(importance, sizes, free, cfg.bits.choices)
            report.summary["pinned"] = pinned
            report.summary["importance"] = {"method": cfg.bits.importance, "scores": [round(s, 6) for s in importance]}
        else:
            layer_bits = [cfg.bits] * n_layers
        specs = {name: spec_for(name, lin.in_features, layer_bits[i], cfg, where)
                 for name, (i, _, lin) in modules.items()}
        check_fused_share(specs, modules, where)

        rows: dict[int, dict] = {}
        head_inputs = (HeadInputs(model, -(-ctx.calibration.shape[0] // ctx.batch_size))
                       if cfg.lm_head is not None and self.method == "gptq" else None)  # after the last block

        def solve(name: str, xtx: torch.Tensor | None, n: int) -> Quantized:
            spec, W = specs[name], modules[name][2].weight.data
            check_finite(name, W, xtx)
            if xtx is None:
                codes, scale, zero = rtn(W, spec)
                g = W.shape[1] if spec.group_size == -1 else spec.group_size
                return Quantized(codes, scale, zero, (torch.arange(W.shape[1], device=W.device) // g).to(torch.int32))
            return gptq_quantize(W, 2.0 / n * xtx, spec)

        def quantize_one(name: str, xtx: torch.Tensor | None, n: int, q: Quantized | None = None) -> None:
            """Quantize module `name` (with `q` when it was solved already, e.g. on another rank) and record it."""
            i, _short, lin = modules[name]
            spec = specs[name]
            W = lin.weight.data
            if q is None:
                q = solve(name, xtx, n)
            Wq = q.dequantize().to(W.dtype)
            err = _relative_error(W, Wq, xtx)
            if ctx.originals is not None:  # a later correction fits W - Wq
                ctx.originals[name] = Original(W.cpu(), None if xtx is None else xtx.cpu(), n)
            lin.weight.data = Wq
            ctx.plan.quantize(name, quant_record(q, spec, (W.shape[0], W.shape[1])))
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
                here = {name: stats[shared_input_name(name, short)] for name, (li, short, _lin) in modules.items()
                        if li == i}
                # the solves are independent: under torch.distributed each rank solves a share, all receive them all
                solved = distributed.spread(list(here), lambda name: solve(name, here[name].xtx, here[name].n),
                                            f"gptq: layer {i} solves")
                for (name, s), q in zip(here.items(), solved, strict=True):
                    quantize_one(name, s.xtx, s.n, q)
                return True  # the block changed: recompute its outputs for the next block

            for_each_block(model, llama.blocks(model), ctx.calibration, visit, watch, batch_size=ctx.batch_size,
                           want_xtx=True, desc="gptq: blocks", device=ctx.device, data_parallel=True,
                           finish=head_inputs)
        for row in rows.values():
            row["rel err mean"] = round(row["rel err mean"] / row["modules"], 6)
            row["rel err max"] = round(row["rel err max"], 6)
        report.rows = [rows[i] for i in sorted(rows)]
        if cfg.lm_head is not None:  # GPTQ: on what the quantized blocks hand the final norm
            quantize_head(model, cfg, None if head_inputs is None else head_inputs.stats, ctx, report)
        total = sum(lin.weight.numel() for (_, _, lin) in modules.values())
        report.summary.update({
            "method": self.method, "modules": len(modules),
            "average_bits": round(sum(specs[n].bits * modules[n][2].weight.numel() for n in modules) / total, 4),
            "layer_bits": [layer_average(i, {n: s.bits for n, s in specs.items()}, modules) for i in range(n_layers)],
            "group_size": cfg.group_size, "sym": cfg.sym,
        })
        report.seconds = time.perf_counter() - t0
        return report
