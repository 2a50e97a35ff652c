"""Quantization maths: exact packing for every width, GPTQ below RTN in output error, robust to bad Hessians."""

import pytest
import torch

from compress.ops.gptq import gptq_quantize, hessian
from compress.ops.quant import QuantSpec, dequantize, pack, rtn, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, dim", [((7, 33), -1), ((1, 1), -1), ((45, 5), 0), ((3, 96), 1), ((64, 11), 0)])
def test_pack_round_trip(bits, shape, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    words = pack(codes, bits, dim)
    n = shape[dim]
    assert words.dtype == torch.int32 and words.shape[dim] == -(-n * bits // 32)
    assert torch.equal(unpack(words, bits, n, dim), codes)


def test_pack_golden_bits():
    # 3-bit codes 0..7 then 5 -> stream 000 001 010 011 100 101 110 111 101 (low bits first)
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 5, 1, 1]], dtype=torch.int32)
    words = pack(codes, 3)
    expected = sum(int(v) << (3 * i) for i, v in enumerate(codes[0].tolist()))
    assert words.shape == (1, 2)
    assert (int(words[0, 0]) & 0xFFFFFFFF) == expected & 0xFFFFFFFF
    assert (int(words[0, 1]) & 0xFFFFFFFF) == expected >> 32  # value 10 straddles the two words
    assert torch.equal(pack(torch.tensor([[15, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.int32), 4),
                       torch.tensor([[0x1000000F]], dtype=torch.int32))


def _layer(seed=0, out_f=48, in_f=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels, like a transformer's
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ (torch.eye(in_f) + mix)
    X[:, :4] *= 8
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    return W, X


def _out_err(W, Wq, X):
    return float(((X @ W.T - X @ Wq.T) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size, sym, act_order", [(32, True, False), (-1, False, False), (32, False, True)])
def test_gptq_beats_rtn(bits, group_size, sym, act_order):
    W, X = _layer(bits)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=act_order)
    q = gptq_quantize(W, hessian(X), spec)
    codes, s, z = rtn(W, spec)
    gi = torch.arange(W.shape[1]) // (W.shape[1] if group_size == -1 else group_size)
    e_gptq, e_rtn = _out_err(W, q.dequantize(), X), _out_err(W, dequantize(codes, s[:, gi], z[:, gi]), X)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1


def test_static_groups_keep_contiguous_g_idx():
    W, X = _layer(5)
    q = gptq_quantize(W, hessian(X), QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True))
    assert torch.equal(q.g_idx, (torch.arange(128) // 32).to(torch.int32))
    q2 = gptq_quantize(W, hessian(X), QuantSpec(bits=4, group_size=32, act_order=True))
    assert not torch.equal(q2.g_idx, q.g_idx) and torch.bincount(q2.g_idx.long()).tolist() == [32] * 4


def test_rank_deficient_hessian_is_finite_and_recorded():
    W, X = _layer(7)
    X = X[:16]  # 16 tokens for 128 inputs: rank 16
    X[:, 10:20] = 0  # dead channels
    q = gptq_quantize(W, hessian(X), QuantSpec(bits=3, group_size=32))
    assert torch.isfinite(q.dequantize()).all()
    assert q.dead_columns == 10 and "10 dead input columns zeroed" in q.notes
    assert q.dequantize()[:, 10:20].abs().max() == 0


def test_cholesky_failure_falls_back_to_rtn():
    W, _ = _layer(8)
    q = gptq_quantize(W, -torch.eye(128), QuantSpec(bits=4, group_size=32))
    assert q.fallback and "rtn" in q.fallback
    codes, s, z = rtn(W, QuantSpec(bits=4, group_size=32))
    assert torch.equal(q.codes, codes)


def test_non_finite_weight_is_refused():
    W, X = _layer(9)
    W[3, 5] = float("nan")
    with pytest.raises(FloatingPointError):
        gptq_quantize(W, hessian(X), QuantSpec())


@pytest.mark.parametrize("bits,sym", [(2, True), (3, True), (4, True), (4, False)])
def test_mse_scale_search_lowers_the_rounding_error_on_heavy_tails(bits, sym):
    """The searched range never does worse than the full range on the searched error (shrink factor 1 is a
    candidate), and on weights with a few outliers (as in LLM layers) it does clearly better in plain MSE too."""
    from compress.ops.quant import MSE_NORM, grid, quantize

    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=g) * (1 + 4 * (torch.rand(64, 256, generator=g) > 0.99))  # 1% outliers, 5x
    errs = {}
    for mse in (False, True):
        s, z = grid(W, bits, sym, mse)
        wq = dequantize(quantize(W, s, z, 2**bits - 1), s, z)
        assert (wq[W == 0] == 0).all() and (s > 0).all()
        errs[mse] = ((wq - W).abs().pow(MSE_NORM).sum(1), (wq - W).pow(2).mean().item())
    assert (errs[True][0] <= errs[False][0] + 1e-6).all()
    assert errs[True][1] < 0.9 * errs[False][1]
    spec = QuantSpec(bits=bits, group_size=64, sym=sym, mse=True)
    codes, scale, zero = rtn(W, spec)
    assert scale.shape == (64, 4) and codes.max() <= spec.maxq and codes.min() >= 0


def test_gptq_with_mse_scales_beats_rtn_with_them_and_minmax_gptq():
    W, X = _layer(3)
    W = W * (1 + 4 * (torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.99))
    spec = QuantSpec(bits=3, group_size=32, mse=True)
    q = gptq_quantize(W, hessian(X), spec)
    codes, s, z = rtn(W, spec)
    gi = torch.arange(W.shape[1]) // 32
    e_mse, e_rtn = _out_err(W, q.dequantize(), X), _out_err(W, dequantize(codes, s[:, gi], z[:, gi]), X)
    e_minmax = _out_err(W, gptq_quantize(W, hessian(X), QuantSpec(bits=3, group_size=32)).dequantize(), X)
    assert e_mse < 0.9 * e_rtn and e_mse < e_minmax, (e_mse, e_rtn, e_minmax)
