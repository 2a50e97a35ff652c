"""The Triton kernels (export/kernels/triton_linear.py) against the torch reference (export/kernels/reference.py),
run on CPU under TRITON_INTERPRET=1: 2, 3, 4 and 8 bits, symmetric and asymmetric, per-group and per-row scales,
odd output widths, input widths that are no multiple of the group or of the 32-column step, every launch shape
(one row, a few rows, tensor-core tiles, split input columns). bfloat16 is broken in the interpreter, so float16 and
float32 activations are tested; shapes are small because each interpreted step costs milliseconds.

The interpreter must be on before triton is first imported (torchao, imported by other tests, imports it), so every
kernel call runs in one fresh process (this file run as a script, `_measure` per case) and the tests assert on what
it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.kernels.reference import dequantize_packed
from export.packing import pack

pytest.importorskip("triton", reason="triton (the gpu extra, part of the test extra) is not installed")

BITS = [2, 3, 4, 8]
# (group_size, out, in): a group smaller than a step; groups of 64 over 100 columns (the last holds 36, the last
# step is part padding); one group per row over 160 columns (5 steps of 32); output widths prime or odd
SHAPES = [(32, 37, 96), (64, 19, 100), (-1, 45, 160)]
ROWS = [1, 3, 20]  # the default launch: one row, a few (broadcast multiply-sum), tensor-core tiles (tl.dot)
MATCH = [{"kind": "match", "bits": b, "sym": s, "shape": sh, "dtype": d}
         for b in BITS for s in (True, False) for sh in SHAPES for d in ("float16", "float32")]
EXACT = [{"kind": "exact", "bits": b, "sym": s} for b in BITS for s in (True, False)]
SPLIT = [{"kind": "split", "bits": b} for b in (3, 4)]
ERRORS = [{"kind": "errors"}]


def _layer(bits: int, sym: bool, group_size: int, out_f: int, in_f: int, seed: int,
           scale_dtype: torch.dtype = torch.float16):
    """Random packed parts of one quantized linear and its reference weight (out, in), float32 exact products
    rounded once to the scale's dtype. Groups are contiguous (k // group_size), the reference is told so through
    g_idx: without one it assumes in / n_groups columns per group, which differs when in is no multiple of them."""
    gen = torch.Generator().manual_seed(seed)
    group = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // group)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
    codes[0, :2] = torch.tensor([0, 2**bits - 1])  # the extreme codes are always there
    packed = pack(codes, bits, dim=1)  # (out, ceil(in*bits/32))
    scale = (torch.rand(out_f, n_groups, generator=gen) * 0.02 + 0.005).to(scale_dtype)  # (out, G)
    zero = None if sym else pack(torch.randint(0, 2**bits, (out_f, n_groups), generator=gen), bits, dim=0)
    g_idx = torch.arange(in_f) // group
    weight = dequantize_packed(packed, scale, zero, (out_f, in_f), bits, g_idx)
    return packed, scale, zero, weight


def _error_over_bound(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> float:
    """max |y - x W^T (- b)| / bound, the reference in float64; <= 1 passes. Both sum the same exact products (a
    float16 x float16 or float32 x float32 weight product is exact or rounded once in float32), so they differ by
    float32 accumulation order, at most in * 2^-24 * sum |x w| (1e-5 of it bounds that for in <= 160), plus, for
    float16 outputs, the one rounding of the result (half an ulp: 2^-11 relative). NaN when y's shape or dtype is
    wrong."""
    if y.dtype != x.dtype or y.shape != (*x.shape[:-1], weight.shape[0]):
        return float("nan")
    x64, w64 = x.double().reshape(-1, x.shape[-1]), weight.double()
    ref = x64 @ w64.T + (0 if bias is None else bias.double())  # (M, out)
    bound = 1e-5 * (x64.abs() @ w64.abs().T) + (2**-11 * ref.abs() if y.dtype == torch.float16 else 0) + 1e-30
    return float(((y.double().reshape(ref.shape) - ref).abs() / bound).max())


def _measure(case: dict) -> dict:
    """Run one case's kernel calls (in the interpreted process) and return what the tests assert on."""
    from export.kernels import triton_linear as k

    if case["kind"] == "match":
        bits, sym, (group_size, out_f, in_f) = case["bits"], case["sym"], case["shape"]
        dtype = getattr(torch, case["dtype"])
        packed, scale, zero, weight = _layer(bits, sym, group_size, out_f, in_f, seed=bits * 100 + out_f)
        gen = torch.Generator().manual_seed(bits)
        ratios = {}
        for rows in ROWS:
            x = torch.randn(rows, in_f, generator=gen).to(dtype)
            y = k.triton_linear(x, packed, scale, zero, bits, group_size, out_f, in_f)
            ratios[rows] = _error_over_bound(y, x, weight.to(dtype))
        return ratios
    if case["kind"] == "exact":  # x = I reads each weight back alone: a sum with one non-zero term is exact
        bits, sym = case["bits"], case["sym"]
        packed, scale, zero, _ = _layer(bits, sym, 32, 29, 64, seed=bits, scale_dtype=torch.float32)
        weight = dequantize_packed(packed, scale, zero, (29, 64), bits, torch.arange(64) // 32, torch.float16)
        differ = {}
        for cfg in (k.KernelConfig(block_m=4, block_n=16, block_k=64), k.KernelConfig(16, 32, 32)):
            y = k.triton_linear(torch.eye(64), packed, scale, zero, bits, 32, 29, 64, weight_dtype=torch.float16,
                                config=cfg)
            differ[str(cfg)] = int((y != weight.float().T).sum()) if y.shape == (64, 29) else -1
        return differ
    if case["kind"] == "split":  # 3 programs per output tile, atomic float32 sums; bias added once; leading dims
        bits = case["bits"]
        packed, scale, zero, weight = _layer(bits, False, 32, 21, 192, seed=7)
        bias = torch.randn(21, generator=torch.Generator().manual_seed(1))
        x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(2))
        y = k.triton_linear(x, packed, scale, zero, bits, 32, 21, 192, bias=bias, config=k.KernelConfig(8, 16, 32, 3))
        return {"ratio": _error_over_bound(y, x, weight, bias)}
    packed, scale, zero, _ = _layer(4, False, 32, 8, 64, seed=0)
    x = torch.randn(1, 64)
    calls = {"bits": dict(bits=5, group_size=32, in_features=64), "scale": dict(bits=4, group_size=-1, in_features=64),
             "x": dict(bits=4, group_size=32, in_features=96),
             "block_k": dict(bits=4, group_size=32, in_features=64, config=k.KernelConfig(1, 16, 48))}
    messages = {}
    for name, kwargs in calls.items():
        try:
            k.triton_linear(x, packed, scale, zero, out_features=8, **kwargs)  # type: ignore[arg-type]
            messages[name] = "no error"
        except ValueError as e:
            messages[name] = str(e)
    return messages


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    """Every case measured in one fresh process with the interpreter on; keyed by the case's JSON."""
    cases = MATCH + EXACT + SPLIT + ERRORS
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__], input=json.dumps(cases), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(map(json.dumps, cases), json.loads(done.stdout.splitlines()[-1]), strict=True))


