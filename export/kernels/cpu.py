"""Packed weights through torch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

The kernel's convention: codes q in [0, 16) and, per (group of `group` input columns, output row), a scale S and a
float offset Z, with w = (q - 8) * S + Z. Ours is w = s * (code - z), so S = s and Z = s * (8 - z): the same weight
for any code width up to 4 bits, which is how 2- and 3-bit codes are lifted into int4 lanes losslessly (a b-bit code
is a 4-bit code with the same scale; only the offset moves). The kernel takes bfloat16 activations, scales and
offsets (on AVX2 its float32 path is a scalar loop, ~10x slower), accumulates in float32 and returns bfloat16: that
rounding (2^-9 relative on the inputs and on the output) is the whole difference from the reference.

Packing happens once, at load, from the artifact's layout; act-order weights (a g_idx) have their input columns
sorted by group once, and the activations are gathered in that order at each call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu wants the output rows in multiples of 16
INNER_K_TILES = 2  # an argument of the packing op; the CPU layout is the same for 2, 4 and 8
CENTER = 8  # the kernel subtracts 8 from every code
MAX_BITS = 4  # codes up to 4 bits fit an int4 lane


def available() -> bool:
    """Whether this torch has the CPU int4 kernel (torch >= 2.5)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The kernel group size for ours (-1: one group per output row), such that each kernel group lies within one of
    ours; None when there is none (a group size that is not a multiple of 32)."""
    if group_size == -1:  # any kernel group works; prefer one that divides the row (no padding at each call)
        return next((g for g in KERNEL_GROUPS if in_features % g == 0), KERNEL_GROUPS[-1])
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


@dataclass(frozen=True)
class Int4Weight:
    """A weight laid out for the kernel; shapes use K = in_features padded to a multiple of `group`, N =
    out_features padded to a multiple of 16 (padding rows and columns have scale 0 and zero activations)."""

    packed: torch.Tensor  # (N, K / 2) uint8
    scale_zero: torch.Tensor  # (K / group, N, 2) bfloat16: [..., 0] = S, [..., 1] = Z
    group: int
    in_features: int
    out_features: int
    perm: torch.Tensor | None  # (in_features,) int64: input columns in group order; None: the stored order


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
              g_idx: torch.Tensor | None = None) -> Int4Weight | None:
    """Lay out w = scale * (codes - zero) for the kernel: codes (out, in) integers in [0, 16), scale and zero
    (out, G) (zero in code units), groups of `group_size` contiguous input columns (-1: one group) or, with g_idx
    (in,), column i in group g_idx[i]. None when the kernel cannot express it: a group size not a multiple of 32, or
    a g_idx whose groups, sorted, are not contiguous runs of `group_size` columns. ValueError for a group size that
    does not divide the input columns (the format's rule, export.format)."""
    out_f, in_f = codes.shape
    if group_size != -1 and in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_f} input columns")
    group = kernel_group(group_size, in_f)
    if group is None or int(codes.max()) >= 2**MAX_BITS or int(codes.min()) < 0:
        return None
    ours = in_f if group_size == -1 else group_size
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], torch.arange(in_f) // ours):
            return None
        codes = codes[:, perm]
    k_pad, n_pad = -(-in_f // group) * group, -(-out_f // ROW_MULTIPLE) * ROW_MULTIPLE
    lanes = torch.full((n_pad, k_pad), CENTER, dtype=torch.int32)  # (N, K); padding meets zero activations
    lanes[:out_f, :in_f] = codes.to(torch.int32)
    which = torch.arange(k_pad // group) * group // ours  # (K / group,): our group of each kernel group
    s = torch.zeros(n_pad, k_pad // group)  # padding rows: S = Z = 0
    z = torch.zeros(n_pad, k_pad // group)
    s[:out_f] = scale.float()[:, which]
    z[:out_f] = scale.float()[:, which] * (CENTER - zero.float()[:, which])  # exact in float32 for 16-bit scales
    scale_zero = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K / group, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(lanes, INNER_K_TILES)
    return Int4Weight(packed, scale_zero, group, in_f, out_f, perm)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias), computed by the kernel in bfloat16 (see the module docstring); returns x's dtype,
    shape (..., out). The bias is added in x's dtype."""
    lead = x.shape[:-1]
    a = x.reshape(-1, weight.in_features)  # (M, in)
    if weight.perm is not None:
        a = a.index_select(1, weight.perm)
    k_pad = weight.scale_zero.shape[0] * weight.group
    if k_pad != weight.in_features:
        a = F.pad(a, (0, k_pad - weight.in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16).contiguous(), weight.packed, weight.group,
                                                  weight.scale_zero)  # (M, N) bfloat16
    y = y[:, :weight.out_features].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, weight.out_features)
