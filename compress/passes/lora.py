"""Low-rank correction (role correct): every targeted linear gets y += (x A^T) B^T, fitted to what quantization lost
(LoRC's SVD or EoRA's activation-aware SVD of W - Q(W)), then A and B of the whole model trained so that its
next-token distributions match the dense model's (INT2.1, RILQ); after pruning alone the trained product is merged
into the kept weights (healing), so the artifact stays a plain pruned model."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from calibration.teacher import TeacherTargets
from compress.device import on_device
from compress.errors import CompressError, InputError
from compress.ops.distill import top_k_kl
from compress.passes.base import Earlier, PassContext
from compress.passes.targets import select_modules
from compress.progress import tqdm
from compress.recipe import HELD_IN_WINDOWS, LoraConfig, RankBudget, TrainConfig, _QuantBase
from compress.report import PassReport
from export.lowrank import adapters, unwrap, wrap

ADAPTER_BITS = 16  # A and B are stored in 16 bits (bf16 / fp16) and counted so

@dataclass
class TrainLog:
    """What training did: the loss of every step (nats), the held-in KL before and after on the first training
    windows, and the seconds it took."""

    losses: list[float] = field(default_factory=list)
    kl_before: float = math.nan
    kl_after: float = math.nan
    seconds: float = 0.0


@torch.no_grad()
def held_in_kl(model: nn.Module, teacher: TeacherTargets, windows: int, batch_size: int) -> float:
    """Mean KL (nats per position) of the model from the teacher on its first `windows` windows, where the model is."""
    device = next(model.parameters()).device
    total, n = 0.0, min(windows, len(teacher))
    for start in tqdm(range(0, n, batch_size), desc=f"lora: held-in KL ({n} windows)", unit="batch", leave=False):
        stop = min(start + batch_size, n)
        logits = model(input_ids=teacher.windows[start:stop].to(device), use_cache=False).logits
        total += top_k_kl(logits, teacher.logp[start:stop].to(device), teacher.ids[start:stop].to(device)).item() * (
            stop - start)
    return total / n


def train_adapters(model: nn.Module, teacher: TeacherTargets, cfg: TrainConfig, seed: int) -> TrainLog:
    """AdamW on every LoRALinear's A and B (everything else frozen for the duration), `cfg.steps` batches of windows
    drawn without replacement per epoch from the first `cfg.windows_used` of the teacher's, KL to the teacher's top-k
    distributions; seeded, so deterministic on the CPU. Computes where the model is."""
    log = TrainLog()
    t0 = time.perf_counter()
    params = [p for m in adapters(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    frozen = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    n = cfg.windows_used(len(teacher))
    batch = min(cfg.batch_size, n)
    log.kl_before = held_in_kl(model, teacher, min(HELD_IN_WINDOWS, n), batch)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        for frozen_param in model.parameters():
            frozen_param.requires_grad_(False)
        for trained in params:
            trained.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        warmup = max(1, cfg.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
            1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1)))))
        bar = tqdm(range(cfg.steps), desc="lora: training A and B", unit="step", leave=False)
        for _ in bar:
            if len(order) < batch:
                order += torch.randperm(n, generator=generator).tolist()
            picked, order = order[:batch], order[batch:]
            ids = teacher.windows[picked].to(device)
            logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            loss = top_k_kl(logits, teacher.logp[picked].to(device), teacher.ids[picked].to(device))
            if not torch.isfinite(loss):
                raise CompressError(f"lora: the training loss is {loss.item()} at step {len(log.losses)}; stopping "
                                    "(lower train.lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            log.losses.append(round(loss.item(), 6))
            bar.set_postfix(kl=f"{loss.item():.4f}")
    finally:
        for param, flag in frozen.items():
            param.requires_grad_(flag)
        for trained in params:
            trained.requires_grad_(False)
    log.kl_after = held_in_kl(model, teacher, min(HELD_IN_WINDOWS, n), batch) if cfg.steps else log.kl_before
    log.seconds = time.perf_counter() - t0
    return log


def _zero_init(out_features: int, in_features: int, rank: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's start (Hu et al., 2021, as PEFT does it): A uniform in +-1/sqrt(in) (Kaiming, a = sqrt(5)), B = 0, so
    the product starts at 0 and B moves first."""
    bound = 1.0 / math.sqrt(in_features)
    A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return A, torch.zeros(out_features, rank)


