"""Medusa drafter heads (Cai et al., 2024): K heads on the model's final hidden state (after the last norm), head k
guessing the token k+1 positions ahead of the one the model itself predicts next.

Each head is a stack of residual blocks, x + SiLU(W x + b) with W and b initialized to zero (so an untrained head
repeats the model's own next-token guess), followed by the model's own `lm_head`, shared and frozen. The module's
parameter names are vLLM's Medusa names (`blocks.{h}.layers.{l}.weight` / `.bias`), so the drafter folder it reads
is these tensors plus its config."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_HEADS = 16  # more heads than this guess too far ahead to be accepted; a recipe asking for more is a mistake


class ResidualBlock(nn.Module):
    """x + SiLU(layer(x)) for each layer in turn; the layers start at zero (the block starts as the identity)."""

    def __init__(self, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """K drafter heads over final hidden states.

    forward(hidden (..., H), lm_head: (H -> V) module) -> logits (..., K, V): at the hidden state of position t, head
    k (0-based) guesses the token at position t + k + 2; the model's own lm_head guesses t + 1."""

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

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.hidden(hidden))
