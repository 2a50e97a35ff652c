"""A model that cannot fit even streamed is refused before any work (exit 2), with the block's numbers, the memory
available and what to change; the need is docs/scale.md's memory model, checked term by term on a tiny skeleton."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import InputError
from compress.models import stream_fit
from compress.models.streaming import StreamedModel
from compress.models.synthetic import SyntheticLlama, write_synthetic

SPEC = SyntheticLlama(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=7)
VOCAB = 49152


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("stream_fit") / "model", SPEC, shard_mb=0.5)


def test_block_need_terms(folder):
    need = stream_fit.block_need(StreamedModel.open(folder).model, windows=4, seq_len=32, batch_size=2, logit_tokens=64,
                                   shard_bytes=2**20, process=5)
    params = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k and v, o, gate/up/down, two norms
    assert need.block == 4 * params == 147968
    assert need.statistics == 4 * (2 * 64**2 + 64**2 + 128**2)  # q/k/v and gate/up (in 64), o (64), down (128)
    assert need.solve == 4 * (7 * 128**2 + 4 * 64 * 128)  # down_proj: in 128 is the widest
    assert need.activations == 2 * 4 * 4 * 32 * 64
    assert need.ends == 4 * VOCAB * 64 + 3 * 4 * 64 * VOCAB  # the head (or embeddings), three sets of logits
    assert need.shard == 2**20 + 4 * VOCAB * 64  # a 1 MB shard (the model's 3.2M parameters would take 6.3 MB)
    assert need.total == 5 + need.activations + need.ends  # the head's logits outweigh this tiny block


def test_refusal_names_the_numbers_and_the_fix(folder, monkeypatch):
    model = StreamedModel.open(folder).model
    monkeypatch.setattr(stream_fit, "process_bytes", lambda: 0)
    need = stream_fit.block_need(model, 4, 32, 2, 64, 2**20)
    least = stream_fit.block_need(model, 1, 8, 1, 8, 1)
    assert least.total < 30 * 2**20 < need.total  # a limit between: fewer windows or shorter windows would fit
    monkeypatch.setenv(stream_fit.LIMIT_ENV, "30")
    with pytest.raises(InputError) as err:
        stream_fit.check_fits(model, 4, 32, 2, 64, 2**20, "m")
    assert str(err.value) == (
        f"m: a streamed run needs about {need.total / 2**20:.0f} MB (0 MB one block in float32, 0 MB input "
        "statistics, 1 MB GPTQ solve, 0 MB activations of 4 x 32 calibration tokens, 0 MB per batch of 2, 48 MB "
        "embeddings or head and logits, 13 MB writing a shard, 0 MB this process), more than the 30 MB available "
        "(COMPRESS_MEMORY_MB=30); use fewer calibration windows (calibration.windows), a shorter calibration.seq_len "
        "(or evaluate.seq_len), a smaller calibration.batch_size or export.shard_size_mb")
    monkeypatch.setenv(stream_fit.LIMIT_ENV, "10")
    with pytest.raises(InputError, match="10 MB available .*no calibration fits: the block itself is too large"):
        stream_fit.check_fits(model, 4, 32, 2, 64, 2**20, "m")
    monkeypatch.setenv(stream_fit.LIMIT_ENV, "60")
    assert stream_fit.check_fits(model, 4, 32, 2, 64, 2**20, "m") == need  # fits: the need is returned


def test_cli_refuses_before_work(folder, tmp_path, monkeypatch):
    recipe = {"name": "fit", "model": str(folder), "execution": "stream",
              "calibration": {"source": "pydoc", "windows": 4, "seq_len": 32, "batch_size": 2},
              "passes": [{"pass": "gptq", "bits": 4, "group_size": 32}],
              "evaluate": {"seq_len": 32, "max_windows": 2, "extra": [], "prompts": []}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv(stream_fit.LIMIT_ENV, "1")
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"error: {folder}: a streamed run needs about" in result.output
    assert "more than the 1 MB available (COMPRESS_MEMORY_MB=1); no calibration fits" in result.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(stream_fit.LIMIT_ENV, "lots")
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "COMPRESS_MEMORY_MB='lots': not a number of MB" in result.output


def test_cgroup_limit_read(monkeypatch, tmp_path):
    cgroup = tmp_path / "sys" / "memory" / "job"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.limit_in_bytes").write_text("629145600\n")
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/job\n")
    real = Path

    def fake(p: str | Path) -> Path:
        text = str(p)
        if text == "/proc/self/cgroup":
            return proc
        return real(text.replace("/sys/fs/cgroup", str(tmp_path / "sys"))) if text.startswith("/sys/fs") else real(p)

    monkeypatch.setattr(stream_fit, "Path", fake)
    assert stream_fit.cgroup_limit() == 600 * 2**20
    (cgroup / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert stream_fit.cgroup_limit() is None
