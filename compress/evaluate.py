"""Perplexity on held-out windows, generation speed, and parameter counts (forward speed: benchmarks/speed.py)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

PPL_PROTOCOL = "non-overlapping windows of seq_len from the start of the text; mean token NLL over all predicted tokens"


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every window (N, T); each window is scored on its own (no context carried)."""
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def generation_tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Greedy generation speed at batch 1 (new tokens / second), after a short warm-up."""
    kwargs = dict(do_sample=False, pad_token_id=pad_token_id(model))
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0)


def pad_token_id(model: nn.Module) -> int:
    """The id generation pads with: the pad id of the generation config or the config, else their first end-of-text
    id (Llama-3.x-Instruct configs give several as a list and no pad), else 0."""
    configs = [c for c in (getattr(model, "generation_config", None), model.config) if c is not None]
    for key in ("pad_token_id", "eos_token_id"):
        for config in configs:
            value = getattr(config, key, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class TailKL:
    """KL divergence of the model's next-token distribution to the dense model's on fixed windows, when only blocks
    from `start` on have changed: the dense inputs of every block are cached once, so scoring a change to block i
    runs blocks i.. and the head only. Measures the mean per-token KL(dense || current), in nats.

    `any_start=False` keeps only the first block's inputs (scores with `kl_from(0)` only): a whole-model search needs
    no more, and the cache is then one hidden-state copy instead of one per block.

    The head and the KL run on `chunk_tokens` positions at a time, so the vocabulary-wide temporaries (logits,
    log-probabilities, the KL terms) are a few times chunk x vocab floats, not batch x seq_len x vocab: with a 32k
    vocabulary, 8 windows of 2048 tokens would otherwise need about 2 GB per temporary. The reference
    log-probabilities of every position are kept (tokens x vocab floats)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, any_start: bool = True,
                 chunk_tokens: int = 128):
        from calibration.capture import capture_block_inputs, run_block
        from compress.models import llama

        self.model, self.layers = model, llama.blocks(model)
        first = capture_block_inputs(model, self.layers, windows, batch_size)
        self.kwargs = first.kwargs  # kwargs[i][b]: block i's own keyword arguments (its layer type's mask)
        self.inputs = [first.hidden]  # inputs[i]: what block i receives (dense), per batch
        hidden = first.hidden
        for block, kwargs in zip(self.layers, self.kwargs):
            hidden = run_block(block, hidden, kwargs)
            if any_start:
                self.inputs.append(hidden)
        self.chunk = chunk_tokens
        self.ref = []  # per batch: (positions, vocab) reference log-probabilities, filled chunk by chunk in place
        for h in hidden:
            ref = torch.empty(h.shape[0] * h.shape[1], self.model.lm_head.out_features)
            for c, r in zip(self._chunks(h), ref.split(self.chunk)):
                r.copy_(F.log_softmax(self._head(c), -1))
            self.ref.append(ref)
        self.tokens = int(windows.numel())

    def _chunks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return hidden.reshape(-1, hidden.shape[-1]).split(self.chunk)  # (positions, hidden) in chunks

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).float()

    @torch.no_grad()
    def kl_from(self, start: int) -> float:
        """Mean per-token KL after running blocks start.. on the cached dense inputs of block `start`."""
        from calibration.capture import run_block

        if start >= len(self.inputs):
            raise ValueError(f"kl_from({start}): this TailKL keeps only the first block's inputs (any_start=False)")
        hidden = self.inputs[start]
        for block, kwargs in zip(self.layers[start:], self.kwargs[start:]):
            hidden = run_block(block, hidden, kwargs)
        total = 0.0
        for h, ref in zip(hidden, self.ref):
            for c, r in zip(self._chunks(h), ref.split(self.chunk)):
                logp = F.log_softmax(self._head(c), -1)
                total += float(F.kl_div(logp, r, reduction="sum", log_target=True))  # sum p_ref (log p_ref - log p)
        return total / self.tokens
