"""Which activation dtype torch's CPU int4 kernel can run at speed, and what each costs in accuracy, in one run.

    python benchmarks/cpu_kernel_paths.py [--threads 2] [--repeats 5]

`aten._weight_int4pack_mm_for_cpu` takes bfloat16, float16 or float32 activations (with scales and offsets of the
same dtype). Issue 17 asks for greedy tokens identical to the float32 reference; that needs float32 (or at least
float16) arithmetic, which is only worth having if it is fast. This times one decoding step's 210 decoder
projections of SmolLM2-135M (30 blocks x q, k, v, o, gate, up, down at their shapes, batch 1, a separate weight per
projection so that weights stream from memory as in decoding) through each path, beside dense float32 and bfloat16
`F.linear` on the same weights, and measures each path's output error against float64 arithmetic on the same
quantized weights (4-bit g64 codes with float16 scales, activations N(0, 1)). Writes docs/results/cpu_kernel_paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = ROOT / "docs" / "results" / "cpu_kernel_paths"

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN),
          (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # (out, in) of q, k, v, o, gate, up, down
BLOCKS, GROUP = 30, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per path (the best is kept)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torch.nn.functional as F

    from export.kernels.cpu import pack_int4

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = []  # (codes, scale, zero) per projection
    for _ in range(BLOCKS):
        for out_f, in_f in SHAPES:
            codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.int32)
            scale = (torch.rand(out_f, in_f // GROUP, generator=gen) * 0.02 + 0.005).half()
            zero = torch.full((out_f, in_f // GROUP), 8.0)
            layers.append((codes, scale, zero))

    def dense(codes, scale, zero):  # (out, in) float32: scale * (code - zero), one group of GROUP columns per scale
        return (codes.float() - zero.repeat_interleave(GROUP, 1)) * scale.float().repeat_interleave(GROUP, 1)

    packed = [pack_int4(c, s, z, GROUP) for c, s, z in layers]
    fp32 = [dense(*lay) for lay in layers]
    bf16 = [w.bfloat16() for w in fp32]
    xs = {in_f: torch.randn(1, in_f, generator=gen) for in_f in (HIDDEN, INTERMEDIATE)}

    def scale_zero(scale, zero, dtype):  # (in / GROUP, out, 2): the kernel's S and Z (w = (q - 8) S + Z), from the
        s = scale.float()                # float16 scales directly (pack_int4 keeps them in bfloat16, as ours runs)
        return torch.stack([s, s * (8 - zero)], -1).transpose(0, 1).contiguous().to(dtype)

    def kernel(dtype):
        cast = [(p.packed, scale_zero(s, z, dtype)) for p, (_, s, z) in zip(packed, layers, strict=True)]
        xd = {k: v.to(dtype) for k, v in xs.items()}
        return lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(xd[layers[i][0].shape[1]], cast[i][0], GROUP,
                                                                  cast[i][1])

    paths = {
        "dense float32 F.linear": lambda i: F.linear(xs[layers[i][0].shape[1]], fp32[i]),
        "dense bfloat16 F.linear": lambda i: F.linear(xs[layers[i][0].shape[1]].bfloat16(), bf16[i]),
        "int4 kernel, bfloat16 activations (ours)": kernel(torch.bfloat16),
        "int4 kernel, float16 activations": kernel(torch.float16),
        "int4 kernel, float32 activations": kernel(torch.float32),
    }
    exact = [(xs[c.shape[1]].double() @ w.double().T) for w, (c, _, _) in zip(fp32, layers, strict=True)]
    errors = {}
    for name, call in paths.items():  # warm-up, and the error against float64
        errors[name] = max(float(((call(i).double() - e).abs().max() / e.abs().max())) for i, e in enumerate(exact))
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(args.repeats):  # the paths alternate, so that the machine's noise hits each alike
        for name, call in paths.items():
            t0 = time.perf_counter()
            for i in range(len(layers)):
                call(i)
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = [{"path": name, "ms per step (210 projections)": round(best[name] * 1e3, 2),
             "max error / max |y|": f"{errors[name]:.1e}"} for name in paths]
    base = rows[0]["ms per step (210 projections)"]
    for r in rows:
        r["x dense float32 speed"] = round(base / r["ms per step (210 projections)"], 2)

    from _harness import write_results

    write_results(OUT, "CPU int4 kernel: activation dtype, speed and accuracy", __file__,
                  {"threads": args.threads, "cpu": _cpu(),
                   "weights": f"{BLOCKS} blocks x 7 projections of SmolLM2-135M, 4-bit codes, g{GROUP}, float16 "
                              "scales (48 MB packed, 428 MB in float32)",
                   "timing": f"batch 1, one pass through the 210 projections, best of {args.repeats} (the paths alternate)",
                   "error": "max over projections of max |y - y_float64| / max |y_float64|, same quantized weights"},
                  rows)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