class LoraPass:
    def __init__(self, config: LoraConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """Targets match; the rank fits every target's dense shape; a fitted init needs a quantization before it."""
        cfg = self.config
        quantized = [(p, w) for p, w in earlier if p.role == "quantize"]
        if cfg.init != "zero" and not quantized:
            raise InputError(f"{where}.init: {cfg.init} fits the error of a quantization, and no quantization pass "
                             "comes before it; use init: zero to heal what pruning lost")
        for p, w in quantized:
            bits = getattr(p, "bits", None)
            if cfg.init == "eora" and (p.pass_ != "gptq" or getattr(bits, "allocator", "rank") != "rank"):
                raise InputError(f"{where}.init: eora needs the inputs' X^T X that {w} ({p.pass_}, searched or "
                                 "round-to-nearest) does not keep; use init: svd")
        modules = select_modules(model, cfg.targets, cfg.ignore, where)
        self._check_rank(modules, where)
        if isinstance(cfg.rank, RankBudget):
            if cfg.init == "zero":
                raise InputError(f"{where}.rank: a rank budget ranks the fitted corrections of quantized modules, and "
                                 "init zero fits none; use init svd or eora, or one rank")
            quantizers = [(cast(_QuantBase, p), w) for p, w in quantized]
            covered = set().union(*(select_modules(model, p.targets, p.ignore, w) for p, w in quantizers))
            if missing := [n for n in modules if n not in covered]:
                raise InputError(f"{where}.targets: a rank budget spreads adapter bits over quantized modules, and "
                                 f"{missing[0]} is not quantized ({len(missing)} such); ignore them or use one rank")

    def _check_rank(self, modules, where: str) -> None:
        if isinstance(self.config.rank, RankBudget):
            return  # each module's choices are cut to what fits it
        for name, (_, _, lin) in modules.items():
            if self.config.rank > min(lin.in_features, lin.out_features):
                raise InputError(f"{where}.rank: {self.config.rank} is larger than {name}'s smaller side "
                                 f"({lin.out_features} x {lin.in_features})")

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes.{ctx.index}"
        if ctx.teacher is None:
            raise CompressError(f"{where}: no teacher distributions were computed for this pass")
        modules = select_modules(model, cfg.targets, cfg.ignore, where)
        self._check_rank(modules, where)  # the widths pruning left
        generator = torch.Generator().manual_seed(ctx.seed)
        ranks = (self._searched_ranks(modules, ctx, where) if isinstance(cfg.rank, RankBudget)
                 else dict.fromkeys(modules, cfg.rank))
        A_by_name, B_by_name, inits = {}, {}, dict[str, str]()
        for name, (_, _, lin) in modules.items():
            if ranks[name] == 0:
                inits[name] = "none"
                continue
            original = self._original(ctx, name, where) if name in ctx.plan.quantized and cfg.init != "zero" else None
            if original is not None:
                A, B = _fitted(cfg.init, original.weight - lin.weight.detach(), original, ranks[name])
                inits[name] = cfg.init
            else:
                A, B = _zero_init(lin.out_features, lin.in_features, ranks[name], generator)
                inits[name] = "zero"
            A_by_name[name], B_by_name[name] = A.to(lin.weight.dtype), B.to(lin.weight.dtype)
        wrap(model, list(A_by_name), A_by_name, B_by_name)
        with on_device(model, ctx.device):
            log = train_adapters(model, ctx.teacher, cfg.train, ctx.seed)
        merged = self._finish(model, ctx, set(ctx.plan.quantized))
        report = PassReport(name="lora")
        report.rows = _rows(modules, inits, merged, ranks)
        rank = (cfg.rank if isinstance(cfg.rank, int) else
                {"bits_per_weight": cfg.rank.bits_per_weight,
                 "chosen": {str(r): n for r, n in sorted(Counter(ranks.values()).items())}})
        report.summary = {"rank": rank, "modules": len(modules), "merged": len(merged),
                          "adapter_parameters": sum(ranks[n] * (lin.in_features + lin.out_features)
                                                    for n, (_, _, lin) in modules.items() if n not in merged),
                          "steps": cfg.train.steps, "train_windows": cfg.train.windows_used(len(ctx.teacher)),
                          "held_in_kl_before": round(log.kl_before, 6), "held_in_kl_after": round(log.kl_after, 6),
                          "train_seconds": round(log.seconds, 1), "losses": log.losses}
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _original(ctx: PassContext, name: str, where: str):
        original = ctx.originals.get(name) if ctx.originals is not None else None
        if original is None:
            raise CompressError(f"{where}: the weights {name} had before quantization were not kept")
        return original

    def _searched_ranks(self, modules, ctx: PassContext, where: str) -> dict[str, int]:
        """Each module's rank from the knapsack over the rank budget: options cost rank x (in + out) x 16 bits and
        are worth the error the fitted correction of that rank leaves (error_by_rank)."""
        from compress.ops.lowrank import error_by_rank
        from compress.search.base import Option, Unit, check_budget
        from compress.search.knapsack import knapsack

        budget = self.config.rank
        assert isinstance(budget, RankBudget)
        units, weights = [], 0
        for name, (_, _, lin) in modules.items():
            if name not in ctx.plan.quantized:
                raise InputError(f"{where}.targets: {name} is not quantized; a rank budget spreads adapter bits over "
                                 "quantized modules")
            original = self._original(ctx, name, where)
            choices = sorted({r for r in budget.choices if r <= min(lin.in_features, lin.out_features)})
            if not choices:
                raise InputError(f"{where}.rank.choices: none fits {name} ({lin.out_features} x {lin.in_features})")
            E = (original.weight - lin.weight.detach()).float()
            errors = error_by_rank(E, choices, original.xtx if self.config.init == "eora" else None, original.n)
            units.append(Unit(name, tuple(Option(r, r * (lin.in_features + lin.out_features) * ADAPTER_BITS, e)
                                          for r, e in zip(choices, errors, strict=True))))
            weights += lin.in_features * lin.out_features
        bits = budget.bits_per_weight * weights
        try:
            check_budget(units, bits, f"{budget.bits_per_weight:g} bits per weight ({bits:,.0f} bits)")
        except ValueError as err:
            raise InputError(f"{where}.rank.bits_per_weight: {err}") from None
        return knapsack(units, bits).levels(units)

    def _finish(self, model: nn.Module, ctx: PassContext, quantized: set[str]) -> set[str]:
        """Merge B @ A into the weights of the modules that are not quantized (when `merge`), record the others'
        adapters in the plan, and put every base back in place; returns the merged modules' names."""
        merged = set()
        wrappers = adapters(model)
        with torch.no_grad():
            for name, wrapper in wrappers.items():
                if self.config.merge and name not in quantized:
                    base = wrapper.base
                    assert isinstance(base, nn.Linear)
                    base.weight.copy_(wrapper.merged())
                    merged.add(name)
        kept = unwrap(model)
        for name, (A, B) in kept.items():
            if name in merged:
                continue
            ctx.plan.correct(name, A.float(), B.float())
            wrap(model, [name], {name: A}, {name: B})
        return merged


def _fitted(init: str, E: torch.Tensor, original, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in), B (out, rank) fitted to the quantization error E = W - Q(W) (out, in) by compress.ops.lowrank."""
    from compress.ops import lowrank

    if init == "svd":
        return lowrank.svd_fit(E.float(), rank)
    return lowrank.eora_fit(E.float(), original.xtx, rank, original.n)


def _rows(modules, inits: dict[str, str], merged: set[str], ranks: dict[str, int]) -> list[dict]:
    """One row per layer: modules corrected, how they started, how many were merged into their weights, and each
    module's rank (q_proj's as q, ...)."""
    rows: dict[int, dict] = {}
    for name, (i, _, _) in modules.items():
        row = rows.setdefault(i, {"layer": i, "modules": 0, "init": inits[name], "merged": 0, "ranks": ""})
        row["modules"] += ranks[name] > 0
        row["merged"] += name in merged
        row["ranks"] = f"{row['ranks']} {name.rsplit('.', 1)[-1].removesuffix('_proj')}:{ranks[name]}".strip()
        if inits[name] not in row["init"].split("/"):
            row["init"] = f"{row['init']}/{inits[name]}"
    return [rows[i] for i in sorted(rows)]
