"""The torch implementation of dequantization: the CPU path, and the oracle every GPU kernel is compared with."""

from __future__ import annotations

import torch

from export.packing import unpack


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_packed: torch.Tensor | None,
                      shape: tuple[int, int], bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (out, in) from packed codes (out, ceil(in*bits/32)) int32, scale (out, G), zero points packed along
    dim 0 ((ceil(out*bits/32), G) int32; None = symmetric, zero 2^(bits-1)) and optional g_idx (in,).

    The product is computed in the scale's dtype, as compressed-tensors, gptqmodel and the fp16 GPU kernels do: with
    fp16 scales every weight is the fp16 rounding of scale * (code - zero) (exact for the small integer code - zero),
    so all of those runtimes see the same weights bit for bit."""
    out_f, in_f = shape
    codes = unpack(packed, bits, in_f, dim=1).float()  # (out, in)
    n_groups = scale.shape[1]
    gi = g_idx.long() if g_idx is not None else torch.arange(in_f) // -(-in_f // n_groups)
    if zero_packed is None:
        zero = torch.full((out_f, n_groups), float(2 ** (bits - 1)))
    else:
        zero = unpack(zero_packed, bits, out_f, dim=0).float()  # (out, G)
    return scale[:, gi] * (codes - zero[:, gi]).to(scale.dtype)
