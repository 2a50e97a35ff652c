"""GPU throughput of the Triton low-bit linear kernels (export/kernels/triton_linear.py) on Llama-3-8B and 70B layer
shapes, batch 1 and 16, at 2, 3, 4 and 8 bits, beside torch's float16 matmul: GB/s of weight bytes read (packed
codes + float16 scales + zero points when asymmetric) against the device's measured copy bandwidth.

    python benchmarks/gpu_gemv.py              # one GPU, a few minutes: docs/results/gpu_gemv.{md,json}
    python benchmarks/gpu_gemv.py --dry-run    # CPU, interpreted kernels, tiny shapes: this script's own code

Each timing replays a CUDA graph of calls that cycle through enough weight copies to exceed 4x the L2 cache, so
weights come from memory and no launch overhead is counted. Every row also checks the kernel against the torch
reference (max error over max |reference|). Exits 2 without a CUDA device (unless --dry-run)."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (in, out) of the decoder projections: q/o (and k/v widened) 8B, gate/up 8B, down 8B, gate/up 70B, down 70B
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
SHAPES_8B = SHAPES[:3]
DRY_SHAPES = [(96, 64), (160, 45)]
BARS = {4: 0.70, 3: 0.60, 2: 0.60}  # issue 17: fraction of copy bandwidth at batch 1 on the 8B shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--group", type=int, default=128, help="group size (input columns per scale; -1: one per row)")
    ap.add_argument("--asym", action="store_true", help="asymmetric: packed zero points read too")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a few tile shapes beside the default and keep the fastest")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, nothing timed")
    ap.add_argument("--out", default=None, help="default docs/results/gpu_gemv (dry run: artifacts/gpu_gemv-dry-run)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (torch does not import it)

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing run. "
              "Try --dry-run to exercise the script on CPU.")
        return 2
    from _harness import write_results

    from export.kernels import triton_linear as kernels

    if not kernels.available():
        print("triton is not installed (pip install -e '.[gpu]'); nothing run")
        return 2
    copy_gbs = _copy_bandwidth(device, 2**20 if args.dry_run else 2**30)
    l2 = 0 if args.dry_run else torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for k_in, n_out in DRY_SHAPES if args.dry_run else SHAPES:
        fp16 = _fp16_row(k_in, n_out, args.batch, device, l2, args.dry_run)
        for bits in args.bits:
            for batch in args.batch:
                row = _kernel_row(kernels, k_in, n_out, bits, batch, args, device, l2, copy_gbs)
                row["fp16 matmul us"] = fp16[batch]
                row["x fp16"] = round(fp16[batch] / row["us"], 2) if row["us"] else ""
                rows.append(row)
                print(row, flush=True)
    gpu = "none (dry run: interpreted on CPU, times meaningless)" if args.dry_run else torch.cuda.get_device_name(0)
    bars = [r for r in rows if r["bar"] != ""]
    meta = {"torch": torch.__version__, "triton": _triton_version(), "gpu": gpu,
            "copy bandwidth GB/s": round(copy_gbs, 1),
            "scheme": f"group {args.group}, {'asymmetric' if args.asym else 'symmetric'}, float16 x and scales",
            "bar (batch 1, 8B shapes)": f"{sum(r['bar'] == 'met' for r in bars)} of {len(bars)} rows met "
                                        "(70% of copy bandwidth at 4 bits, 60% at 3 and 2)",
            "columns": "in x out: the weight's (input, output) widths; weight MB: codes + scales (+ zeros) read per "
                       "call; GB/s: those bytes over the kernel time; % copy: of the copy bandwidth (read + write "
                       "bytes of a 1 GiB device copy over its time); x fp16: torch float16 matmul time over ours; "
                       "err: max |kernel - reference| / max |reference|"}
    out = Path(args.out or (ROOT / "artifacts" / "gpu_gemv-dry-run" if args.dry_run
                            else ROOT / "docs" / "results" / "gpu_gemv"))
    write_results(out, "Triton low-bit linear kernels: weight GB/s against device copy bandwidth", __file__, meta, rows)
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def _time_us(fn, calls_per_run: int, dry_run: bool) -> float:
    """Microseconds per call of fn() (which makes `calls_per_run` calls): median of CUDA-graph replays; one plain
    wall-clock run in a dry run."""
    import torch

    if dry_run:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6 / calls_per_run
    fn()  # compile and warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_run)
    return statistics.median(times)


def _copy_bandwidth(device: str, n_bytes: int) -> float:
    """GB/s of a device-to-device copy of n_bytes: (read + write bytes) / median time."""
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src), 1, device == "cpu")
    return 2 * n_bytes / us / 1e3


def _copies(bytes_each: int, l2: int) -> int:
    """How many weight copies to cycle through so that one pass reads at least 4x the L2 cache from memory."""
    return max(1, math.ceil(4 * l2 / bytes_each))


def _fp16_row(k_in: int, n_out: int, batches: list[int], device: str, l2: int, dry_run: bool) -> dict[int, float]:
    """Microseconds of torch's float16 x (batch, in) @ W^T (in, out) per batch size."""
    import torch
    import torch.nn.functional as F

    weights = [torch.randn(n_out, k_in, device=device).half()
               for _ in range(_copies(2 * n_out * k_in, l2))]  # (out, in) each
    result = {}
    for batch in batches:
        x = torch.randn(batch, k_in, device=device).half()
        result[batch] = round(_time_us(lambda x=x: [F.linear(x, w) for w in weights], len(weights), dry_run), 2)
    return result


