"""The torch implementation of dequantization: the CPU path, and the oracle every GPU kernel is compared with."""

from __future__ import annotations

import torch

from export.packing import unpack


def dequantized_dtype(quant_format: str, model_dtype: torch.dtype | None) -> torch.dtype | None:
    """What a quantized weight scale * (code - zero) is rounded to: float16 in the GPTQ format (its runtimes,
    gptqmodel, exllama and Marlin, compute in float16); the model's dtype in compressed-tensors (None: the scale's)."""
    return torch.float16 if quant_format == "gptq" else model_dtype


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_packed: torch.Tensor | None,
                      shape: tuple[int, int], bits: int, g_idx: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None, group_size: int | None = None) -> torch.Tensor:
    """The weight (out, in) from packed codes (out, ceil(in*bits/32)) int32, scale (out, G), zero points packed along
    dim 0 ((ceil(out*bits/32), G) int32; None = symmetric, zero 2^(bits-1)), and each input column's group: g_idx
    (in,), or else column k is in group k // group_size (-1: one group per row), as the quantizer and
    compressed-tensors assign them (the last group is the short one when group_size does not divide in). Raises
    ValueError when neither is given.

    Every weight is scale * (code - zero) computed in float32 (exact for 16-bit scales: an 11-bit significand times
    an integer below 2^8) and rounded once to `dtype`, the artifact's weight dtype (default: the scale's dtype). A
    runtime computing in that dtype (compressed-tensors, gptqmodel, the fp16/bf16 GPU kernels: their 16-bit product
    is that same single rounding) sees the same weights bit for bit; a float32 artifact with float16 scales has the
    exact products, as stock transformers computes them after casting the scales to float32."""
    out_f, in_f = shape
    codes = unpack(packed, bits, in_f, dim=1).float()  # (out, in)
    n_groups = scale.shape[1]
    if g_idx is not None:
        gi = g_idx.long()
    elif group_size is not None:
        gi = torch.arange(in_f, device=packed.device) // (in_f if group_size == -1 else group_size)
    else:
        raise ValueError("dequantize_packed: give g_idx or group_size (a column's group cannot be inferred from the "
                         "number of groups)")
    if zero_packed is None:
        zero = torch.full((out_f, n_groups), float(2 ** (bits - 1)), device=packed.device)
    else:
        zero = unpack(zero_packed, bits, out_f, dim=0).float()  # (out, G)
    return (scale[:, gi].float() * (codes - zero[:, gi])).to(dtype or scale.dtype)
