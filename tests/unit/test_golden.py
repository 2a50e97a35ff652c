"""Golden artifacts (tests/golden/): the real pipeline, run again here, writes the committed artifacts byte for byte;
the committed ones load to the stored logits and pass `compress verify`. A format change is a deliberate act:
regenerate with `python -m tests.golden.make_golden` and say in the commit what changed and why."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from compress.cli import cli
from tests.golden import make_golden as golden

REGENERATE = ("if this change of the artifact format is intended, regenerate the golden artifacts deliberately with "
              "`python -m tests.golden.make_golden` and commit them, saying what changed and why (docs/format.md, "
              "'The golden artifacts')")

# What legitimately differs between two runs of the same recipe on the same machine; exactly these keys are removed
# before the JSON files are compared (each must be present, so that a renamed field is noticed here):
MANIFEST_VARYING = [
    ("created",),  # creation time
    ("versions",),  # package versions
    ("source", "path"),  # the source folder's absolute path
    # hashes of the two files that hold timings (below); verify checks them against the files themselves
    ("files", "report.json"),
    ("files", "README.md"),
]
REPORT_VARYING = [
    ("source", "path"),  # absolute path
    ("seconds",),  # timings
    ("phases",),
    ("peak_memory_mb",),
    ("resident_at_start_mb",),
    ("passes", "*", "seconds"),
]
# the model card's pass headings carry the pass's wall time in seconds: "## passes[1]: gptq (1 s)"
CARD_TIMING = re.compile(r"^(## passes\[\d+\]: \S+) \(\d+ s\)$", re.MULTILINE)
LOGIT_ATOL = 1e-5  # export.load on another CPU (other SIMD widths) may round a last bit differently


def _drop(data, path: tuple[str, ...], where: str) -> None:
    """Replace the value at `path` ("*" = every list item) with a placeholder; refuse a path that is not there."""
    head, rest = path[0], path[1:]
    items = list(range(len(data))) if head == "*" else [head]
    for key in items:
        if head != "*" and key not in data:
            raise AssertionError(f"{where}: the varying field {'.'.join(path)} is gone; update {__file__}")
        if rest:
            _drop(data[key], rest, where)
        else:
            data[key] = "<varies>"


def _comparable(folder: Path, name: str) -> bytes | dict | str:
    """A file's content as compared: bytes, or JSON / text without exactly the fields that vary between runs."""
    path = folder / name
    if name in ("manifest.json", "report.json"):
        data = json.loads(path.read_text())
        for field in MANIFEST_VARYING if name == "manifest.json" else REPORT_VARYING:
            _drop(data, field, str(path))
        return data
    if name == "README.md":
        text, n = CARD_TIMING.subn(r"\1 (<varies> s)", path.read_text())
        passes = len(json.loads((folder / "report.json").read_text())["passes"])
        assert n == passes, f"{path}: {n} timed pass headings for {passes} passes; update CARD_TIMING"
        return text
    return path.read_bytes()


def _text_diff(want, got) -> str:
    """The first lines of a unified diff of two compared contents (JSON shown sorted and indented)."""
    def as_lines(content) -> list[str]:
        if isinstance(content, dict):
            return json.dumps(content, indent=1, sort_keys=True).splitlines()
        return (content.decode("utf-8", "replace") if isinstance(content, bytes) else content).splitlines()

    lines = list(difflib.unified_diff(as_lines(want), as_lines(got), "golden", "regenerated", lineterm="", n=1))
    return "\n" + "\n".join(lines[:30]) + "\n"


def _tensor_diff(want: Path, got: Path) -> str:
    """Which tensors two safetensors files disagree on (missing on one side, or other dtype, shape or values)."""
    a, b = load_file(want), load_file(got)
    same = lambda k: a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])  # noqa: E731
    names = sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not same(k)]
    return f" (tensors that differ: {', '.join(names[:10]) or 'none: only the file layout'})"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> dict[str, Path]:
    return golden.build(tmp_path_factory.mktemp("golden"))


