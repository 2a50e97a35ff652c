"""Whole-model scores for searches: the KL of the compressed model's next-token distribution to the dense one, and
the batch fitness a search calls (assemble each candidate from the supernet, score it, one call per batch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from compress.device import CPU, on_device, to_device
from compress.search.base import Fitness, Unit
from compress.search.executor import Executor, LocalExecutor
from compress.search.supernet import Assembler


class TailKL:
    """KL divergence of the model's next-token distribution to the dense model's on fixed windows, when only blocks
    from `start` on have changed: the dense inputs of every block are cached once, so scoring a change to block i
    runs blocks i.. and the head only. Measures the mean per-token KL(dense || current), in nats.

    `any_start=False` keeps only the first block's inputs (scores with `kl_from(0)` only): a whole-model search needs
    no more, and the cache is then one hidden-state copy instead of one per block.

    The head and the KL run on `chunk_tokens` positions at a time, so the vocabulary-wide temporaries (logits,
    log-probabilities, the KL terms) are a few times chunk x vocab floats, not batch x seq_len x vocab: with a 32k
    vocabulary, 8 windows of 2048 tokens would otherwise need about 2 GB per temporary. The reference
    log-probabilities of every position are kept (tokens x vocab floats).

    device: where the blocks and the head compute (compress.device); the cached hidden states and reference
    log-probabilities live there, and each block is moved there for its turn and back (the model stays on the CPU)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, any_start: bool = True,
                 chunk_tokens: int = 128, device: torch.device = CPU):
        from calibration.capture import capture_block_inputs
        from compress.models import llama

        self.model, self.layers, self.device = llama.as_causal_lm(model), llama.blocks(model), device
        first = capture_block_inputs(model, self.layers, windows, batch_size)
        self.kwargs = to_device(first.kwargs, device)  # kwargs[i][b]: block i's own keyword arguments (its mask)
        self.inputs = [to_device(first.hidden, device)]  # inputs[i]: what block i receives (dense), per batch
        hidden = self.inputs[0]
        for i in range(len(self.layers)):
            hidden = self._run(i, hidden)
            if any_start:
                self.inputs.append(hidden)
        self.chunk = chunk_tokens
        self.ref = []  # per batch: (positions, vocab) reference log-probabilities, filled chunk by chunk in place
        with self._head_on_device():
            for h in hidden:
                ref = torch.empty(h.shape[0] * h.shape[1], self.model.lm_head.out_features, device=h.device)
                for c, r in zip(self._chunks(h), ref.split(self.chunk), strict=True):
                    r.copy_(F.log_softmax(self._head(c), -1))
                self.ref.append(ref)
        self.tokens = int(windows.numel())

    def _run(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block i on the device, on `hidden` (per batch)."""
        from calibration.capture import run_block

        with on_device(self.layers[i], self.device) as block:
            return run_block(block, hidden, self.kwargs[i])

    @contextmanager
    def _head_on_device(self) -> Iterator[None]:
        with on_device(self.model.model.norm, self.device), on_device(self.model.lm_head, self.device):
            yield

    def _chunks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return hidden.reshape(-1, hidden.shape[-1]).split(self.chunk)  # (positions, hidden) in chunks

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden)).float()

    @torch.no_grad()
    def kl_from(self, start: int) -> float:
        """Mean per-token KL after running blocks start.. on the cached dense inputs of block `start`."""
        if start >= len(self.inputs):
            raise ValueError(f"kl_from({start}): this TailKL keeps only the first block's inputs (any_start=False)")
        hidden = self.inputs[start]
        for i in range(start, len(self.layers)):
            hidden = self._run(i, hidden)
        total = 0.0
        with self._head_on_device():
            for h, ref in zip(hidden, self.ref, strict=True):
                for c, r in zip(self._chunks(h), ref.split(self.chunk), strict=True):
                    logp = F.log_softmax(self._head(c), -1)
                    total += float(F.kl_div(logp, r, reduction="sum", log_target=True))  # sum p_ref (log p_ref - log p)
        return total / self.tokens


class StagedKL:
    """The whole-model KL at each stage of a staged search: stage s scores the first `stage_windows[s]` windows.
    Built on the dense model (it caches the dense reference), then scores the model as it is when called."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, stage_windows: list[int], batch_size: int,
                 device: torch.device = CPU):
        self.stages = [TailKL(model, windows[:n], batch_size=batch_size, any_start=False, device=device)
                       for n in stage_windows]

    def __call__(self, stage: int) -> float:
        """Mean per-token KL (nats) of the current model to the dense one on stage `stage`'s windows."""
        return self.stages[stage].kl_from(0)


def supernet_fitness(units: list[Unit], assembler: Assembler, score: Callable[[int], float],
                     executor: Executor | None = None) -> Fitness:
    """The search's fitness: each candidate (unit -> option index) is assembled from the supernet and scored by
    `score(stage)`; a batch goes through `executor` (in order, in this process by default)."""
    executor = executor or LocalExecutor()

    def one(choice: dict[str, int], stage: int) -> float:
        assembler.assemble({u.name: u.options[choice[u.name]].level for u in units})
        return score(stage)

    def fitness(candidates: list[dict[str, int]], stage: int) -> list[float]:
        return executor.map(lambda choice: one(choice, stage), candidates)

    return fitness
