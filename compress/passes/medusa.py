"""Medusa drafter heads (`pass: medusa`, role draft; Cai et al., 2024): K residual heads on the final hidden state
over the model's own lm_head, trained by self-distillation against the model being exported (the last pass's): the
model's final hidden states and top-k next-token distributions are computed once on the calibration windows (and,
optionally, on continuations it generates itself), then only the heads train; the backbone and lm_head are frozen
and left bit for bit as they were. The heads go into the plan (`plan.heads`), which export writes beside the model
and as a vLLM Medusa drafter folder."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calibration.teacher import TeacherTargets
from compress.device import CPU, on_device
from compress.errors import CompressError, InputError
from compress.models import llama
from compress.ops.distill import top_k_targets
from compress.ops.medusa import head_hits, head_kl, teacher_rows, untrained_hits
from compress.passes.base import Earlier, PassContext
from compress.plan import DrafterHeads
from compress.progress import tqdm
from compress.recipe import MedusaConfig, MedusaTrainConfig
from compress.report import PassReport
from export.medusa import MedusaHeads

LAST_STEPS = 10  # the training loss reported per head is the mean of the last this many steps


@dataclass
class SelfDistillation:
    """What the heads learn from, computed once: the model's final hidden states (N, T, H) float32 (after the last
    norm, what lm_head reads) and its top-k next-token distributions on the windows (N, T), on the CPU
    (N * T * (4 H + 8 k) bytes)."""

    hidden: torch.Tensor
    teacher: TeacherTargets


@torch.no_grad()
def self_distillation(model: nn.Module, windows: torch.Tensor, top_k: int, batch_size: int,
                      device: torch.device = CPU) -> SelfDistillation:
    """One forward of the model over the windows (N, T), batch by batch on `device` (the full (B, T, V) logits of
    one batch at a time): its final hidden states and top-k distributions, stored on the CPU."""
    lm = llama.as_causal_lm(model)
    backbone = model.get_submodule("model")
    n, t = windows.shape
    hidden = torch.empty(n, t, lm.config.hidden_size)
    logp = torch.empty(n, t, top_k)
    ids = torch.empty(n, t, top_k, dtype=torch.int32)
    for start in tqdm(range(0, n, batch_size), desc="medusa: the model's hidden states and distributions",
                      unit="batch", leave=False):
        stop = min(start + batch_size, n)
        h = backbone(input_ids=windows[start:stop].to(device), use_cache=False).last_hidden_state  # (B, T, H)
        values, top = top_k_targets(lm.lm_head(h), top_k)
        hidden[start:stop], logp[start:stop], ids[start:stop] = h.float().cpu(), values.cpu(), top.cpu()
    return SelfDistillation(hidden, TeacherTargets(windows, logp, ids))


@torch.no_grad()
def continuations(model: nn.Module, prompts: torch.Tensor, length: int, batch_size: int,
                  device: torch.device = CPU) -> torch.Tensor:
    """(B, p) prompts -> (B, length) the prompts continued greedily by the model (KV cache), exactly `length` tokens
    (end-of-sequence is not allowed to stop a continuation early)."""
    config = llama.as_causal_lm(model).config
    pad = getattr(config, "pad_token_id", None)
    pad = getattr(config, "eos_token_id", 0) if pad is None else pad
    new = length - prompts.shape[1]
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="medusa: self-generated continuations", unit="batch",
                      leave=False):
        batch = prompts[start:start + batch_size].to(device)
        out.append(model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new,  # type: ignore[operator]
                                  min_new_tokens=new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=pad).cpu())
    return torch.cat(out)


def positions(first: int, count: int, seq_len: int, num_heads: int) -> torch.Tensor:
    """Flat positions n * T + t of windows first .. first + count - 1 at which every head has a target
    (t < T - K): (count * (T - K),) int64."""
    t = torch.arange(seq_len - num_heads)
    return ((torch.arange(first, first + count) * seq_len)[:, None] + t).flatten()


def _head_logits(heads: MedusaHeads, lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(P, H) hidden states -> (P, K, V) logits of every head through the frozen lm_head weight (V, H)."""
    return F.linear(heads.hidden(hidden), lm_head)


