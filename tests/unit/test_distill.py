"""Top-k distillation targets and the coarsened KL (compress.ops.distill) against the full KL."""

from __future__ import annotations

import pytest
import torch

from compress.ops.distill import top_k_kl, top_k_targets


def full_kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    p, q = torch.log_softmax(teacher.double(), -1), torch.log_softmax(student.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, 50, generator=g) * 3
    return teacher, teacher + torch.randn(3, 5, 50, generator=g)


def test_targets_are_the_top_k_log_probabilities_in_order(logits):
    teacher, _ = logits
    logp, ids = top_k_targets(teacher, 7)
    assert logp.shape == ids.shape == (3, 5, 7) and ids.dtype == torch.int32
    full = torch.log_softmax(teacher, -1)
    assert torch.equal(logp, full.gather(-1, ids.long()))
    assert (logp[..., :-1] >= logp[..., 1:]).all()
    assert torch.equal(ids[..., 0].long(), teacher.argmax(-1))


def test_with_every_token_kept_it_is_the_full_kl(logits):
    teacher, student = logits
    logp, ids = top_k_targets(teacher, 50)
    assert top_k_kl(student, logp, ids).item() == pytest.approx(full_kl(teacher, student), rel=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_with_fewer_tokens_it_is_a_lower_bound_of_the_full_kl_and_not_negative(logits, k):
    teacher, student = logits
    logp, ids = top_k_targets(teacher, k)
    kl = top_k_kl(student, logp, ids).item()
    assert 0 <= kl <= full_kl(teacher, student) + 1e-6


def test_zero_for_the_teacher_itself_and_positive_when_the_tail_moves_to_the_top(logits):
    teacher, _ = logits
    logp, ids = top_k_targets(teacher, 5)
    assert top_k_kl(teacher, logp, ids).item() == pytest.approx(0, abs=1e-6)
    # all the mass moved onto the top k: the tail the teacher had is gone, which the coarsened KL sees
    sharpened = teacher.scatter(-1, ids.long(), 100.0)
    assert top_k_kl(sharpened, logp, ids).item() > 0.1


def test_k_outside_the_vocabulary_is_refused(logits):
    with pytest.raises(ValueError, match="k = 51 is not between 1 and the vocabulary size 50"):
        top_k_targets(logits[0], 51)
