"""The CPU fast path (export.kernels.cpu through QuantLinear.use_kernel) against the reference, the oracle.

Tolerance, derived rather than tuned: the int4 kernel rounds the activations, its scales S and offsets Z to bfloat16
(unit roundoff u = 2^-9 each), accumulates in float32 and rounds each output to bfloat16 (u again). With
A = |S (q - 8)| + |Z| >= |w| per weight, to first order |y_fast - y_ref| <= u |x| @ A^T (activations)
+ u |x| @ A^T (S and Z) + u |y_ref| (output), plus float32 accumulation (K * 2^-24 relative, below 1e-4 here); the
test allows that bound, elementwise, with 5% for the second-order terms. A wrong zero-point convention (Z = S * z,
or z not lifted) is off by |x| @ |S (8 - z)|, hundreds of times more. The 8-bit path keeps the reference's own
dequantized weight, so it must equal the reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from export.kernels import cpu
from export.packing import pack, unpack
from export.qlinear import QuantLinear, use_kernel

U = 2.0**-9  # bfloat16 unit roundoff
# odd shapes: 45 rows pad to 48; groups divide the input columns (the format's rule), 384 = 3 x 128 is no multiple of
# 256 (the kernel's largest group); per-channel scales take 200 columns, which the kernel pads to 224
OUT, IN, IN_PER_CHANNEL = 45, 384, 200


def make_linear(bits: int, group: int, sym: bool, act_order: bool, seed: int = 0,
                out_f: int = OUT, in_f: int = IN) -> QuantLinear:
    """A QuantLinear with random codes, float16 scales (as artifacts store them) and zero points; with act_order a
    GPTQ-style g_idx (a random column order, cut into groups of `group`)."""
    gen = torch.Generator().manual_seed(seed)
    g = in_f if group == -1 else group
    n_groups = -(-in_f // g)
    layer = QuantLinear(in_f, out_f, bits, group, sym, bias=True, g_idx=act_order, dtype=torch.float16,
                        weight_dtype=torch.float32)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
    layer.weight_packed.copy_(pack(codes, bits, dim=1))
    layer.weight_scale.copy_(torch.rand(out_f, n_groups, generator=gen) * 0.02 + 0.001)
    layer.weight_shape.copy_(torch.tensor([out_f, in_f]))
    if not sym:
        assert layer.weight_zero_point is not None
        layer.weight_zero_point.copy_(pack(torch.randint(0, 2**bits, (out_f, n_groups), generator=gen), bits, dim=0))
    if act_order:
        assert layer.weight_g_idx is not None
        order = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_f) // g).int()
        layer.weight_g_idx.copy_(g_idx)
    assert layer.bias is not None
    layer.bias.copy_(torch.randn(out_f, generator=gen, dtype=torch.float16))
    return layer


def bound(layer: QuantLinear, x: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """The elementwise error bound of the module docstring, (..., out)."""
    q = unpack(layer.weight_packed, layer.bits, layer.in_features, dim=1).float()  # (out, in)
    n_groups = layer.weight_scale.shape[1]
    zero = (torch.full((layer.out_features, n_groups), 2.0 ** (layer.bits - 1)) if layer.weight_zero_point is None
            else unpack(layer.weight_zero_point, layer.bits, layer.out_features, dim=0).float())  # (out, G)
    gi = (layer.weight_g_idx.long() if layer.weight_g_idx is not None
          else torch.arange(layer.in_features) // -(-layer.in_features // n_groups))  # (in,)
    scale, zero = layer.weight_scale.float()[:, gi], zero[:, gi]  # (out, in)
    a = (scale * (q - cpu.CENTER)).abs() + (scale * (cpu.CENTER - zero)).abs()  # A = |S (q - 8)| + |Z|
    return 1.05 * U * (2 * x.abs().float() @ a.T + y_ref.abs())


@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "g_idx"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_path_matches_reference(bits, group, sym, act_order):
    in_f = IN_PER_CHANNEL if group == -1 else IN
    layer = make_linear(bits, group, sym, act_order, in_f=in_f)
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(1))  # (B, T, in)
    y_ref = layer(x)
    taken = layer.use_kernel("cpu")
    assert taken == ("dense" if bits == 8 else "cpu-int4")
    y = layer(x)
    assert y.shape == y_ref.shape == (3, 5, OUT) and y.dtype == torch.float32
    if bits == 8:
        assert torch.equal(y, y_ref)
        return
    err = (y - y_ref).abs()
    assert layer.bias is not None
    assert bool((err <= bound(layer, x, y_ref - layer.bias.float())).all()), float(err.max())
    assert float(err.max()) > 0  # it did go through the bfloat16 kernel
    assert layer.use_kernel("reference") == "reference" and torch.equal(layer(x), y_ref)
    assert layer.use_kernel("dense") == "dense" and torch.equal(layer(x), y_ref)  # the fast oracle: bit for bit


def test_bfloat16_activations():
    """A bfloat16 model: the reference rounds the weight to bfloat16 (u |w|) where the kernel rounds S and Z."""
    layer = make_linear(4, 64, False, True)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(2)).bfloat16()
    y_ref = layer(x).float()
    layer.use_kernel("cpu")
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = layer.dequantized().float()
    err = (y.float() - y_ref).abs()
    limit = bound(layer, x, y_ref) + 1.05 * U * (x.abs().float() @ w.abs().T + y_ref.abs())  # + the reference's own
    assert bool((err <= limit).all()), float(err.max())


@pytest.mark.parametrize("group, g_idx", [(16, False), (48, False), (32, "irregular")])  # 48 divides 384
def test_schemes_the_kernel_cannot_express_fall_back_to_reference(group, g_idx):
    layer = make_linear(4, group, True, bool(g_idx))
    if g_idx == "irregular":  # groups of unequal sizes: sorted, they are not runs of 32 columns
        assert layer.weight_g_idx is not None
        layer.weight_g_idx.copy_((torch.arange(IN) % 7).int())
    x = torch.randn(2, IN)
    y_ref = layer(x)
    assert layer.use_kernel("cpu") == "reference"
    assert torch.equal(layer(x), y_ref)


def test_kernel_convention_by_hand():
    """One row, one group: codes 0..15 at 4 bits with zero point 3 and scale 0.5 give weights 0.5 * (q - 3); the
    kernel, given S = 0.5 and Z = 0.5 * (8 - 3), returns x @ w exactly for small integers."""
    codes = torch.arange(32).remainder(16).reshape(1, 32).repeat(16, 1)  # (16, 32)
    scale = torch.full((16, 1), 0.5)
    zero = torch.full((16, 1), 3.0)
    weight = cpu.pack_int4(codes, scale, zero, 32)
    assert weight is not None
    x = torch.zeros(1, 32)
    x[0, 15] = 1.0  # picks code 15
    x[0, 2] = 2.0  # picks code 2
    y = cpu.int4_linear(x, weight)
    assert y.shape == (1, 16) and torch.all(y == 0.5 * (15 - 3) + 2 * 0.5 * (2 - 3))


def test_use_kernel_counts_and_refuses_unknown_names():
    model = torch.nn.Sequential(make_linear(4, 32, True, False), make_linear(8, 64, True, False),
                                make_linear(3, 16, True, False))
    assert use_kernel(model, "cpu") == {"cpu-int4": 1, "dense": 1, "reference": 1}
    assert use_kernel(model, "dense") == {"dense": 3}
    assert use_kernel(model, "reference") == {"reference": 3}
    with pytest.raises(ValueError, match="kernel: 'triton'; expected one of auto, reference, cpu, dense"):
        use_kernel(model, "triton")  # type: ignore[arg-type]
