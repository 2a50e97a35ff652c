"""QuantLinear: a linear layer that keeps its weight packed (compressed-tensors names and layout) and computes through
one of the kernels: `reference` dequantizes the whole weight at every call (the oracle; memory held stays packed),
`cpu` packs it once for torch's int4 kernel (2-4 bits) or keeps the dequantized weight (8 bits), `dense` keeps the
dequantized weight (the reference's own, bit for bit, at a dense layer's memory and speed). `use_kernel` picks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from export.kernels import cpu
from export.kernels.reference import dequantize_packed
from export.packing import unpack

Kernel = Literal["auto", "reference", "cpu", "dense"]
KERNELS: tuple[str, ...] = ("auto", "reference", "cpu", "dense")


class QuantLinear(nn.Module):
    """y = x W^T + b with W = scale * (code - zero) per group; buffers: weight_packed, weight_scale,
    weight_zero_point (asymmetric only), weight_shape, weight_g_idx (only when groups are not contiguous)."""

    # buffers, registered in __init__ (declared here for the type checker: nn.Module's attributes are untyped)
    weight_packed: torch.Tensor  # (out, ceil(in * bits / 32)) int32
    weight_scale: torch.Tensor  # (out, n_groups)
    weight_shape: torch.Tensor  # (2,) int64: out, in
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
        self.kernel = "reference"  # the path forward takes: reference, cpu-int4 or dense (see use_kernel)
        self._int4: cpu.Int4Weight | None = None
        self._dense: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # dense: the weight per dtype
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized(self) -> torch.Tensor:
        return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                 (self.out_features, self.in_features), self.bits, self.weight_g_idx,
                                 self.weight_dtype, self.group_size)

    def use_kernel(self, kernel: Kernel) -> str:
        """Pick the compute path and return the one taken. `reference`: dequantize at every call. `dense`: the
        reference's dequantized weight, kept per activation dtype (bit for bit the reference, a dense layer's memory;
        the fast oracle). `cpu` (also what `auto` picks on CPU): 2-4 bits through torch's int4 kernel (packed here,
        once; computes in bfloat16, see export.kernels.cpu), 8 bits `dense` (torch's int8 kernel is symmetric
        per-channel only, and its float32 path ~8x slower than a dense matmul on AVX2), `reference` where the int4
        layout cannot express the scheme (a group size not a multiple of 32, an irregular g_idx). ValueError for
        another name."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel: {kernel!r}; expected one of {', '.join(KERNELS)}")
        if kernel == "auto":
            kernel = "cpu" if self.weight_packed.device.type == "cpu" and cpu.available() else "reference"
        self._int4, self._dense, self.kernel = None, {}, "reference"
        if kernel == "dense" or (kernel == "cpu" and self.bits > cpu.MAX_BITS):
            self.kernel = "dense"
        elif kernel == "cpu":
            codes = unpack(self.weight_packed, self.bits, self.in_features, dim=1)  # (out, in)
            zero = (torch.full_like(self.weight_scale, 2 ** (self.bits - 1), dtype=torch.float32)
                    if self.weight_zero_point is None else
                    unpack(self.weight_zero_point, self.bits, self.out_features, dim=0))  # (out, G)
            self._int4 = cpu.pack_int4(codes, self.weight_scale, zero, self.group_size, self.weight_g_idx)
            self.kernel = "reference" if self._int4 is None else "cpu-int4"
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._int4 is not None and x.device.type == "cpu":
            return cpu.int4_linear(x, self._int4, bias)
        if self.kernel == "dense":
            key = (x.dtype, x.device)
            if key not in self._dense:
                self._dense[key] = self.dequantized().to(device=x.device, dtype=x.dtype)  # (out, in)
            return F.linear(x, self._dense[key], bias)
        if x.is_cuda and self.weight_g_idx is None:  # the Triton kernel when installed (imported only on CUDA)
            from export.kernels import triton_linear as gpu

            if gpu.available():
                return gpu.triton_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                                         self.group_size, self.out_features, self.in_features, bias, self.weight_dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, kernel={self.kernel}")


def use_kernel(model: nn.Module, kernel: Kernel = "auto") -> dict[str, int]:
    """Set every QuantLinear of `model` to `kernel` (QuantLinear.use_kernel); returns how many took each path."""
    taken: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            path = module.use_kernel(kernel)
            taken[path] = taken.get(path, 0) + 1
    return taken
