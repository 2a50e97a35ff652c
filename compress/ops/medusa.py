"""Medusa heads trained by self-distillation (Cai et al., 2024): the loss and the accuracy of K drafter heads against
the model's own next-token distributions.

Alignment. The model's distribution at row s of a window is over token s + 1. Head k (0-based) at position t guesses
token t + k + 2, so its teacher is the model's distribution at row t + k + 1; the model's own lm_head is "head -1"
(row t). Positions are given as flat indices n * T + t into (N * T)-row tensors, with t < T - K so that every head's
teacher row t + K stays inside the window."""

from __future__ import annotations

import torch

from compress.ops.distill import top_k_kl


def teacher_rows(positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(P,) flat positions -> (P, K) flat rows of each head's teacher distribution: position + 1 + k."""
    return positions[:, None] + 1 + torch.arange(num_heads, device=positions.device)  # (P, K)


def head_kl(head_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """(K,) mean KL in nats of each head's distribution from its teacher's top-k (compress.ops.distill.top_k_kl).
    head_logits (P, K, V); teacher_logp (P, K, k) float32, teacher_ids (P, K, k), as teacher_rows gathers them."""
    return torch.stack([top_k_kl(head_logits[:, h], teacher_logp[:, h], teacher_ids[:, h])
                        for h in range(head_logits.shape[1])])


def head_hits(head_logits: torch.Tensor, model_choice: torch.Tensor) -> torch.Tensor:
    """(K,) int64: positions where head k's top-1 token is the model's own top-1 at its offset. head_logits
    (P, K, V); model_choice (P, K) the model's argmax at each head's teacher row (its top-1 id)."""
    return (head_logits.argmax(-1) == model_choice.to(head_logits.device)).sum(0).cpu()


def untrained_hits(model_choice: torch.Tensor, positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(K,) int64: positions where the model's own next-token choice (row t) equals its choice at head k's row, i.e.
    how often a head that repeats the model's guess (a zero-initialized head) is right. model_choice: (N * T,) the
    model's top-1 at every row; positions (P,) flat."""
    return (model_choice[positions][:, None] == model_choice[teacher_rows(positions, num_heads)]).sum(0)
