"""The golden artifacts: two tiny artifacts written by the real pipeline (`compress.api.run`), committed, and checked
byte for byte by tests/unit/test_golden.py, so that a change of what lands on disk is a deliberate act. Byte for byte
holds on the kind of CPU that wrote them (machine.json); another kind rounds a last bit differently in a few places
(see test_golden.py).

    python -m tests.golden.make_golden      # rewrite tests/golden/{mixed,gptq}/ and expected_logits.safetensors

Regenerate only when the format is meant to change; say in the commit what changed and why (docs/format.md).

- `mixed/`: adaptive FLAP (per-layer widths, compensation biases, the `compress_pruned` config), then GPTQ with
  act_order and no static groups (a g_idx where a row has several groups): 2-bit q/k/v_proj, 3-bit o_proj with one
  scale per row (so no g_idx), 8-bit gate/up_proj, 4-bit asymmetric down_proj (a packed zero point);
  compressed-tensors naming; tied embeddings (no lm_head.weight).
- `gptq/`: uniform FLAP (a stock Llama config with attention_bias / mlp_bias and zero biases filled in), then RTN at
  4 bits in the GPTQ format (qweight / qzeros / scales / g_idx, fp16 scales).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).parent
SOURCE = "tiny-golden-source"  # the source model's folder, relative to the working folder of the run
LOGITS = "expected_logits.safetensors"
MACHINE = "machine.json"  # the kind of CPU arithmetic the committed artifacts were written with (machine())
SEED = 0
# the fixed input the expected logits are computed on: (1, 12) token ids below the tiny vocabulary
INPUT_IDS = torch.tensor([[0, 5, 17, 42, 99, 150, 201, 256, 300, 333, 7, 64]], dtype=torch.int64)
# small runs: the format, not the quality, is what these artifacts pin
SMALL = {"windows": 8, "seq_len": 64, "batch_size": 4}

RECIPES: dict[str, dict] = {
    "mixed": {
        "name": "golden-mixed",
        "model": SOURCE,
        "seed": SEED,
        "calibration": SMALL,
        "evaluate": {"enabled": False},
        "passes": [
            # head standardization: every layer loses a key-value group, so each stores both compensation biases
            {"pass": "flap", "target": 0.3, "structure": "adaptive", "round_to": 16, "standardize": "head"},
            {"pass": "gptq", "bits": 4, "group_size": 16, "act_order": True, "static_groups": False,
             "overrides": [{"pattern": r"\.(q|k|v)_proj$", "bits": 2},  # a fused group shares one scheme
                           {"pattern": r"\.o_proj$", "bits": 3, "group_size": -1},
                           {"pattern": r"\.(gate|up)_proj$", "bits": 8},
                           {"pattern": r"\.down_proj$", "sym": False}]},
        ],
    },
    "gptq": {
        "name": "golden-gptq",
        "model": SOURCE,
        "seed": SEED,
        "calibration": SMALL,
        "evaluate": {"enabled": False},
        "export": {"quant_format": "gptq"},
        "passes": [
            {"pass": "flap", "target": 0.3, "structure": "uniform", "round_to": 16},
            {"pass": "rtn", "bits": 4, "group_size": 16},
        ],
    },
}


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op thread count set to `n` for the block, then restored (the artifacts are written with one
    thread: GPTQ's torch.cholesky_inverse (MKL) rounds differently with 1 and 2 threads, and the artifacts must not
    depend on how many cores the machine has)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _env(name: str, value: str):
    """Environment variable `name` set to `value` for the block, then restored."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def make_source(folder: Path) -> Path:
    """The seeded tiny Llama (tests/tiny.py) the golden artifacts are made from, its config naming it SOURCE
    (`_name_or_path`, as a hub checkpoint names itself) so that the artifacts record a name, not the temporary
    folder's path; torch's global generator is restored afterwards (make_tiny_model seeds it)."""
    from tests.tiny import make_tiny_model

    with torch.random.fork_rng(devices=[]):
        folder = make_tiny_model(folder, "llama", seed=SEED)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["_name_or_path"] = SOURCE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def build(work: Path) -> dict[str, Path]:
    """Write the source model and every golden artifact under `work` (the run's working folder, so that recipes name
    the source by the relative path SOURCE); returns {name: artifact folder}."""
    from compress import api

    work = Path(work)
    out = {}
    # run state (journals) in `work`, never the user's cache, and no earlier session's state is found
    with contextlib.chdir(work), _threads(1), _env("COMPRESS_RUNS", str(work / "runs")):
        make_source(Path(SOURCE))
        for name, recipe in RECIPES.items():
            api.run(recipe, out=Path(name), log=lambda *_: None)
            out[name] = work / name
    return out


def machine() -> dict[str, str]:
    """What decides the last bits of the pipeline's float arithmetic on a CPU: the vector width torch's kernels and
    MKL dispatch to (AVX2 vs AVX512 reduce sums in other orders) and the vendor (MKL takes other paths on AMD)."""
    vendor = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "vendor": vendor}


def written_on() -> dict[str, str]:
    """machine() of the machine that wrote the committed artifacts."""
    return json.loads((GOLDEN / MACHINE).read_text())


def logits(artifact: Path) -> torch.Tensor:
    """(1, T, vocab) fp32 logits of the artifact, loaded with export.load, on INPUT_IDS."""
    import export

    model = export.load(artifact, dtype=torch.float32)
    with torch.no_grad(), _threads(1):
        return model(input_ids=INPUT_IDS, use_cache=False).logits


def expected_logits() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / LOGITS)


def main() -> None:
    """Regenerate the committed golden artifacts and their expected logits."""
    with tempfile.TemporaryDirectory() as tmp:
        made = build(Path(tmp))
        for name, folder in made.items():
            shutil.rmtree(GOLDEN / name, ignore_errors=True)
            shutil.copytree(folder, GOLDEN / name)
    save_file({name: logits(GOLDEN / name).contiguous() for name in RECIPES}, GOLDEN / LOGITS)
    (GOLDEN / MACHINE).write_text(json.dumps(machine(), indent=2) + "\n")
    size = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"wrote {', '.join(str(GOLDEN / n) for n in RECIPES)} and {GOLDEN / LOGITS}: {size / 1024:.0f} KiB in all")


if __name__ == "__main__":
    main()
