"""export/packing.py against compressed-tensors' own packer, bit for bit, at 2, 3, 4 and 8 bits on shapes whose
packed length is not a whole number of words.

Our codes are unsigned (0 .. 2^bits - 1); compressed-tensors packs signed int8 values after adding 2^(bits-1), so
our codes c correspond to their values c - 2^(bits-1). Weights pack along the input (our dim -1, their
packed_dim=1); asymmetric zero points (out, groups) pack along the output (our dim 0, their packed_dim=0)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from export.interop import quantized_tensors
from export.packing import pack, unpack

ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                         reason="compressed-tensors (the test extra) is not installed")

BITS = [2, 3, 4, 8]
# (rows, columns): neither a multiple of 32 / bits, a single value, a row shorter than a word, one just past a word
SHAPES = [(7, 33), (45, 5), (1, 1), (3, 97), (31, 65), (2, 1000)]


def _codes(shape: tuple[int, int], bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)  # (rows, cols)
    codes[0, 0], codes[-1, -1] = 2**bits - 1, 0  # the extreme codes are always there
    return codes


def every_case(test):
    """Run `test` for every width, odd shape and packed dimension."""
    for name, values in (("dim", [1, 0]), ("shape", SHAPES), ("bits", BITS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes - 2 ** (bits - 1)).to(torch.int8)


@every_case
def test_pack_is_compressed_tensors_pack_to_int32(bits, shape, dim):
    codes = _codes(shape, bits, seed=bits * 1000 + shape[0])
    ours = pack(codes, bits, dim=dim)
    theirs = ct.pack_to_int32(_signed(codes, bits), bits, packed_dim=dim)
    assert ours.dtype == theirs.dtype == torch.int32
    assert ours.shape == theirs.shape
    assert ours.shape[dim] == -(-shape[dim] * bits // 32)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} words differ"


@every_case
def test_unpack_inverts_pack_and_reads_compressed_tensors_words(bits, shape, dim):
    codes = _codes(shape, bits, seed=bits * 1000 + shape[1])
    words = pack(codes, bits, dim=dim)
    assert torch.equal(unpack(words, bits, shape[dim], dim=dim), codes)
    theirs = ct.pack_to_int32(_signed(codes, bits), bits, packed_dim=dim)
    assert torch.equal(unpack(theirs, bits, shape[dim], dim=dim), codes)  # we read what they write
    back = ct.unpack_from_int32(words, bits, torch.Size(shape), packed_dim=dim)
    assert torch.equal(back, _signed(codes, bits))  # they read what we write


@pytest.mark.parametrize("bits", BITS)
def test_written_linear_tensors_are_compressed_tensors_layout(bits):
    """What the writer stores for an asymmetric grouped linear: weight_packed packed along the input, the zero point
    (out, groups) packed along the output, as compressed-tensors' compressor packs them."""
    out_f, in_f, group = 13, 40, 8  # 5 groups per row; neither dimension a whole number of words
    codes = _codes((out_f, in_f), bits, seed=bits)
    zero = _codes((out_f, in_f // group), bits, seed=bits + 1)
    record = SimpleNamespace(bits=bits, sym=False, shape=(out_f, in_f), packed=pack(codes, bits),
                             scale=torch.rand(out_f, in_f // group) + 0.5, zero=zero,
                             g_idx=torch.arange(in_f, dtype=torch.int32) // group, ordered_groups=True)
    stored = quantized_tensors("m", record, torch.float16)
    assert set(stored) == {"m.weight_packed", "m.weight_scale", "m.weight_shape", "m.weight_zero_point"}
    assert torch.equal(stored["m.weight_packed"], ct.pack_to_int32(_signed(codes, bits), bits, packed_dim=1))
    assert torch.equal(stored["m.weight_zero_point"], ct.pack_to_int32(_signed(zero, bits), bits, packed_dim=0))
    assert stored["m.weight_zero_point"].shape == (-(-out_f * bits // 32), in_f // group)
    assert stored["m.weight_shape"].tolist() == [out_f, in_f]
