"""The one block-by-block engine: capture block-0 inputs once, run each block, collect per-linear input statistics,
and hand the block's outputs on as the next block's inputs. Only one block's inputs and outputs are held at a time,
so peak memory does not grow with depth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class LinearStats:
    """Running statistics of a linear layer's inputs over calibration tokens (float64 sums)."""

    n: int = 0
    total: torch.Tensor | None = None  # (in,) sum of x
    total_sq: torch.Tensor | None = None  # (in,) sum of x^2
    xtx: torch.Tensor | None = None  # (in, in) sum of x x^T in float32, only when asked for
    want_xtx: bool = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
            if self.want_xtx:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        if self.want_xtx:  # float32 matmul: fast, and its rounding is far below the damping GPTQ adds
            x32 = x.float()
            self.xtx += x32.T @ x32

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def var(self) -> torch.Tensor:
        """Sample variance per input channel (the FLAP 'fluctuation')."""
        return ((self.total_sq - self.n * self.mean**2) / max(self.n - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of each input channel over all tokens."""
        return self.total_sq


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Block-0 inputs per batch: hidden states (B, T, H) and the keyword arguments the model passed."""

    hidden: list[torch.Tensor]
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model up to the first block for each batch of `input_ids` (N, T) and keep what the block receives."""
    captured = BlockInputs(hidden=[])

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output hidden states for each captured batch."""
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = block(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


Watch = Callable[[int, nn.Module], dict[str, nn.Linear]]
Visit = Callable[[int, nn.Module, list[torch.Tensor], list[torch.Tensor], dict[str, LinearStats]], bool | None]


@torch.no_grad()
def for_each_block(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    visit: Visit,
    watch: Watch | None = None,
    *,
    batch_size: int = 8,
    want_xtx: bool = False,
    desc: str = "blocks",
) -> None:
    """For each block i: collect input stats of the linears `watch(i, block)` names while running the block, then call
    `visit(i, block, inputs, outputs, stats)`. If visit returns True it changed the block, and the block is run again
    so the next block sees the changed outputs (sequential calibration); otherwise the outputs are passed on."""
    inputs = capture_block_inputs(model, layers, input_ids, batch_size)
    for i in tqdm(range(len(layers)), desc=desc, unit="block"):
        block = layers[i]
        watched = watch(i, block) if watch else {}
        stats = {name: LinearStats(want_xtx=want_xtx) for name in watched}
        handles = [
            lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
            for name, lin in watched.items()
        ]
        try:
            outputs = run_block(block, inputs)
        finally:
            for h in handles:
                h.remove()
        changed = visit(i, block, inputs.hidden, outputs, stats)
        if changed:
            outputs = run_block(block, inputs)
        inputs = BlockInputs(hidden=outputs, kwargs=inputs.kwargs)
