"""The reference dequantization assigns input column k to group k // group_size, as the quantizer and
compressed-tensors do, also when the group size does not divide the input width (a pruned MLP of 1096 channels in
groups of 64: 18 groups, the last of 8 columns)."""

import pytest
import torch

from compress.ops.quant import QuantSpec, rtn
from export.kernels.reference import dequantize_packed
from export.packing import pack


@pytest.mark.parametrize("in_f,group", [(100, 64), (1096, 64), (96, 32), (70, -1)])
def test_columns_belong_to_k_floordiv_group_size(in_f, group):
    W = torch.randn(16, in_f, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = rtn(W, QuantSpec(bits=4, group_size=group, sym=False))
    g = in_f if group == -1 else group
    expected = scale[:, torch.arange(in_f) // g] * (codes.float() - zero[:, torch.arange(in_f) // g])
    got = dequantize_packed(pack(codes, 4, dim=1), scale, pack(zero, 4, dim=0), (16, in_f), 4, None, torch.float32,
                            group)
    assert torch.equal(got, expected)
    assert (got - W).abs().max() <= scale.max() / 2 + 1e-6  # within half a step of the source weights


def test_a_columns_group_is_never_guessed():
    with pytest.raises(ValueError, match="give g_idx or group_size"):
        dequantize_packed(torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 2), None, (2, 32), 4)
