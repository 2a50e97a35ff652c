"""The dense model's next-token distributions over calibration windows, computed once before any pass changes the
model and kept as their top k entries (memory N * T * k * 8 bytes: 512 windows of 128 tokens at k = 64 is 34 MB),
for the passes that train against them (low-rank corrections, drafter heads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.device import CPU, on_device
from compress.ops.distill import top_k_targets
from compress.progress import tqdm


@dataclass
class TeacherTargets:
    """Top-k next-token log-probabilities (N, T, k) float32 and token ids (N, T, k) int32 of the windows (N, T)."""

    windows: torch.Tensor
    logp: torch.Tensor
    ids: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.logp.shape[-1]

    def __len__(self) -> int:
        return self.windows.shape[0]


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: torch.Tensor, top_k: int, batch_size: int,
                    device: torch.device = CPU) -> TeacherTargets:
    """The model's top-k next-token distributions at every position of every window (N, T), computed on `device`
    batch by batch (the full (B, T, V) logits of one batch at a time), stored on the CPU."""
    n, t = windows.shape
    logp = torch.empty(n, t, top_k, dtype=torch.float32)
    ids = torch.empty(n, t, top_k, dtype=torch.int32)
    with on_device(model, device):
        for start in tqdm(range(0, n, batch_size), desc="teacher: dense next-token distributions", unit="batch",
                          leave=False):
            batch = windows[start : start + batch_size].to(device)
            values, top = top_k_targets(model(input_ids=batch, use_cache=False).logits, top_k)
            logp[start : start + batch.shape[0]] = values.cpu()
            ids[start : start + batch.shape[0]] = top.cpu()
    return TeacherTargets(windows, logp, ids)
