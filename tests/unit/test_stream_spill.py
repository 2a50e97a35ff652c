"""Nothing a streamed run holds grows with depth: each finished block's quantized records leave the plan for a spill
file (read back one at a time, the same bytes), and the reload check reads the written artifact block by block
(ArtifactBlocks), never export.load's whole model, with the same logits export.load gives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import export
from compress.cli import cli
from compress.errors import CompressError
from compress.models.stream_export import ArtifactBlocks, SpilledRecords
from compress.models.synthetic import SyntheticLlama, write_synthetic
from compress.plan import Plan
from export.records import QuantRecord

SPEC = SyntheticLlama(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=5)
LINEARS = 7  # q, k, v, o, gate, up, down per block


def _recipe(tmp: Path, model: Path, execution: str, quant_format: str = "compressed-tensors",
            sym: bool = True) -> Path:
    data = {"name": "spill", "model": str(model), "seed": 0, "execution": execution,
            "calibration": {"source": "pydoc", "windows": 4, "seq_len": 32, "batch_size": 2},
            "passes": [{"pass": "gptq", "bits": 4, "group_size": 32, "sym": sym, "act_order": True, "damp": 0.1}],
            "evaluate": {"seq_len": 32, "max_windows": 2, "extra": [], "prompts": []},
            "export": {"quant_format": quant_format}}
    path = tmp / f"recipe-{execution}-{quant_format}-{sym}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights_sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("spill") / "model", SPEC, shard_mb=0.5)


def test_records_leave_the_plan_as_blocks_finish(model, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    held: list[tuple[int, int, int]] = []  # after each block: block, records in the plan, records spilled
    take = SpilledRecords.take

    def watched(self: SpilledRecords, plan: Plan, block: int) -> None:
        take(self, plan, block)
        held.append((block, len(plan.quantized), len(self)))

    monkeypatch.setattr(SpilledRecords, "take", watched)
    monkeypatch.setattr(export, "load", lambda *a, **k: pytest.fail("the reload check loaded the whole artifact"))
    result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, "stream")), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    gptq = held[: SPEC.layers]  # the spill is watched from the pass on (the dense evaluation holds no records)
    assert len(held) == 3 * SPEC.layers and gptq == [(i, 0, LINEARS * (i + 1)) for i in range(SPEC.layers)]
    assert all(n_plan == 0 for _, n_plan, _ in held)  # never more than the block under work's records in the plan
    assert not list(tmp_path.glob(".s.records-*"))  # the spill folder is removed at the end
    assert export.verify(tmp_path / "s") == []


@pytest.mark.parametrize(("quant_format", "sym"), [("compressed-tensors", False), ("gptq", True)])
def test_spilled_run_writes_the_in_memory_bytes(model, tmp_path, monkeypatch, quant_format, sym):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    for execution in ("memory", "stream"):
        result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, execution, quant_format, sym)),
                                          "--out", str(tmp_path / execution)])
        assert result.exit_code == 0, result.output
    assert _weights_sha(tmp_path / "memory") == _weights_sha(tmp_path / "stream")
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = export.load(tmp_path / "stream", dtype=torch.float32)(input_ids=ids, use_cache=False).logits
    blocks = ArtifactBlocks(tmp_path / "stream")
    got = blocks.logits(ids, batch_size=2)  # (3, 20, vocab)
    assert got.shape == (3, 20, 49152) and torch.equal(got, want)
    assert all(p.is_meta for p in blocks.model.parameters())  # every module put back after its turn


def test_spilled_records_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    plan = Plan()
    made = {}
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        packed = torch.randint(0, 2**31 - 1, (8, 8), generator=g, dtype=torch.int32)
        zero = torch.full((8, 2), 8, dtype=torch.int32)
        made[name] = QuantRecord(4, 32, True, (8, 64), packed, torch.rand(8, 2, generator=g), zero,
                                 torch.arange(64, dtype=torch.int32) // 32)
        plan.quantize(name, made[name])
    records = SpilledRecords(tmp_path)
    records.take(plan, 0)
    records.take(plan, 1)  # nothing left in the plan: no file
    assert plan.quantized == {} and list(records) == list(made) and len(list(tmp_path.iterdir())) == 1
    for name, q in made.items():
        back = records[name]
        assert (back.bits, back.group_size, back.sym, back.shape) == (4, 32, True, (8, 64))
        assert all(torch.equal(getattr(back, p), getattr(q, p)) for p in ("packed", "scale", "zero", "g_idx"))
    records.scale_dtype = torch.bfloat16  # as_exported: rounded on the way back, as the in-memory run rounds them
    assert torch.equal(records["model.layers.0.mlp.up_proj"].scale, made["model.layers.0.mlp.up_proj"].scale.bfloat16())
    assert "model.layers.1.mlp.up_proj" not in records


def test_damaged_artifact_refused(model, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, "stream")), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    shard = next((tmp_path / "s").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CompressError, match=f"does not match its manifest: {shard.name}: .* bytes, manifest says"):
        ArtifactBlocks(tmp_path / "s")
