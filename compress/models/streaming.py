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

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from calibration.capture import STREAM_ATTR
from compress.errors import InputError
from compress.models import llama
from compress.models.checks import checkpoint_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BlockDone = Callable[[int, nn.Module], None]


@dataclass
class StreamedModel:
    """A skeleton model (parameters on meta) over memory-mapped safetensors; see the module docstring."""

    model: PreTrainedModel
    folder: Path
    dtype: torch.dtype
    files: dict[str, Path]  # tensor name -> the shard that holds it
    tied: dict[str, str]  # tensor name the checkpoint may omit -> the name it is read from (lm_head -> embeddings)
    on_block_done: list[BlockDone] = field(default_factory=list)
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
        """Tensor `name` read from its memory-mapped shard, in the compute dtype (a tied name reads its source)."""
        source = self.tied.get(name, name)
        path = self.files[source]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(source).to(self.dtype)  # type: ignore[attr-defined]

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
