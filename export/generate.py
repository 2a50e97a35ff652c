"""Text generation from a loaded artifact through transformers' `generate` (KV cache, greedy unless sampling is asked
for), timed: tokens per second and the latency of the first new token."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn


@dataclass(frozen=True)
class Generation:
    text: str  # the new tokens, decoded (special tokens skipped)
    token_ids: list[int]  # the new tokens
    prompt_tokens: int
    seconds: float  # the whole generate call: prefill and every new token
    first_token_seconds: float  # from the call to the first new token (prefill + one step)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _FirstToken:
    """A transformers streamer that notes when the first new token arrives (generate's first `put` is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, float("nan")

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> torch.Tensor:
    """(1, T) token ids of `prompt`, wrapped in the tokenizer's chat template as one user turn when `chat`;
    ValueError when `chat` and the tokenizer has no template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
        return torch.tensor([list(ids)], dtype=torch.long)
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int, pad_token_id: int,
             **sampling: Any) -> Generation:
    """Continue `ids` (1, T) by up to `max_new_tokens` tokens with model.generate (stops early at end of text);
    `sampling` is passed through under transformers' names (do_sample, temperature, top_k, top_p; greedy when
    do_sample is not set)."""
    streamer = _FirstToken()
    run = cast(Any, model).generate
    t0 = time.perf_counter()
    out = run(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
              streamer=streamer, **{"do_sample": False, **sampling})  # (1, T + new)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, int(ids.shape[1]), seconds,
                      streamer.at - t0)