def _kernel_row(kernels, k_in: int, n_out: int, bits: int, batch: int, args, device: str, l2: int,
                copy_gbs: float) -> dict:
    """One row: the fastest of the default launch and (with --sweep) a few others, its GB/s and its error."""
    import torch

    from export.kernels.reference import dequantize_packed

    group = k_in if args.group == -1 else args.group
    n_groups = -(-k_in // group)
    gen = torch.Generator(device=device).manual_seed(bits * 7 + batch)
    parts = []
    for _ in range(_copies(n_out * (-(-k_in * bits // 32) * 4 + n_groups * 2), l2) if l2 else 1):
        packed = torch.randint(-2**31, 2**31 - 1, (n_out, -(-k_in * bits // 32)), dtype=torch.int32, device=device,
                               generator=gen)  # every bit pattern is a valid row of codes
        scale = (torch.rand(n_out, n_groups, device=device, generator=gen) * 0.02 + 0.001).half()
        zero = torch.randint(-2**31, 2**31 - 1, (-(-n_out * bits // 32), n_groups), dtype=torch.int32,
                             device=device, generator=gen) if args.asym else None
        parts.append((packed, scale, zero))
    weight_bytes = sum(t.numel() * t.element_size() for t in parts[0] if t is not None)
    x = torch.randn(batch, k_in, device=device, generator=gen).half()

    def call(p, cfg):
        return kernels.triton_linear(x, p[0], p[1], p[2], bits, args.group, n_out, k_in, config=cfg)

    n_sm = 1 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    default = kernels.default_config(batch, n_out, k_in, n_sm)
    configs = [default] + (_candidates(kernels, batch, args.dry_run) if args.sweep else [])
    timed = {cfg: _time_us(lambda c=cfg: [call(p, c) for p in parts], len(parts), args.dry_run)
             for cfg in dict.fromkeys(configs)}
    best = min(timed, key=lambda c: timed[c])
    rows = min(n_out, 256)  # the reference (on CPU) for the first output rows; 256 rows fill whole zero words
    packed, scale, zero = parts[0][0].cpu(), parts[0][1].cpu(), None if parts[0][2] is None else parts[0][2].cpu()
    weight = dequantize_packed(packed[:rows], scale[:rows], None if zero is None else zero[:rows * bits // 32],
                               (rows, k_in), bits, torch.arange(k_in) // group, torch.float16)  # (rows, in)
    ref = x.cpu().float() @ weight.float().T  # (batch, rows)
    err = float((call(parts[0], best)[:, :rows].cpu().float() - ref).abs().max() / ref.abs().max())
    gbs = weight_bytes / timed[best] / 1e3
    on_bar = batch == 1 and (k_in, n_out) in SHAPES_8B and bits in BARS
    return {"in x out": f"{k_in}x{n_out}", "bits": bits, "batch": batch, "weight MB": round(weight_bytes / 1e6, 2),
            "us": round(timed[best], 2), "GB/s": round(gbs, 1), "% copy": round(100 * gbs / copy_gbs, 1),
            "bar": ("met" if gbs >= BARS[bits] * copy_gbs else "missed") if on_bar else "",
            "tiles m/n/k/split": f"{best.block_m}/{best.block_n}/{best.block_k}/{best.split_k}",
            "default us": round(timed[default], 2), "err": f"{err:.1e}"}


def _candidates(kernels, batch: int, dry_run: bool) -> list:
    """A few tile shapes to try beside the default (one in a dry run, whose times mean nothing)."""
    cfg = kernels.KernelConfig
    if batch < 4:  # broadcast multiply-sum tiles, as the default picks there
        m = 1 << (batch - 1).bit_length()
        shapes = [cfg(m, 16, 256), cfg(m, 32, 256), cfg(m, 16, 512), cfg(m, 64, 128), cfg(m, 16, 256, 4),
                  cfg(m, 32, 256, num_warps=8)]
    else:  # tensor-core tiles
        m = 16 if batch <= 16 else 32 if batch <= 32 else 64
        shapes = [cfg(m, 32, 128), cfg(m, 64, 64), cfg(m, 64, 128), cfg(m, 128, 64), cfg(m, 64, 64, 4)]
    return shapes[:1] if dry_run else shapes


if __name__ == "__main__":
    raise SystemExit(main())
