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


@pytest.mark.parametrize("name", list(golden.RECIPES))
def test_pipeline_writes_the_golden_bytes(regenerated, name):
    want_dir, got_dir = golden.GOLDEN / name, regenerated[name]
    want_files = sorted(p.name for p in want_dir.iterdir())
    got_files = sorted(p.name for p in got_dir.iterdir())
    assert got_files == want_files, f"{name}: files {got_files}, golden {want_files}; {REGENERATE}"
    for f in want_files:
        want, got = _comparable(want_dir, f), _comparable(got_dir, f)
        if want != got:
            detail = (_tensor_diff(want_dir / f, got_dir / f) if f.endswith(".safetensors")
                      else _text_diff(want, got))
            pytest.fail(f"{name}/{f} differs from tests/golden/{name}/{f}{detail}; {REGENERATE}")


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
