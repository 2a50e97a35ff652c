"""Uniform integer quantization grids and exact bit packing into int32 words.

Shapes: a weight W is (out, in); groups run along the input dimension, `group_size` columns each; scales and zero
points are (out, n_groups). Codes are unsigned integers in [0, 2^bits - 1]; w ~ scale * (code - zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from export.packing import pack, unpack  # noqa: F401  (the runtime owns the layout; re-exported here)

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """bits; group_size (-1: one group per output row); symmetric grid; GPTQ column order and damping; mse: scales
    by the MSE search of `grid` instead of the group's range."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    mse: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // g)


MSE_GRID = 100  # shrink factors tried by the MSE scale search: 1, 0.992, ..., 1 - MSE_MAX_SHRINK (GPTQ's find_params)
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4  # the error's exponent: between L2 and L-inf, as GPTQ's reference code weighs it


def _range_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def grid(w: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w (rows, cols), each (rows, 1); the grid always contains 0 exactly.

    minmax (mse False): the grid spans the row's range. mse: the range shrunk by the factor, of MSE_GRID between 1
    and 1 - MSE_MAX_SHRINK, that minimizes sum |Q(w) - w|^MSE_NORM over the row (clipping outliers buys resolution
    for the rest; GPTQ's reference `find_params(mse=True)`, as GPTQModel's `mse` option)."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(1, keepdim=True).values.clamp(max=0)
    xmax = w.max(1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmax - xmin) == 0  # an all-zero row: any positive scale reproduces it
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale, zero = _range_grid(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID) + 1):
        p = 1 - i / MSE_GRID
        s, z = _range_grid(p * xmin, p * xmax, maxq, sym)
        err = (dequantize(quantize(w, s, z, maxq), s, z) - w).abs().pow(MSE_NORM).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (same shape as w, int32) in [0, maxq]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes.float() - zero)


def rtn(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: (codes (out, in) int32, scale (out, G), zero (out, G))."""
    out_f, in_f = W.shape
    g = in_f if spec.group_size == -1 else spec.group_size
    codes = torch.empty(out_f, in_f, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for start in range(0, in_f, g):
        s, z = grid(W[:, start : start + g], spec.bits, spec.sym, spec.mse)
        codes[:, start : start + g] = quantize(W[:, start : start + g].float(), s, z, spec.maxq)
        scales.append(s)
        zeros.append(z)
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1)
