"""What the exporter reads of a compressed model besides its tensors: each quantized linear as the artifact stores it,
and each decoder block's widths. Compress's plan holds these; export imports nothing from compress."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from export.format import ATTN, MLP


@dataclass
class QuantRecord:
    """A quantized linear as the artifact stores it (compressed-tensors pack-quantized layout).

    packed (out, ceil(in * bits / 32)) int32: unsigned codes as one little-endian bit stream per row;
    scale (out, G) float32; zero (out, G) int32 unsigned codes (w = scale * (code - zero)); g_idx (in,) int32."""

    bits: int
    group_size: int
    sym: bool
    shape: tuple[int, int]
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) float32 this record stands for, rounded to `dtype` on the way (the artifact's weight
        dtype; None: the scale's dtype) as export.kernels.reference defines it."""
        from export.kernels.reference import dequantize_packed
        from export.packing import pack

        zero = None if self.sym else pack(self.zero, self.bits, dim=0)
        return dequantize_packed(self.packed, self.scale, zero, self.shape, self.bits,
                                 None if self.ordered_groups else self.g_idx, dtype, self.group_size).float()

    def scheme(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "ordered": self.ordered_groups,
                "shape": list(self.shape)}

    @property
    def ordered_groups(self) -> bool:
        """Whether every group is a contiguous run of columns (no gather needed)."""
        g = self.shape[1] if self.group_size == -1 else self.group_size
        return bool(torch.equal(self.g_idx, (torch.arange(self.shape[1]) // g).to(self.g_idx.dtype)))


@dataclass(frozen=True)
class BlockWidths:
    """One decoder block's widths as the passes left it; `bias` names the projections that carry a bias, in
    q, k, v, o, gate, up, down order (manifest.json's architecture.layers item)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    bias: tuple[str, ...] = ()

    @property
    def group_size(self) -> int:
        """Query heads per key-value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def with_bias(self, *names: str) -> BlockWidths:
        """These widths with biases on `names` too (kept in projection order)."""
        have = set(self.bias) | set(names)
        return BlockWidths(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.intermediate_size,
                           tuple(n for n in ATTN + MLP if n in have))

    def out_features(self, hidden: int) -> dict[str, int]:
        """Output width of each projection (by short name) for a model of width `hidden`."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        inter = self.intermediate_size
        return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": hidden, "gate_proj": inter, "up_proj": inter,
                "down_proj": hidden}

    def to_dict(self) -> dict:
        return {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size, "bias": list(self.bias)}
