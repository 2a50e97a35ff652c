"""y = x W^T + b for W{2,3,4,8} x A16 weights as one Triton kernel family that reads the artifact's packed layout
(compressed-tensors `pack-quantized`, export/packing.py) directly: codes are unpacked in registers, never in memory.

Layout read: weight_packed (out, ceil(in*bits/32)) int32, each row one little-endian bit stream of codes (32 codes
fill `bits` words; 3-bit codes straddle words); weight_scale (out, n_groups); weight_zero_point (ceil(out*bits/32),
n_groups) int32 packed along the output dim (None: symmetric, zero 2^(bits-1)). Groups are contiguous runs of
`group_size` input columns (column k is in group k // group_size); act-order artifacts are served by permuting the
input columns once at load, which the caller does. Each weight is scale * (code - zero) computed in float32 and
rounded once to the artifact's weight dtype, as export/kernels/reference.py (the oracle) defines it; products
accumulate in float32.

Importable without triton: `available()` says whether the kernels exist. To run them on CPU tensors, set
TRITON_INTERPRET=1 before triton is first imported (torchao and others import it early, so in a fresh process: the
tests and `benchmarks/gpu_gemv.py --dry-run` do); slow, small shapes only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path does without; triton_linear then refuses
    triton = None

BITS = (2, 3, 4, 8)


def available() -> bool:
    """Whether triton is installed (the kernels exist; they run on CUDA tensors, or on CPU when interpreted)."""
    return triton is not None


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch: block_m rows of x, block_n output features, block_k input columns (a multiple of
    32) per step; split_k programs share one output tile's input columns and add their partial sums atomically."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def uses_dot(self) -> bool:
        """Tensor cores (tl.dot, which needs 16 rows) for block_m >= 16; a broadcast multiply-sum below."""
        return self.block_m >= 16


def default_config(m: int, n: int, k: int, n_sm: int) -> KernelConfig:
    """A launch shape for x (m, k) and n outputs on a device with n_sm multiprocessors: GEMV-like tiles (block_m x
    block_n x block_k products of 4096 values) below 4 rows, tensor-core tiles (rows padded to 16) from 4; input
    columns split until there are about two programs per multiprocessor."""
    if m < 4:
        block_m = triton.next_power_of_2(m)
        cfg = KernelConfig(block_m=block_m, block_n=16, block_k=256 // block_m)
    else:
        cfg = KernelConfig(block_m=16 if m <= 16 else 32 if m <= 32 else 64, block_n=64, block_k=64)
    programs = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    k_steps = triton.cdiv(k, cfg.block_k)
    split = max(1, min(triton.cdiv(2 * n_sm, programs), k_steps // 4))
    return KernelConfig(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


def triton_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                  weight_zero_point: torch.Tensor | None, bits: int, group_size: int, out_features: int,
                  in_features: int, bias: torch.Tensor | None = None, weight_dtype: torch.dtype | None = None,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in) float16/bfloat16/float32 -> (..., out) in x's dtype, with W (out, in) from the packed layout
    described above (group_size -1: one group per row; weight_dtype: what each weight is rounded to, default the
    scale's dtype). Raises RuntimeError without triton, ValueError on a bits value or a tensor shape that does not
    fit the layout."""
    if triton is None:
        raise RuntimeError("triton_linear needs triton (pip install triton; CUDA builds of torch include it)")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    group = in_features if group_size == -1 else group_size
    n_groups = -(-in_features // group)
    expected = {"x": (x.shape[-1], in_features), "weight_packed": (tuple(weight_packed.shape),
                                                                   (out_features, -(-in_features * bits // 32))),
                "weight_scale": (tuple(weight_scale.shape), (out_features, n_groups))}
    if weight_zero_point is not None:
        expected["weight_zero_point"] = (tuple(weight_zero_point.shape), (-(-out_features * bits // 32), n_groups))
    if bias is not None:
        expected["bias"] = (tuple(bias.shape), (out_features,))
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{name}: shape {got} does not fit {bits}-bit ({out_features}, {in_features}) weights "
                             f"in groups of {group}, expected {want}")
    if x.dtype not in _TL_DTYPE or weight_packed.dtype != torch.int32:
        raise ValueError(f"x must be float16/bfloat16/float32 and weight_packed int32, got {x.dtype}, "
                         f"{weight_packed.dtype}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()  # (M, K)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, out_features)
    n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    cfg = config or default_config(m, out_features, in_features, n_sm)
    if cfg.block_k % 32:
        raise ValueError(f"block_k must be a multiple of 32, got {cfg.block_k}")
    out = torch.zeros(m, out_features, device=x.device, dtype=torch.float32) if cfg.split_k > 1 else \
        torch.empty(m, out_features, device=x.device, dtype=x.dtype)  # (M, N)
    grid = (triton.cdiv(out_features, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    _qlinear_kernel[grid](
        x2, weight_packed.contiguous(), weight_scale.contiguous(),
        weight_packed if weight_zero_point is None else weight_zero_point.contiguous(),  # unread when symmetric
        weight_scale if bias is None else bias.contiguous(), out,
        m, out_features, in_features, weight_packed.shape[1], n_groups,
        BITS=bits, GROUP=group, SYM=weight_zero_point is None, HAS_BIAS=bias is not None,
        W_DTYPE=_TL_DTYPE[weight_dtype or weight_scale.dtype], USE_DOT=cfg.uses_dot,
        PRECISION="ieee" if x.dtype == torch.float32 else None, SPLIT_K=cfg.split_k,  # fp32: no tf32 rounding
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype).reshape(*lead, out_features)


if triton is not None:
    _TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    @triton.jit
    def _unpack_at(ptr, pos, stride, col, mask, BITS: tl.constexpr):
        """The code at bit `pos` of column `col` of a (words, stride) int32 array packed along dim 0."""
        word = pos // 32
        shift = (pos % 32).to(tl.uint32)
        lo = tl.load(ptr + word * stride + col, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(ptr + (word + 1) * stride + col, mask=mask & (pos % 32 + BITS > 32),
                     other=0).to(tl.uint32, bitcast=True)
        return (((lo >> shift) | ((hi << (31 - shift)) << 1)) & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _codes(packed_ptr, offs_n, mask_n, k0, n_words, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
        """Codes (BLOCK_N, BLOCK_K) int32 of rows offs_n, columns k0 .. k0 + BLOCK_K (k0 a multiple of 32)."""
        rows = packed_ptr + offs_n[:, None] * n_words
        if BITS == 3:  # 32 codes fill 3 words; 2 of every 32 straddle two words
            chunk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            word = 3 * chunk[None, :]  # (1, C)
            m = mask_n[:, None]
            u0 = tl.load(rows + word, mask=m & (word < n_words), other=0).to(tl.uint32, bitcast=True)
            u1 = tl.load(rows + word + 1, mask=m & (word + 1 < n_words), other=0).to(tl.uint32, bitcast=True)
            u2 = tl.load(rows + word + 2, mask=m & (word + 2 < n_words), other=0).to(tl.uint32, bitcast=True)
            pos = tl.arange(0, 32) * 3  # bit of code j within its chunk
            first = (pos // 32)[None, None, :]  # (1, 1, 32): which word holds its low bit
            shift = (pos % 32).to(tl.uint32)[None, None, :]
            cur = tl.where(first == 0, u0[:, :, None], tl.where(first == 1, u1[:, :, None], u2[:, :, None]))
            nxt = tl.where(first == 0, u1[:, :, None], u2[:, :, None])
            codes = ((cur >> shift) | ((nxt << (31 - shift)) << 1)) & 7  # (BLOCK_N, C, 32)
        else:  # whole codes per word
            PER_WORD: tl.constexpr = 32 // BITS
            word = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            words = tl.load(rows + word[None, :], mask=mask_n[:, None] & (word < n_words)[None, :], other=0)
            shift = tl.arange(0, PER_WORD) * BITS
            codes = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # (BLOCK_N, BLOCK_K/PER, PER)
        return tl.reshape(codes.to(tl.int32), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _qlinear_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, n_words, n_groups,
                        BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                        W_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of out (M, N), over the input-column steps pid_k, pid_k + SPLIT_K, ..."""
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k0 = step * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            codes = _codes(packed_ptr, offs_n, mask_n, k0, n_words, BITS, BLOCK_N, BLOCK_K)
            if GROUP % BLOCK_K == 0:  # one group per row in this step
                g = k0 // GROUP
                scale = tl.load(scale_ptr + offs_n * n_groups + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                if SYM:
                    zero = 1 << (BITS - 1)
                else:
                    zero = _unpack_at(zero_ptr, offs_n * BITS, n_groups, g, mask_n, BITS)[:, None]
            else:
                g = (offs_k // GROUP)[None, :]  # (1, BLOCK_K)
                gmask = mask_n[:, None] & mask_k[None, :]
                scale = tl.load(scale_ptr + offs_n[:, None] * n_groups + g, mask=gmask, other=0.0).to(tl.float32)
                if SYM:
                    zero = 1 << (BITS - 1)
                else:
                    zero = _unpack_at(zero_ptr, offs_n[:, None] * BITS, n_groups, g, gmask, BITS)
            w = ((codes - zero).to(tl.float32) * scale).to(W_DTYPE)  # (BLOCK_N, BLOCK_K): exact, rounded once
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_K)
            w = w.to(x.dtype)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)
else:
    _TL_DTYPE = {torch.float16: None, torch.bfloat16: None, torch.float32: None}
