"""A meta-device skeleton whose blocks are read from safetensors on demand (issue 16, streaming execution).

`StreamedModel.open(folder)` builds the model of a checked Llama-family folder with every parameter on the meta device
(buffers such as the rotary tables are real: they are computed, not stored) and memory-maps its safetensors files.
A module is materialized for its turn in the compute dtype (`loaded(module)`) and put back on the meta device after,
so the weights in memory are those of the modules under work, never the model's. The block engine
(calibration.capture.for_each_block) recognises a streamed model by the `STREAM_ATTR` attribute it sets, loads the
embeddings while it captures block 0's inputs and each block for its own turn, and hands every finished block to the
`on_block_done` callbacks before releasing it.

What is counted: `resident_bytes` is the bytes of materialized parameters now, `peak_bytes` its maximum since open.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from calibration.capture import STREAM_ATTR, for_each_block
from compress.errors import InputError
from compress.models import llama
from compress.models.checks import checkpoint_tensors
from export.records import QuantRecord

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from export import ExportSettings

BlockDone = Callable[[int, nn.Module], None]


@dataclass(frozen=True)
class Exported:
    """What the artifact stores, for `StreamedModel.read` to materialize instead of the source: every tensor rounded
    through the export dtype, each quantized linear's weight rebuilt from its record (pipeline._round_to_export's
    rules: scales in settings.scale_dtype, the product rounded to settings.dequantized_dtype)."""

    dtype: torch.dtype
    dequantized_dtype: torch.dtype
    quantized: Mapping[str, QuantRecord]  # module name -> its record


@dataclass
class StreamedModel:
    """A skeleton model (parameters on meta) over memory-mapped safetensors; see the module docstring."""

    model: PreTrainedModel
    folder: Path
    dtype: torch.dtype
    files: dict[str, Path]  # tensor name -> the shard that holds it
    tied: dict[str, str]  # tensor name the checkpoint may omit -> the name it is read from (lm_head -> embeddings)
    on_block_done: list[BlockDone] = field(default_factory=list)
    exported: Exported | None = None  # set by as_exported: read() gives what the artifact stores
    resident_bytes: int = 0
    peak_bytes: int = 0
    _handles: dict[Path, object] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> StreamedModel:
        """The skeleton of the model in `folder` (headers checked; no weight read), computing in `dtype`."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        files = {name: entry.file for name, entry in checkpoint_tensors(folder).items()}
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
            model = AutoModelForCausalLM.from_config(config)
        model.eval().requires_grad_(False)
        tied = {k: v for k, v in model.get_expanded_tied_weights_keys().items() if k not in files}
        missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in files and n not in tied]
        if missing:
            raise InputError(f"{folder}: the checkpoint lacks {missing[:3]} ({len(missing)} tensors) that config.json "
                             "implies")
        streamed = cls(model, folder, dtype, files, tied)
        setattr(model, STREAM_ATTR, streamed)
        return streamed

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` read from its memory-mapped shard, in the compute dtype (a tied name reads its source); after
        as_exported, the tensor as the artifact stores it (a quantized weight rebuilt from its record)."""
        module, _, leaf = name.rpartition(".")
        if self.exported is not None and leaf == "weight" and module in self.exported.quantized:
            return self.exported.quantized[module].dequantize(self.exported.dequantized_dtype).to(self.dtype)
        source = self.tied.get(name, name)
        path = self.files[source]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        value = self._handles[path].get_tensor(source)  # type: ignore[attr-defined]
        if self.exported is not None:
            value = value.to(self.exported.dtype)
        return value.to(self.dtype)

    def as_exported(self, quantized: Mapping[str, QuantRecord], settings: ExportSettings) -> None:
        """From now on materialize what the artifact stores: `quantized` (the plan's records, their scales rounded to
        settings.scale_dtype here, in place, as the in-memory path rounds them) and every other tensor rounded
        through settings.dtype."""
        for record in quantized.values():
            record.scale = record.scale.to(settings.scale_dtype)
        self.exported = Exported(settings.dtype, settings.dequantized_dtype, quantized)

    def module_tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """The model's tensors module by module in state-dict order, (module name, {tensor name: tensor}), each read
        when its turn comes (export.write's input; one module in memory at a time)."""
        names = list(self.model.state_dict())  # meta tensors: names only, no memory

        def module_of(name: str) -> str:
            return name.rpartition(".")[0]

        for module, group in itertools.groupby(names, key=module_of):
            yield module, {name: self.read(name) for name in group}

    def final_hidden(self, input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """The last block's outputs, per batch (B, T, H), for windows `input_ids` (N, T), through the block engine."""
        layers = llama.blocks(self.model)
        last: list[torch.Tensor] = []

        def keep_last(i: int, _block, _inputs, outputs: list[torch.Tensor], _stats) -> None:
            if i == len(layers) - 1:
                last.extend(outputs)

        for_each_block(self.model, layers, input_ids, keep_last, batch_size=batch_size, desc="streamed forward")
        return last

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Logits (N, T, vocab) float32 of windows `input_ids` (N, T), the model never materialized whole."""
        lm = llama.as_causal_lm(self.model)
        hidden = self.final_hidden(input_ids, batch_size)
        with self.loaded(lm.model.norm, lm.lm_head):
            return torch.cat([lm.lm_head(lm.model.norm(h)).float() for h in hidden])

    @torch.no_grad()
    def perplexity(self, windows: torch.Tensor, batch_size: int) -> float:
        """exp(mean next-token NLL) over windows (N, T), as compress.evaluate.perplexity computes it (each window on
        its own), with logits made `batch_size` windows at a time after the last block."""
        lm = llama.as_causal_lm(self.model)
        hidden = torch.cat(self.final_hidden(windows, batch_size))  # (N, T, H)
        nll, count = 0.0, 0
        with self.loaded(lm.model.norm, lm.lm_head):
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start : start + batch_size]
                logits = lm.lm_head(lm.model.norm(hidden[start : start + batch_size])).float()  # (B, T, V)
                nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
                count += ids[:, 1:].numel()
        return math.exp(nll / count)

    def load(self, module: nn.Module) -> None:
        """Materialize every parameter of `module` (a submodule of the model) from the checkpoint."""
        prefix = self._prefix(module)
        for name, param in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = self.read(prefix + name)
            if tuple(value.shape) != tuple(param.shape):
                raise InputError(f"{self.files[self.tied.get(prefix + name, prefix + name)]}: tensor {prefix + name} "
                                 f"has shape {list(value.shape)}, the model expects {list(param.shape)}")
            setattr(holder, leaf, nn.Parameter(value, requires_grad=False))
            self.resident_bytes += value.numel() * value.element_size()
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def release(self, module: nn.Module) -> None:
        """Put every parameter of `module` back on the meta device (shape and dtype kept), freeing its memory."""
        for name, param in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            if param.device.type != "meta":
                self.resident_bytes -= param.numel() * param.element_size()
            setattr(holder, leaf, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))

    @contextmanager
    def loaded(self, *modules: nn.Module) -> Iterator[None]:
        """`modules` materialized inside the block, released after (also on an error)."""
        with ExitStack() as stack:
            for module in modules:
                stack.callback(self.release, module)
                self.load(module)
            yield

    # what the block engine calls (calibration.capture.Streamed)
    def embedding(self) -> AbstractContextManager[None]:
        """The input embeddings, materialized while block 0's inputs are captured."""
        return self.loaded(self.model.get_input_embeddings())

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block i materialized for its turn; on a normal exit the on_block_done callbacks see it, then it is freed."""
        block = llama.blocks(self.model)[i]
        with self.loaded(block):
            yield block
            for done in self.on_block_done:
                done(i, block)

    def _prefix(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return f"{name}." if name else ""
        raise ValueError("StreamedModel: the module is not part of this model")