# On another kind of CPU than the one that wrote the golden artifacts (golden.machine(): AVX2 vs AVX512, Intel vs AMD),
# MKL and torch's vector kernels sum in other orders: FLAP's compensation biases move by float32 ulps, and a GPTQ
# rounding decision near a tie, or an MSE scale choice, flips here and there (measured, Intel AVX512 against the
# AMD AVX2 that wrote them: at most 6.3% of one tensor's elements, 0.14% of the artifact's). A format change (names,
# dtypes, shapes, packing order, bit layout) changes most elements. So there the comparison is: everything but the
# numbers exact, each tensor either within NEAR_RTOL of the golden one or with at most NEAR_TENSOR of its elements
# different, at most NEAR_TOTAL of all elements different, and measured numbers in the report and card within
# NEAR_NUMBER (relative).
NEAR_RTOL = 1e-5  # of the tensor's largest magnitude: last-bit differences of float sums
NEAR_TENSOR = 0.15
NEAR_TOTAL = 0.02
NEAR_NUMBER = 0.02
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def _near_tensors(want: Path, got: Path) -> str | None:
    """Why two safetensors files are not near (None when they are): names, dtypes, shapes exact; values as above."""
    a, b = load_file(want), load_file(got)
    if sorted(a) != sorted(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:10]}"
    differing = total = 0
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype} {tuple(x.shape)} against {y.dtype} {tuple(y.shape)}"
        total += x.numel()
        if torch.equal(x, y):
            continue
        if x.is_floating_point() and float((x.double() - y.double()).abs().max()) <= NEAR_RTOL * float(
                x.double().abs().max()):
            continue
        n = int((x != y).sum())
        if n > NEAR_TENSOR * x.numel():
            return f"{k}: {n} of {x.numel()} elements differ"
        differing += n
    if differing > NEAR_TOTAL * total:
        return f"{differing} of {total} elements differ"
    return None


def _near_json(want, got, where: str = "") -> str | None:
    """Why two JSON values are not near: equal, but numbers within NEAR_NUMBER and sha256 fields ignored."""
    if isinstance(want, dict) and isinstance(got, dict):
        if sorted(want) != sorted(got):
            return f"{where}: keys {sorted(set(want) ^ set(got))}"
        for k in want:
            if k != "sha256" and (why := _near_json(want[k], got[k], f"{where}.{k}")):
                return why
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{where}: {len(want)} items against {len(got)}"
        return next((w for i, (x, y) in enumerate(zip(want, got, strict=True))
                     if (w := _near_json(x, y, f"{where}[{i}]"))), None)
    numbers = (int, float)
    if isinstance(want, numbers) and isinstance(got, numbers) and not isinstance(want, bool):
        return None if abs(want - got) <= NEAR_NUMBER * max(abs(want), abs(got)) else f"{where}: {want} against {got}"
    return None if want == got else f"{where}: {want!r} against {got!r}"


def _near_text(want: str, got: str) -> str | None:
    """Why two model cards are not near: the same text around the numbers, the numbers within NEAR_NUMBER."""
    if NUMBER.sub("#", want) != NUMBER.sub("#", got):
        return _text_diff(want, got)
    for x, y in zip(NUMBER.findall(want), NUMBER.findall(got), strict=True):
        a, b = float(x.replace(",", "")), float(y.replace(",", ""))
        if abs(a - b) > NEAR_NUMBER * max(abs(a), abs(b)):
            return f"{x} against {y}"
    return None


@pytest.mark.parametrize("name", list(golden.RECIPES))
def test_pipeline_writes_the_golden_bytes(regenerated, name):
    want_dir, got_dir = golden.GOLDEN / name, regenerated[name]
    want_files = sorted(p.name for p in want_dir.iterdir())
    got_files = sorted(p.name for p in got_dir.iterdir())
    assert got_files == want_files, f"{name}: files {got_files}, golden {want_files}; {REGENERATE}"
    exact = golden.machine() == golden.written_on()
    for f in want_files:
        want, got = _comparable(want_dir, f), _comparable(got_dir, f)
        if want == got:
            continue
        if exact:
            detail = (_tensor_diff(want_dir / f, got_dir / f) if f.endswith(".safetensors")
                      else _text_diff(want, got))
            pytest.fail(f"{name}/{f} differs from tests/golden/{name}/{f}{detail}; {REGENERATE}")
        why = (_near_tensors(want_dir / f, got_dir / f) if f.endswith(".safetensors") else
               _near_json(want, got) if isinstance(want, dict) else
               _near_text(want, got) if isinstance(want, str) and isinstance(got, str) else "bytes differ")
        assert why is None, (f"{name}/{f} is not near tests/golden/{name}/{f} (this CPU: {golden.machine()}, the "
                             f"golden's: {golden.written_on()}): {why}; {REGENERATE}")


