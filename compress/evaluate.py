"""Perplexity on held-out windows, generation speed, and parameter counts (forward speed: benchmarks/speed.py)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from compress.progress import tqdm

if TYPE_CHECKING:
    from transformers import GenerationMixin

PPL_PROTOCOL = "non-overlapping windows of seq_len from the start of the text; mean token NLL over all predicted tokens"


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over every window (N, T); each window is scored on its own (no context carried).
    Computed where the model is (its first parameter's device). `desc`: a progress bar over the windows."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    bar = tqdm(total=windows.shape[0], desc=desc, unit="window", disable=desc is None, leave=False)
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
        bar.update(ids.shape[0])
    bar.close()
    return math.exp(nll / count)


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer, prompts: list[str], new_tokens: int,
                         desc: str | None = None) -> list[str]:
    """The greedy continuation (exactly `new_tokens` tokens, decoded, special tokens kept out) of each prompt, one
    prompt at a time (no padding), computed where the model is; `desc` names a progress bar over the new tokens
    (none without it)."""
    from transformers.generation.streamers import BaseStreamer

    class TokenBar(BaseStreamer):  # generate() hands a streamer the prompt first, then each new token
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                bar.update(1)
            self.prompt_seen = True

        def end(self) -> None:
            self.prompt_seen = False

    generate = cast("GenerationMixin", model).generate  # a transformers causal LM
    device = next(model.parameters()).device
    out = []
    with tqdm(total=len(prompts) * new_tokens, desc=desc, unit="token", disable=desc is None, leave=False) as bar:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
            tokens = generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_token_id(model), streamer=TokenBar())
            out.append(tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@torch.no_grad()
def generation_tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Greedy generation speed at batch 1 (new tokens / second), after a short warm-up."""
    generate = cast("GenerationMixin", model).generate  # a transformers causal LM
    kwargs = dict(do_sample=False, pad_token_id=pad_token_id(model))
    generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
    t0 = time.perf_counter()
    out = generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
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

