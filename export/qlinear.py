"""QuantLinear: a linear layer that keeps its weight packed (compressed-tensors names and layout) and dequantizes
on the fly in forward; memory held stays packed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.kernels.reference import dequantize_packed


class QuantLinear(nn.Module):
    """y = x W^T + b with W = scale * (code - zero) per group; buffers: weight_packed, weight_scale,
    weight_zero_point (asymmetric only), weight_shape, weight_g_idx (only when groups are not contiguous)."""

    # buffers, registered in __init__ (declared here for the type checker: nn.Module's attributes are untyped)
    weight_packed: torch.Tensor  # (out, ceil(in * bits / 32)) int32
    weight_scale: torch.Tensor  # (out, n_groups)
    weight_zero_point: torch.Tensor | None  # (ceil(out * bits / 32), n_groups) int32; None: symmetric
    weight_g_idx: torch.Tensor | None  # (in,) int32

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, bias: bool,
                 g_idx: bool = False, device=None, dtype=torch.float32, weight_dtype: torch.dtype | None = None):
        """weight_dtype: the artifact's weight dtype, which the dequantized weight is rounded to (None: the
        scale's dtype); kept when the model is cast, since it defines the weights (export.kernels.reference)."""
        super().__init__()
        self.weight_dtype = weight_dtype
        self.in_features, self.out_features, self.bits, self.group_size, self.sym = (
            in_features, out_features, bits, group_size, sym)
        g = in_features if group_size == -1 else group_size
        n_groups = -(-in_features // g)
        self.register_buffer("weight_packed", torch.empty(out_features, -(-in_features * bits // 32),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
        if not sym:
            self.register_buffer("weight_zero_point", torch.empty(-(-out_features * bits // 32), n_groups,
                                                                  dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if g_idx:
            self.register_buffer("weight_g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        else:
            self.weight_g_idx = None
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized(self) -> torch.Tensor:
        return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                 (self.out_features, self.in_features), self.bits, self.weight_g_idx,
                                 self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")
