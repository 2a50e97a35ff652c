"""The output projection quantized by the quantize passes (`lm_head:` in gptq / rtn, as GPTQModel's `lm_head: true`):
GPTQ on the X^T X of the final norm's outputs, which the block engine hands over after the last block (so the head
is calibrated on what the quantized blocks give it), or round-to-nearest. A head tied to the embeddings is untied:
the embeddings stay as they are, the head becomes its own quantized weight, and the config says
tie_word_embeddings: false (what export writes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calibration.capture import LinearStats
from compress import distributed
from compress.device import CPU, move
from compress.errors import InputError
from compress.models import llama
from compress.ops.gptq import Quantized, gptq_quantize
from compress.ops.quant import QuantSpec, rtn
from compress.passes.base import PassContext, check_finite
from compress.passes.targets import quant_record
from compress.recipe import GptqConfig, MixedBits, RtnConfig
from compress.report import PassReport

LM_HEAD = "lm_head"  # the output projection's module name in the Llama family (export.write.LM_HEAD)


def check_head(model: nn.Module, cfg: GptqConfig | RtnConfig, where: str) -> None:
    """Before any pass runs: refuse (InputError naming `<where>.lm_head...`) an lm_head setting this model or pass
    cannot do: a searched allocation (knapsack, evolution: it solves the blocks apart from the engine), an lm_head
    that is not a plain linear layer, a group size that does not divide its input columns."""
    head = cfg.lm_head
    if head is None:
        return
    if isinstance(cfg.bits, MixedBits) and cfg.bits.allocator != "rank":
        raise InputError(f"{where}.lm_head: the {cfg.bits.allocator} allocator does not quantize the lm_head yet; "
                         "use fixed bits or allocator: rank")
    lin = llama.as_causal_lm(model).lm_head
    if type(lin) is not nn.Linear:
        raise InputError(f"{where}.lm_head: the model's lm_head is a {type(lin).__name__}, not a plain linear layer")
    if head.group_size != -1 and lin.in_features % head.group_size:
        divisors = [d for d in range(8, min(lin.in_features, 256) + 1, 8) if lin.in_features % d == 0]
        raise InputError(f"{where}.lm_head.group_size: {head.group_size} does not divide the lm_head's "
                         f"{lin.in_features} input columns; pick one of {divisors or [lin.in_features]} or -1")


class HeadInputs:
    """A for_each_block `finish`: the sums (X^T X) of the lm_head's inputs, the final norm of the last block's
    outputs, summed over every rank's batches under torch.distributed; `stats` once called, on the CPU."""

    def __init__(self, model: nn.Module, n_batches: int):
        self.norm = llama.as_causal_lm(model).model.norm
        self.n_batches = n_batches  # all ranks' batches together (the engine's batch boundaries)
        self.stats: LinearStats | None = None

    @torch.no_grad()
    def __call__(self, hidden: list[torch.Tensor]) -> None:
        parallel = distributed.active()
        stats = LinearStats(want_xtx=True, keep_parts=parallel)
        move(self.norm, hidden[0].device)
        try:
            for h in hidden:  # (B, T, H)
                stats.add(self.norm(h))
        finally:
            move(self.norm, CPU)
        if parallel:
            stats = stats.combined(self.n_batches, "lm_head input sums")
        self.stats = stats.to_(CPU)


def head_spec(cfg: GptqConfig | RtnConfig) -> QuantSpec:
    """The quantizer settings of the lm_head: its own bits, group size and grid; the pass's GPTQ and scale search."""
    head = cfg.lm_head
    assert head is not None
    if isinstance(cfg, GptqConfig):
        return QuantSpec(bits=head.bits, group_size=head.group_size, sym=head.sym, act_order=cfg.act_order,
                         static_groups=cfg.static_groups, damp=cfg.damp, block_size=cfg.block_size,
                         mse=cfg.scale_search == "mse")
    return QuantSpec(bits=head.bits, group_size=head.group_size, sym=head.sym, mse=cfg.scale_search == "mse")


def quantize_head(model: nn.Module, cfg: GptqConfig | RtnConfig, stats: LinearStats | None, ctx: PassContext,
                  report: PassReport) -> None:
    """Quantize the lm_head (vocab, hidden): GPTQ with `stats`' X^T X on ctx.device, round-to-nearest without;
    record it in the plan as `lm_head`, put the dequantized weight in its own parameter (untying a tied head) and
    add a row and summary["lm_head"] to `report`."""
    from compress.passes.quantize import _relative_error  # the decoder's error measure (imports this module)

    lm = llama.as_causal_lm(model)
    lin, spec = lm.lm_head, head_spec(cfg)
    causal: Any = model  # a transformers causal LM: its input embeddings and config
    tied = lin.weight is causal.get_input_embeddings().weight
    W = lin.weight.data  # (vocab, hidden)
    xtx = None if stats is None else stats.xtx
    check_finite(LM_HEAD, W, xtx)
    if xtx is None or stats is None:
        codes, scale, zero = rtn(W, spec)
        g = W.shape[1] if spec.group_size == -1 else spec.group_size
        q = Quantized(codes, scale, zero, (torch.arange(W.shape[1]) // g).to(torch.int32))
    else:
        q = gptq_quantize(W.to(ctx.device), (2.0 / stats.n * xtx).to(ctx.device), spec)
    Wq = q.dequantize().to(device=W.device, dtype=W.dtype)
    err = _relative_error(W, Wq, xtx)
    lin.weight = nn.Parameter(Wq, requires_grad=lin.weight.requires_grad)  # its own tensor: the embeddings stay
    if tied:
        causal.config.tie_word_embeddings = False  # export writes the config as the model has it
    ctx.plan.quantize(LM_HEAD, quant_record(q, spec, (W.shape[0], W.shape[1])))
    notes = [*q.notes, *([q.fallback] if q.fallback else [])]
    if q.fallback:
        report.fallbacks.append(f"{LM_HEAD}: {q.fallback}")
    if tied:
        notes.append("untied from the embeddings (they stay unquantized)")
    report.rows.append({"layer": LM_HEAD, "bits": spec.bits, "modules": 1, "rel err mean": round(err, 6),
                        "rel err max": round(err, 6), "notes": "; ".join(notes)})
    report.summary["lm_head"] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                                 "method": "gptq" if xtx is not None else "rtn", "rel_err": round(err, 6),
                                 "untied": tied}
