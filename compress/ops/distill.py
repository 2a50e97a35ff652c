"""Distillation targets and loss: a teacher's next-token distributions kept as their top k entries, and the KL
divergence of a student's distributions from them (the loss of trained low-rank corrections and drafter heads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = 1e-12  # floor of a probability whose log is taken (the rest of the mass, rounded to 0 or below in float32)


def top_k_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each position: (log-probabilities under the full softmax (..., k) float32,
    token ids (..., k) int32), most likely first. logits: (..., V). Raises ValueError when k is not in 1..V."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k_targets: k = {k} is not between 1 and the vocabulary size {logits.shape[-1]}")
    logp = F.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return values, ids.to(torch.int32)


def top_k_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) in nats between the teacher's and the student's distributions coarsened to
    k + 1 outcomes: each of the teacher's top k tokens, and "any other token" (the rest of the mass). student_logits
    (..., V); teacher_logp, teacher_ids (..., k) as top_k_targets gives (log-probabilities under the full softmax).

    It is a lower bound of the full KL and equals it when the teacher's mass lies in its top k; unlike a KL to the
    top k renormalized, it does not reward a student for piling the tail's mass onto the top k."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids.long())  # (..., k)
    log_p = teacher_logp.float()
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)  # (...,)
    q_rest = (1 - log_q.exp().sum(-1)).clamp_min(TINY)
    top = (log_p.exp() * (log_p - log_q)).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(TINY).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (top + rest).mean()
