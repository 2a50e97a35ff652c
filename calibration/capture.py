"""The one block-by-block engine: capture block-0 inputs and every block's own keyword arguments (its layer type's
attention mask) once, run each block, collect per-linear input statistics, and hand the block's outputs on as the next
block's inputs. Only one block's inputs and outputs are held at a time,
so peak memory does not grow with depth."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from compress import distributed
from compress.device import CPU, move, to_device
from compress.errors import CompressError, InputError
from compress.progress import tqdm


@dataclass
class LinearStats:
    """Running statistics of a linear layer's inputs over calibration tokens (float64 sums)."""

    n: int = 0
    total: torch.Tensor | None = None  # (in,) sum of x
    total_sq: torch.Tensor | None = None  # (in,) sum of x^2
    xtx: torch.Tensor | None = None  # (in, in) sum of x x^T in float32, only when asked for
    want_xtx: bool = False
    keep_parts: bool = False  # data-parallel: each batch's sums kept apart in `parts`, for `combined`
    parts: list[LinearStats] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        if self.keep_parts:
            self.parts.append(part := LinearStats(want_xtx=self.want_xtx))
            part.add(x)
            return
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
        if self.total is None or self.total_sq is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.total_sq = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        if self.want_xtx:  # float32 matmul: fast, and its rounding is far below the damping GPTQ adds
            if self.xtx is None:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            x32 = x.float()
            self.xtx += x32.T @ x32

    def combined(self, n_batches: int, what: str) -> LinearStats:
        """Data-parallel (compress.distributed): the sums over all ranks' batches, this rank's kept per batch in
        `parts`, added in one process's batch order, so bit for bit the sums one process makes, on every rank."""
        first = self.parts[0]
        sums = {key: [getattr(p, key) for p in self.parts] for key in ("total", "total_sq", "xtx")}
        out = LinearStats(n=distributed.sum_ints(sum(p.n for p in self.parts), what), want_xtx=self.want_xtx)
        out.total, out.total_sq, out.xtx = (
            None if getattr(first, key) is None
            else distributed.sum_in_batch_order(sums[key], n_batches, getattr(first, key), f"{what}: {key}")
            for key in ("total", "total_sq", "xtx"))
        return out

    def to_(self, device: torch.device) -> LinearStats:
        """Move the sums to `device` in place (what a pass keeps after the block it was collected on); returns self."""
        self.total, self.total_sq, self.xtx = (None if t is None else t.to(device)
                                               for t in (self.total, self.total_sq, self.xtx))
        return self

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of x, sum of x^2), both (in,); refused before any input was added."""
        if self.total is None or self.total_sq is None:
            raise ValueError("LinearStats: no inputs were added")
        return self.total, self.total_sq

    @property
    def mean(self) -> torch.Tensor:
        return self._sums()[0] / self.n

    @property
    def var(self) -> torch.Tensor:
        """Sample variance per input channel (the FLAP 'fluctuation')."""
        return ((self._sums()[1] - self.n * self.mean**2) / max(self.n - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of each input channel over all tokens."""
        return self._sums()[1]


STREAM_ATTR = "_compress_stream"  # a streamed skeleton model carries its Streamed source under this attribute


class Streamed(Protocol):
    """Where a streamed model's weights come from (compress.models.streaming.StreamedModel): the engine materializes
    the embeddings while it captures block 0's inputs, and each block for its turn (released after)."""

    def embedding(self) -> AbstractContextManager[None]: ...

    def block(self, i: int) -> AbstractContextManager[nn.Module]: ...


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What the blocks receive per batch: the current block's hidden states and every block's own keyword arguments
    (attention masks differ per layer type, full or sliding-window; layers of one type share the same tensors)."""

    hidden: list[torch.Tensor]  # per batch: (B, T, H)
    kwargs: list[list[dict]] = field(default_factory=list)  # kwargs[i][b]: what block i receives for batch b


@contextmanager
def _recording(layers: nn.ModuleList, captured: BlockInputs) -> Iterator[None]:
    """Replace each block's forward by a recorder of its keyword arguments (and block 0's hidden states) that passes
    the hidden states on unchanged and stops the forward at the last block, so no block is computed."""

    def recorder(i: int):
        def record(hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
            for key in ("past_key_values", "cache"):  # calibration keeps no cache
                kwargs.pop(key, None)
            captured.kwargs[i].append({**kwargs, "use_cache": False})
            if i == 0:
                captured.hidden.append(hidden_states.detach())
            if i == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return record

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (e.g. accelerate's) is kept
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int) -> BlockInputs:
    """For each batch of `input_ids` (N, T), run the model up to its blocks (embeddings, masks, rotary tables) without
    computing any block, and keep block 0's hidden states and the keyword arguments the model passes each block."""
    captured = BlockInputs(hidden=[], kwargs=[[] for _ in layers])
    with _recording(layers, captured):
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    n_batches = len(captured.hidden)
    if missed := [i for i, kw in enumerate(captured.kwargs) if len(kw) != n_batches]:
        raise CompressError(f"the model's forward did not call blocks {missed} of {len(layers)} with keyword "
                            "arguments the engine can record; its architecture is not supported")
    return captured