def test_near_comparison_catches_a_format_change(tmp_path):
    """The tolerant comparison (another CPU) still fails on what a format change does: another packing of the codes,
    another dtype, a renamed tensor; and passes a last-bit difference and a few flipped codes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"p.weight_packed": torch.randint(-2**31, 2**31 - 1, (64, 8), generator=g, dtype=torch.int32),
            "p.bias": torch.randn(64, generator=g)}
    save_file(base, tmp_path / "want.safetensors")

    def near(**change) -> str | None:
        save_file({**base, **change}, tmp_path / "got.safetensors")
        return _near_tensors(tmp_path / "want.safetensors", tmp_path / "got.safetensors")

    flipped = base["p.weight_packed"].clone()
    flipped[:4, 0] ^= 1
    assert near(**{"p.bias": base["p.bias"] * (1 + 2**-23)}) is None
    assert near(**{"p.weight_packed": flipped}) is None
    assert "elements differ" in near(**{"p.weight_packed": base["p.weight_packed"].flip(1).contiguous()})
    assert "elements differ" in near(**{"p.weight_packed": base["p.weight_packed"].t().contiguous().view(64, 8)})
    assert "torch.float16" in near(**{"p.bias": base["p.bias"].half()})
    assert _near_json({"a": [1.0, "x"]}, {"a": [1.001, "x"]}) is None
    assert _near_json({"a": [1.0, "x"]}, {"a": [1.1, "x"]}) == ".a[0]: 1.0 against 1.1"
    assert _near_text("| 2 | 0.03718 |", "| 2 | 0.0371 |") is None
    assert _near_text("| 2 | 0.03718 |", "| 3 | 0.03718 |") == "2 against 3"


@pytest.mark.parametrize("name", list(golden.RECIPES))
def test_golden_artifact_loads_to_the_stored_logits(name):
    want = golden.expected_logits()[name]
    got = golden.logits(golden.GOLDEN / name)
    assert got.shape == want.shape == (1, golden.INPUT_IDS.shape[1], 384)
    diff = float((got - want).abs().max())
    assert diff <= LOGIT_ATOL, f"{name}: export.load gives logits {diff:.2e} away from the stored ones; {REGENERATE}"
    assert float(want.std()) > 0.01  # real logits, not a constant


@pytest.mark.parametrize("name", list(golden.RECIPES))
def test_compress_verify_passes_on_golden(name):
    res = CliRunner().invoke(cli, ["verify", str(golden.GOLDEN / name)])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output


def test_golden_holds_every_tensor_kind():
    """The committed artifacts cover what the format stores, so regenerating cannot silently drop a kind."""
    mixed = json.loads((golden.GOLDEN / "mixed" / "manifest.json").read_text())
    schemes = mixed["quantization"]
    assert {s["bits"] for s in schemes.values()} == {2, 3, 4, 8}
    assert {n.rsplit(".", 1)[1] for n, s in schemes.items() if not s["sym"]} == {"down_proj"}
    assert {s["group_size"] for s in schemes.values()} == {-1, 16}
    # act_order without static groups: a g_idx wherever there is more than one group (o_proj has one per row)
    assert all(s["ordered"] == (s["group_size"] == -1) for s in schemes.values())
    tensors = mixed["tensors"]
    for n, s in schemes.items():
        assert f"{n}.weight_packed" in tensors and (f"{n}.weight_g_idx" in tensors) == (not s["ordered"]), n
        assert (f"{n}.weight_zero_point" in tensors) == (not s["sym"]), n
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied
    config = json.loads((golden.GOLDEN / "mixed" / "config.json").read_text())
    assert config["model_type"] == "compress_pruned"
    assert len({(l["num_key_value_heads"], l["intermediate_size"]) for l in config["layers"]}) > 1  # per-layer widths
    assert all(l["bias"] == ["o_proj", "down_proj"] for l in config["layers"])  # FLAP compensation

    gptq = json.loads((golden.GOLDEN / "gptq" / "manifest.json").read_text())
    config = json.loads((golden.GOLDEN / "gptq" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == "gptq"
    assert config["num_key_value_heads"] < 3 and config["attention_bias"] and config["mlp_bias"]  # uniform, pruned
    assert len(gptq["quantization"]) == 3 * 7
    stored = load_file(golden.GOLDEN / "gptq" / "model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored if ".layers.0.self_attn.q_proj." in k} == {
        "qweight", "qzeros", "scales", "g_idx", "bias"}
    assert stored["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert float(stored["model.layers.0.self_attn.q_proj.bias"].abs().max()) == 0  # a zero bias the stock flag implies
    assert "lm_head.weight" not in stored
