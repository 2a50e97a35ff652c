"""compress run with execution: stream on a synthetic checkpoint: the same weight bytes (sha256) and perplexities as
the in-memory run, the report says which ran, recipes the streamed run cannot do are refused before work (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.models.synthetic import SyntheticLlama, write_synthetic
from compress.recipe import load_recipe

SPEC = SyntheticLlama(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=4)


def _recipe(tmp: Path, model: Path, execution: str | None, passes: list[dict], export_dtype: str | None = None) -> Path:
    """A small recipe over `model` (also used by test_stream_flap.py); `execution` None leaves the field unset."""
    data = {"name": "stream-run", "model": str(model), "seed": 0,
            "calibration": {"source": "pydoc", "windows": 4, "seq_len": 32, "batch_size": 2}, "passes": passes,
            "evaluate": {"seq_len": 32, "max_windows": 2, "extra": [], "prompts": []},
            **({"execution": execution} if execution else {}),
            **({"export": {"dtype": export_dtype}} if export_dtype else {})}
    path = tmp / f"recipe-{execution}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights_sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


GPTQ = [{"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": True, "damp": 0.1}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("stream_run") / "model", SPEC, shard_mb=0.5)


def test_streamed_run_writes_the_in_memory_runs_weights(model, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    runner = CliRunner()
    for execution in ("memory", "stream"):
        result = runner.invoke(cli, ["run", str(_recipe(tmp_path, model, execution, GPTQ)), "--out",
                                     str(tmp_path / execution)])
        assert result.exit_code == 0, result.output
    memory, stream = (json.loads((tmp_path / e / "report.json").read_text()) for e in ("memory", "stream"))
    assert _weights_sha(tmp_path / "memory") == _weights_sha(tmp_path / "stream")
    assert stream["execution"] == "stream" and "execution" not in memory
    assert stream["quality"] == memory["quality"]  # dense and compressed perplexities, streamed the same
    assert stream["params"] == memory["params"] and stream["decoder_params"] == memory["decoder_params"]
    assert stream["streamed_peak_weights_mb"] == pytest.approx(49152 * 64 * 4 / 2**20, abs=0.1)  # the embeddings
    assert stream["verify"]["max_abs_logit_diff"] < 1e-4 and stream["verify"]["windows"] == 2
    assert (tmp_path / "stream" / "recipe.yaml").read_text().count("execution: stream") == 1


def test_refused_before_work(model, tmp_path):
    cfsp = [{"pass": "cfsp", "target": 0.3}]
    result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, "stream", cfsp)), "--out",
                                      str(tmp_path / "cfsp")])
    assert result.exit_code == 2
    assert "passes.0: pass 'cfsp' does not stream yet" in result.output
    assert not (tmp_path / "cfsp").exists()
    result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, "stream", GPTQ)), "--out",
                                      str(tmp_path / "resumed"), "--resume"])
    assert result.exit_code == 2 and "does not resume yet" in result.output


def test_execution_field():
    base = {"name": "x", "passes": GPTQ}
    assert "execution" not in load_recipe(base).to_dict()  # the default: recipes read as before the field
    assert load_recipe({**base, "execution": "auto"}).to_dict()["execution"] == "auto"
    with pytest.raises(Exception, match="execution"):
        load_recipe({**base, "execution": "disk"})


def test_large_allocations_are_mapped_only_when_memory_is_tight(model, tmp_path):
    """A run with room to spare leaves the allocator alone (mapping costs a page fault per 4 KB of every large
    tensor); one whose estimated need is above TIGHT of its limit maps large allocations (export/heap.py). Each run in
    its own process: the allocator setting is process-wide."""
    script = ("import sys; from compress.models import streaming; streaming.TIGHT = float(sys.argv[1]); "
              "from compress.cli import cli; cli(sys.argv[2:])")
    env = {**os.environ, "COMPRESS_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    mapped = {}
    for tight in (0.5, 0.0):  # 0.0: any need is tight
        out = tmp_path / f"tight-{tight}"
        res = subprocess.run([sys.executable, "-c", script, str(tight), "run",
                              str(_recipe(tmp_path, model, "stream", GPTQ)), "--out", str(out)],
                             capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
        assert res.returncode == 0, res.stderr[-3000:]
        mapped[tight] = json.loads((out / "report.json").read_text())["large_allocations_mapped"]
    assert mapped == {0.5: False, 0.0: platform.libc_ver()[0] == "glibc"}