@pytest.mark.parametrize("case", MATCH, ids=lambda c: f"{c['bits']}bit-{'sym' if c['sym'] else 'asym'}-"
                                                      f"g{c['shape'][0]}-{c['shape'][1]}x{c['shape'][2]}-{c['dtype']}")
def test_kernel_matches_reference(measured, case):
    ratios = measured[json.dumps(case)]
    assert set(ratios) == {str(r) for r in ROWS}
    assert all(r <= 1 for r in ratios.values()), f"error / bound by rows of x: {ratios}"


@pytest.mark.parametrize("case", EXACT, ids=lambda c: f"{c['bits']}bit-{'sym' if c['sym'] else 'asym'}")
def test_kernel_weights_are_the_reference_weights_bit_for_bit(measured, case):
    """The unpacking, the group lookup and the one rounding to the artifact's weight dtype (float16 here, from
    float32 scales) are the reference's, for a broadcast tile and a tensor-core tile."""
    differ = measured[json.dumps(case)]
    assert len(differ) == 2 and all(n == 0 for n in differ.values()), f"weights differing per launch shape: {differ}"


@pytest.mark.parametrize("case", SPLIT, ids=lambda c: f"{c['bits']}bit")
def test_split_columns_bias_and_leading_dims(measured, case):
    assert measured[json.dumps(case)]["ratio"] <= 1


def test_bad_inputs_are_named(measured):
    messages = measured[json.dumps(ERRORS[0])]
    assert messages["bits"] == "bits must be one of (2, 3, 4, 8), got 5"
    assert messages["scale"] == ("weight_scale: shape (8, 2) does not fit 4-bit (8, 64) weights in groups of 64, "
                                 "expected (8, 1)")
    assert messages["x"] == "x: shape 64 does not fit 4-bit (8, 96) weights in groups of 32, expected 96"
    assert messages["block_k"] == "block_k must be a multiple of 32, got 48"


def test_module_imports_without_triton():
    """The loader imports this module on every machine; without triton it says so when called."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from export.kernels import triton_linear as k\n"
            "assert not k.available()\n"
            "try:\n    k.triton_linear(None, None, None, None, 4, 32, 1, 1)\n"
            "except RuntimeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "triton_linear needs triton" in done.stdout


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu_gemv.py's own code on CPU (interpreted kernels, tiny shapes): every bits x batch row, each
    checked against the reference (max error / max |reference| within float16 output rounding, 2^-11, doubled),
    both result files; without --dry-run and without CUDA it refuses by name with exit 2."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_gemv.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path / "gpu_gemv")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_gemv.json").read_text())["rows"]
    assert sorted((r["in x out"], r["bits"], r["batch"]) for r in rows) == sorted(
        (shape, bits, batch) for shape in ("96x64", "160x45") for bits in BITS for batch in (1, 16))
    assert all(float(r["err"]) < 2**-10 for r in rows), [r["err"] for r in rows]
    assert "weight GB/s against device copy bandwidth" in (tmp_path / "gpu_gemv.md").read_text()
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "no CUDA device visible to torch" in done.stdout


if __name__ == "__main__":  # the interpreted process: cases on stdin, one JSON list of results on the last line
    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests, with the interpreter on"
    print(json.dumps([_measure(c) for c in json.loads(sys.stdin.read())]))