def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's output hidden states (B, T, H) for each batch of inputs `hidden`, given the block's own kwargs."""
    outs = []
    for h, kw in zip(hidden, kwargs, strict=True):
        out = block(h, **kw)
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
    device: torch.device = CPU,
    data_parallel: bool = False,
    finish: Callable[[list[torch.Tensor]], None] | None = None,
) -> None:
    """For each block i: collect input stats of the linears `watch(i, block)` names while running the block, then call
    `visit(i, block, inputs, outputs, stats)`. If visit returns True it changed the block, and the block is run again
    so the next block sees the changed outputs (sequential calibration); otherwise the outputs are passed on.

    device: where the block under work computes (compress.device). The model stays where it is (the CPU) and block 0's
    inputs are captured there; the hidden states then live on `device`, each block is moved there for its turn (with
    its keyword arguments) and back to the CPU after `visit`, and the stats visit received are moved to the CPU then
    too, so whatever a pass keeps from a block is on the CPU.

    A streamed model (one carrying a Streamed source under STREAM_ATTR) has its parameters on the meta device: its
    embeddings are materialized for the capture and each block for its turn, released after.

    data_parallel: under torch.distributed (compress.distributed), each rank runs its share of the batches (the same
    batch boundaries as one process) and `visit` sees only those inputs and outputs, but stats summed over all the
    batches in one process's order; without a process group it changes nothing.

    finish: called last with the last block's outputs (per batch (B, T, H), on `device`; this rank's batches when
    data-parallel), as the last visit left them: what the final norm and the lm_head read."""
    stream: Streamed | None = getattr(model, STREAM_ATTR, None)
    n_batches = -(-input_ids.shape[0] // batch_size)
    parallel = data_parallel and distributed.active()
    if parallel:
        if n_batches < distributed.world_size():
            raise InputError(f"calibration: {n_batches} batches of {batch_size} windows for "
                             f"{distributed.world_size()} processes; each needs one (more windows, a smaller "
                             "calibration.batch_size or fewer processes)")
        input_ids = torch.cat([input_ids[b * batch_size : (b + 1) * batch_size] for b in distributed.share(n_batches)])
    with stream.embedding() if stream else nullcontext():
        inputs = capture_block_inputs(model, layers, input_ids, batch_size)
    inputs.hidden = to_device(inputs.hidden, device)
    for i in tqdm(range(len(layers)), desc=desc, unit="block"):
        with stream.block(i) if stream else nullcontext():
            block = layers[i]
            move(block, device)
            try:
                _visit_block(i, block, inputs, visit, watch, want_xtx, device, n_batches if parallel else 0)
            finally:
                move(block, CPU)
    if finish is not None:
        finish(inputs.hidden)
    del inputs


def _visit_block(i: int, block: nn.Module, inputs: BlockInputs, visit: Visit, watch: Watch | None, want_xtx: bool,
                 device: torch.device, n_batches: int) -> None:
    """One step of for_each_block, with the block on `device`: run it watching its linears, visit, pass on.
    n_batches: the batches of all ranks together when data-parallel (the stats are combined over them), else 0."""
    kwargs = to_device(inputs.kwargs[i], device)
    watched = watch(i, block) if watch else {}
    stats = {name: LinearStats(want_xtx=want_xtx, keep_parts=n_batches > 0) for name in watched}
    handles = [
        lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, lin in watched.items()
    ]
    try:
        outputs = run_block(block, inputs.hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    if n_batches:
        stats = {name: s.combined(n_batches, f"block {i}: {name} input sums") for name, s in stats.items()}
    changed = visit(i, block, inputs.hidden, outputs, stats)
    for s in stats.values():
        s.to_(CPU)
    if changed:
        move(block, device)  # visit may have put new tensors in the block (on the CPU)
        outputs = run_block(block, inputs.hidden, kwargs)
    inputs.hidden = outputs