@dataclass
class TrainLog:
    """Per step, the KL of each head (nats) and the weighted total; seconds."""

    head_losses: list[list[float]]
    losses: list[float]
    seconds: float


def train_heads(heads: MedusaHeads, lm_head: torch.Tensor, data: SelfDistillation, train_at: torch.Tensor,
                cfg: MedusaTrainConfig, seed: int) -> TrainLog:
    """AdamW on the heads' parameters only, `cfg.steps` batches of `cfg.batch_size` positions drawn (seeded, without
    replacement per epoch) from the flat positions `train_at`, loss sum_k decay**k KL_k; computes where the heads
    and lm_head (V, H) are. Raises CompressError when the loss is not finite."""
    t0 = time.perf_counter()
    device = lm_head.device
    k_heads = heads.num_heads
    hidden = data.hidden.flatten(0, 1)  # (N * T, H)
    logp, ids = data.teacher.logp.flatten(0, 1), data.teacher.ids.flatten(0, 1)  # (N * T, k)
    weight = cfg.decay ** torch.arange(k_heads, dtype=torch.float32, device=device)  # (K,)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1)))))
    generator = torch.Generator().manual_seed(seed)
    batch = min(cfg.batch_size, len(train_at))
    order = torch.empty(0, dtype=torch.int64)
    log = TrainLog([], [], 0.0)
    bar = tqdm(range(cfg.steps), desc="medusa: training the heads", unit="step", leave=False)
    for _ in bar:
        if len(order) < batch:
            order = torch.cat([order, train_at[torch.randperm(len(train_at), generator=generator)]])
        picked, order = order[:batch], order[batch:]  # (P,)
        rows = teacher_rows(picked, k_heads)  # (P, K)
        logits = _head_logits(heads, lm_head, hidden[picked].to(device))  # (P, K, V)
        kl = head_kl(logits, logp[rows].to(device), ids[rows].to(device))  # (K,)
        loss = (weight * kl).sum()
        if not torch.isfinite(loss):
            raise CompressError(f"medusa: the training loss is {loss.item()} at step {len(log.losses)}; stopping "
                                "(lower train.lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.head_losses.append([round(v, 6) for v in kl.tolist()])
        log.losses.append(round(loss.item(), 6))
        bar.set_postfix(kl=f"{loss.item():.4f}")
    log.seconds = time.perf_counter() - t0
    return log


@torch.no_grad()
def evaluate_heads(heads: MedusaHeads, lm_head: torch.Tensor, data: SelfDistillation, at: torch.Tensor,
                   chunk: int) -> tuple[list[float], list[float]]:
    """(KL per head in nats, top-1 accuracy per head against the model's own choice) over the flat positions `at`,
    `chunk` positions at a time."""
    k_heads = heads.num_heads
    hidden = data.hidden.flatten(0, 1)
    logp, ids = data.teacher.logp.flatten(0, 1), data.teacher.ids.flatten(0, 1)
    kl_sum, hits = torch.zeros(k_heads), torch.zeros(k_heads, dtype=torch.int64)
    for start in range(0, len(at), chunk):
        picked = at[start:start + chunk]
        rows = teacher_rows(picked, k_heads)
        logits = _head_logits(heads, lm_head, hidden[picked].to(lm_head.device))
        kl_sum += head_kl(logits, logp[rows].to(lm_head.device), ids[rows].to(lm_head.device)).cpu() * len(picked)
        hits += head_hits(logits, ids[rows][..., 0])
    return (kl_sum / len(at)).tolist(), (hits.double() / len(at)).tolist()


class MedusaPass:
    def __init__(self, config: MedusaConfig):
        self.config = config

    def check(self, model: nn.Module, earlier: Earlier, where: str) -> None:
        """The model's lm_head is a plain linear the heads can share (a quantized or wrapped one is refused)."""
        if type(llama.as_causal_lm(model).lm_head) is not nn.Linear:
            raise InputError(f"{where}: the heads share the model's lm_head, which is a "
                             f"{type(llama.as_causal_lm(model).lm_head).__name__}, not a plain linear layer")

    def run(self, model: nn.Module, ctx: PassContext) -> PassReport:
        t0 = time.perf_counter()
        cfg, where = self.config, f"passes.{ctx.index}"
        k_heads, n, seq_len = cfg.num_heads, *ctx.calibration.shape
        n_train = n - cfg.held_out
        if n_train < 1 or seq_len <= k_heads + 1:
            raise InputError(f"{where}.held_out: {cfg.held_out} held-out windows of {n} calibration windows of "
                             f"{seq_len} tokens leave none to train {k_heads} heads on")
        windows, gen = ctx.calibration, cfg.generate
        with on_device(model, ctx.device):
            groups = {"train": windows[:n_train], "held_out": windows[n_train:]}
            if gen is not None:
                prompts = torch.cat([windows[:gen.windows], windows[n_train:]])[:, :gen.prompt_tokens]
                made = continuations(model, prompts, seq_len, ctx.batch_size, ctx.device)
                groups |= {"generated": made[:gen.windows], "held_out_generated": made[gen.windows:]}
            data = self_distillation(model, torch.cat(list(groups.values())), cfg.train.top_k, ctx.batch_size,
                                     ctx.device)
        at, start = {}, 0  # each group's flat positions in data's rows
        for name, group in groups.items():
            at[name], start = positions(start, len(group), seq_len, k_heads), start + len(group)
        train_at = torch.cat([at["train"], *([at["generated"]] if gen is not None else [])])

        lm_head = llama.as_causal_lm(model).lm_head.weight.detach().float().to(ctx.device)  # (V, H), frozen
        heads = MedusaHeads(data.hidden.shape[-1], k_heads, cfg.num_layers).to(ctx.device)
        log = train_heads(heads, lm_head, data, train_at, cfg.train, ctx.seed)
        heads.requires_grad_(False)
        chunk = cfg.train.batch_size
        kl, top1 = evaluate_heads(heads, lm_head, data, at["held_out"], chunk)
        untrained = (untrained_hits(data.teacher.ids[..., 0].flatten(), at["held_out"], k_heads).double()
                     / len(at["held_out"])).tolist()
        generated = evaluate_heads(heads, lm_head, data, at["held_out_generated"], chunk)[1] if gen else None
        ctx.plan.heads = DrafterHeads({k: v.detach().float().cpu().clone() for k, v in heads.state_dict().items()},
                                      k_heads, cfg.num_layers)

        report = PassReport(name="medusa")
        last = min(LAST_STEPS, len(log.head_losses))
        for h in range(k_heads):
            row = {"head": h + 1, "guesses": f"t+{h + 2}",
                   "train_kl_first": log.head_losses[0][h] if log.head_losses else math.nan,
                   "train_kl_last": round(sum(s[h] for s in log.head_losses[-last:]) / last, 4) if last else math.nan,
                   "heldout_kl": round(kl[h], 4), "heldout_top1": round(top1[h], 4),
                   "top1_untrained": round(untrained[h], 4)}
            if generated is not None:
                row["heldout_top1_generated"] = round(generated[h], 4)
            report.rows.append(row)
        report.summary = {
            "num_heads": k_heads, "num_layers": cfg.num_layers,
            "parameters": sum(p.numel() for p in heads.parameters()), "steps": cfg.train.steps,
            "train_windows": n_train, "generated_windows": 0 if gen is None else gen.windows,
            "heldout_windows": cfg.held_out, "train_positions": len(train_at), "heldout_positions": len(at["held_out"]),
            "heldout_top1": [round(a, 4) for a in top1],
            **({"heldout_top1_generated": [round(a, 4) for a in generated]} if generated is not None else {}),
            "train_seconds": round(log.seconds, 1), "losses": log.losses}
        report.seconds = time.perf_counter() - t0
        return report
