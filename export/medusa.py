"""Medusa drafter heads (Cai et al., 2024): K heads on the model's final hidden state (after the last norm), head k
guessing the token k+1 positions ahead of the one the model itself predicts next.

Each head is a stack of residual blocks, x + SiLU(W x + b) with W and b initialized to zero (so an untrained head
repeats the model's own next-token guess), followed by the model's own `lm_head`, shared and frozen. The module's
parameter names are vLLM's Medusa names (`blocks.{h}.layers.{l}.weight` / `.bias`), so the drafter folder it reads
is these tensors plus its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

MAX_HEADS = 16  # more heads than this guess too far ahead to be accepted; a recipe asking for more is a mistake


class ResidualBlock(nn.Module):
    """x + SiLU(layer(x)) for each layer in turn; the layers start at zero (the block starts as the identity)."""

    def __init__(self, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        layers = [nn.Linear(hidden_size, hidden_size) for _ in range(num_layers)]
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """K drafter heads over final hidden states.

    forward(hidden (..., H), lm_head: (H -> V) module or function) -> logits (..., K, V): at the hidden state of
    position t, head k (0-based) guesses the token at position t + k + 2; the model's own lm_head guesses t + 1."""

    def __init__(self, hidden_size: int, num_heads: int = 4, num_layers: int = 1) -> None:
        super().__init__()
        if not 1 <= num_heads <= MAX_HEADS:
            raise ValueError(f"num_heads {num_heads}: between 1 and {MAX_HEADS}")
        if num_layers < 1:
            raise ValueError(f"num_layers {num_layers}: at least 1")
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size, num_layers) for _ in range(num_heads))

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K, H): each head's input to the shared lm_head."""
        return torch.stack([block(hidden) for block in self.blocks], dim=-2)

    def forward(self, hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return lm_head(self.hidden(hidden))


# ---- stored: the vLLM Medusa drafter folder inside the artifact ----------------------------------------------------
# vLLM's Medusa model (vllm/model_executor/models/medusa.py) builds `num_heads` ResidualBlocks of `num_hidden_layers`
# nn.Linear(hidden, hidden, bias=config.medusa_fc_bias) named blocks.{h}.layers.{l}, and with config.original_lm_head
# one shared lm_head, loaded from the checkpoint's `lm_heads.0.weight`; its loader refuses a checkpoint that leaves
# any parameter unloaded, so the folder holds a copy of the model's lm_head (vocab, hidden). Its config class
# (vllm/transformers_utils/configs/medusa.py) renames any key with "num" and "heads" in it to num_heads, so the
# config holds no other such key. The artifact keeps the heads only here (manifest `heads`); load_heads reads them.
DRAFTER_DIR = "medusa"
DRAFTER_WEIGHTS = f"{DRAFTER_DIR}/model.safetensors"
DRAFTER_CONFIG = f"{DRAFTER_DIR}/config.json"
SHARED_LM_HEAD = "lm_heads.0.weight"  # vLLM maps it to its single lm_head when original_lm_head is set


def block_names(num_heads: int, num_layers: int) -> list[str]:
    """The heads' tensor names, MedusaHeads' and vLLM's: blocks.{h}.layers.{l}.weight (H, H) and .bias (H,)."""
    return [f"blocks.{h}.layers.{layer}.{part}" for h in range(num_heads) for layer in range(num_layers)
            for part in ("weight", "bias")]


def drafter_config(hidden_size: int, vocab_size: int, num_heads: int, num_layers: int, dtype: str) -> dict:
    """config.json of the vLLM Medusa drafter folder: heads over the target's final hidden states, with the target's
    own lm_head shared by every head (original_lm_head) and a bias in each residual layer (medusa_fc_bias)."""
    return {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": hidden_size,
            "vocab_size": vocab_size, "truncated_vocab_size": vocab_size, "num_heads": num_heads,
            "num_hidden_layers": num_layers, "original_lm_head": True, "medusa_fc_bias": True, "torch_dtype": dtype}


def drafter_tensors(heads: dict[str, torch.Tensor], lm_head: torch.Tensor, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """The drafter folder's tensors in `dtype`: the heads' (block_names) and the shared lm_head (vocab, hidden) as
    SHARED_LM_HEAD. Raises ValueError when a head tensor's width is not the lm_head's."""
    hidden = lm_head.shape[1]
    for name, t in heads.items():
        if t.shape[-1] != hidden:
            raise ValueError(f"{name}: {tuple(t.shape)}, but the lm_head reads {hidden}-wide hidden states")
    return {**{k: t.detach().to(dtype).contiguous() for k, t in heads.items()},
            SHARED_LM_HEAD: lm_head.detach().to(dtype).contiguous()}


def load_heads(path: str | Path, dtype: torch.dtype | None = None) -> MedusaHeads | None:
    """The artifact's drafter heads (eval mode, frozen; the stored dtype unless `dtype`), or None when it has none.
    The files are checked against the manifest first (sizes and tensor shapes, not hashes: export.verify does those);
    raises export.format.ArtifactError naming the problem."""
    from safetensors import safe_open

    from export.format import ArtifactError
    from export.loader import check_files, read_manifest

    path = Path(path)
    manifest, problems = read_manifest(path)
    if manifest is None or (problems := check_files(path, manifest)):
        raise ArtifactError(f"{path}: " + "; ".join(problems))
    record = manifest.heads
    if record is None:
        return None
    hidden = manifest.tensors["model.embed_tokens.weight"].shape[1]
    heads = MedusaHeads(hidden, record.num_heads, record.num_layers)
    with safe_open(path / record.path / "model.safetensors", framework="pt") as f:
        state = {name: f.get_tensor(name) for name in block_names(record.num_heads, record.num_layers)}
    heads.load_state_dict(state, assign=True)
    if dtype is not None:
        heads.to(dtype)
    return heads.eval().requires_grad_(False)
