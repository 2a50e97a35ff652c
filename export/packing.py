"""Exact bit packing of unsigned integer codes into int32 words, shared by the writer and the runtime.

The layout is compressed-tensors' `pack-quantized` (dense, no padding bits): along the packed dimension the codes
form one little-endian bit stream, value i in bits [i*bits, (i+1)*bits), so 32 codes fill exactly `bits` words and a
3-bit code may straddle two words. Tests check it bit for bit against compressed-tensors' own packer.
"""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned `bits`-wide codes along `dim` into int32 words as one continuous little-endian bit stream
    (value i occupies bits [i*bits, (i+1)*bits), low bits first; a 3-bit value may straddle two words).
    The packed dim has ceil(n * bits / 32) words."""
    codes = codes.movedim(dim, -1).to(torch.int64)
    n = codes.shape[-1]
    n_words = -(-n * bits // 32)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    words = torch.zeros(*codes.shape[:-1], n_words + 1, dtype=torch.int64)
    words.index_add_(-1, word, codes << shift)  # bits never overlap, so adding is OR
    spill = (shift + bits) > 32  # the high part of a value that crosses into the next word
    if spill.any():
        words.index_add_(-1, word[spill] + 1, codes[..., spill] >> (32 - shift[spill]))
    words = words[..., :n_words] & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, as signed int32
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes along `dim`, as int32."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], -1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    lo = w[..., word] >> shift
    hi = w[..., word + 1] << (32 - shift)  # only matters where the value straddles words
    vals = (lo | torch.where(shift + bits > 32, hi, torch.zeros_like(hi))) & (2**bits - 1)
    return vals.to(torch.int32).movedim(-1, dim)
