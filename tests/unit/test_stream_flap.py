"""FLAP under execution: stream (issue 16): the same weight bytes (sha256 of every tensor) and perplexities as the
in-memory run, for both structures and before GPTQ; one block's weights resident in every block loop, each block
cut from the checkpoint when it is read, with nothing kept per block but indices and per-channel means; recipes
the streamed run still cannot do refused by name before work (exit 2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from compress.cli import cli
from compress.models import llama, load_model, resolve_model
from compress.models.streaming import Exported, StreamedModel
from compress.models.synthetic import SyntheticLlama, write_synthetic
from compress.passes import PassContext, make_pass
from compress.plan import Plan
from compress.ops.quant import QuantSpec, rtn
from compress.recipe import FlapConfig
from export.packing import pack
from export.records import QuantRecord
from tests.unit.test_stream_run import _recipe

SPEC = SyntheticLlama(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=4)
GPTQ = {"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": True, "damp": 0.1}
RECIPES = {  # label: passes, and the export dtype (None: the source's, bfloat16)
    "flap-adaptive": ([{"pass": "flap", "target": 0.3, "structure": "adaptive"}], None),
    "flap-uniform": ([{"pass": "flap", "target": 0.3, "structure": "uniform"}], None),
    # a float32 source rounded at export: the biases come from the unrounded weights, then are rounded
    "flap-float32-source": ([{"pass": "flap", "target": 0.3}], "bfloat16"),
    "flap-then-gptq": ([{"pass": "flap", "target": 0.3, "round_to": 32}, GPTQ], None),
    "wanda_sp": ([{"pass": "wanda_sp", "target": 0.3}], None),
}


def _tensor_sha(folder: Path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes, by name, over all the artifact's safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name).contiguous()
                out[name] = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("stream_flap") / "model", SPEC, shard_mb=0.5)


@pytest.fixture(scope="module")
def model_float32(tmp_path_factory) -> Path:
    spec = dataclasses.replace(SPEC, dtype="float32")
    return write_synthetic(tmp_path_factory.mktemp("stream_flap_f32") / "model", spec, shard_mb=0.5)


@pytest.mark.parametrize("label", list(RECIPES))
def test_streamed_flap_writes_the_in_memory_runs_weights(model, model_float32, tmp_path, monkeypatch, label):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    runner = CliRunner()
    passes, export_dtype = RECIPES[label]
    source = model_float32 if label == "flap-float32-source" else model
    for execution in ("memory", "stream"):
        result = runner.invoke(cli, ["run", str(_recipe(tmp_path, source, execution, passes, export_dtype)), "--out",
                                     str(tmp_path / execution)])
        assert result.exit_code == 0, result.output
    memory, stream = (json.loads((tmp_path / e / "report.json").read_text()) for e in ("memory", "stream"))
    tensors = _tensor_sha(tmp_path / "memory")
    assert any(name.endswith(".bias") for name in tensors) or label == "wanda_sp"  # compensated
    assert tensors == _tensor_sha(tmp_path / "stream")
    assert stream["execution"] == "stream" and "execution" not in memory
    assert stream["quality"] == memory["quality"]  # dense and compressed perplexities, streamed the same
    assert stream["params"] == memory["params"] and stream["decoder_params"] == memory["decoder_params"]
    assert stream["decoder_params"]["removed"] > 0.2
    assert [p["rows"] for p in stream["passes"]] == [p["rows"] for p in memory["passes"]]
    assert (tmp_path / "stream" / "plan.json").read_text() == (tmp_path / "memory" / "plan.json").read_text()
    assert stream["streamed_peak_weights_mb"] == pytest.approx(49152 * 64 * 4 / 2**20, abs=0.1)  # the embeddings
    assert stream["verify"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize(("passes", "message"), [
    ([{"pass": "cfsp", "target": 0.3}], "passes.0: pass 'cfsp' does not stream yet"),
    ([{"pass": "flap", "target": 0.3}, {"pass": "rtn", "bits": 4, "group_size": 32}],
     "passes.1: pass 'rtn' does not stream yet"),
    ([{"pass": "flap", "target": 0.3, "round_to": 32}, {**GPTQ, "lm_head": {"bits": 8}}],
     "passes.1.lm_head: a streamed run does not quantize the lm_head yet"),
])
def test_what_does_not_stream_is_refused_before_work(model, tmp_path, passes, message):
    result = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, model, "stream", passes)), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
def test_one_block_resident_and_each_block_cut_when_read(tmp_path, structure):
    spec = SyntheticLlama(layers=6, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=1)
    folder = write_synthetic(tmp_path / "m", spec, shard_mb=0.2)
    ids = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = FlapConfig.model_validate({"pass": "flap", "target": 0.3, "structure": structure})
    dense, _ = load_model(resolve_model(str(folder)))
    dense_block = _bytes(llama.blocks(dense)[0])
    embeddings = _bytes(cast(Any, dense).model.embed_tokens)
    plan = Plan.of(dense)
    make_pass(cfg).run(dense, PassContext(calibration=ids, plan=plan, batch_size=2, seed=0))

    streamed = StreamedModel.open(folder)
    resident: list[int] = []
    states: dict[int, dict[str, torch.Tensor]] = {}

    def seen(i: int, block: torch.nn.Module) -> None:
        resident.append(streamed.resident_bytes)
        states[i] = {k: v.clone() for k, v in block.state_dict().items()}

    streamed.on_block_done.append(seen)
    plan_streamed = Plan.of(streamed.model)
    make_pass(cfg).run(streamed.model, PassContext(calibration=ids, plan=plan_streamed, batch_size=2, seed=0))
    assert resident == [dense_block] * spec.layers  # the statistics pass: one dense block at a time
    assert plan_streamed.to_dict() == plan.to_dict() and plan_streamed.widths == plan.widths
    assert streamed.resident_bytes == 0 and all(p.device.type == "meta" for p in streamed.model.parameters())
    for surgeries in streamed.surgeries.values():  # all a cut block keeps: indices and per-channel means
        (surgery,) = surgeries
        assert isinstance(surgery, partial)
        kept = [t for v in surgery.keywords.values() for t in (vars(v).values() if hasattr(v, "groups") else [v])]
        assert all(t is None or t.dim() == 1 for t in kept)

    resident.clear()
    streamed.final_hidden(ids, batch_size=2)  # every block read again, cut on its turn
    pruned = [_bytes(b) for b in llama.blocks(dense)]
    assert resident == pruned and max(pruned) < dense_block  # one pruned block at a time
    for i, block in enumerate(llama.blocks(dense)):  # the in-memory pass's pruned block, bit for bit
        assert states[i].keys() == block.state_dict().keys()
        assert all(torch.equal(states[i][k], v) for k, v in block.state_dict().items()), i
    assert streamed.resident_bytes == 0 and not streamed.pending
    assert streamed.peak_bytes == max(embeddings, dense_block)  # a block is cut from its dense tensors


def test_a_cut_blocks_quantized_weights_are_read_from_their_records_not_kept(tmp_path):
    """After as_exported, a pruned block's tensors are cut once per read of the block (`pending`); its quantized
    weights come from their records, so the cut copies of those are not kept beside the export's shard."""
    spec = SyntheticLlama(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=1)
    folder = write_synthetic(tmp_path / "m", spec, shard_mb=0.2)
    ids = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))
    streamed = StreamedModel.open(folder)
    cfg = FlapConfig.model_validate({"pass": "flap", "target": 0.3, "structure": "uniform", "round_to": 32})
    make_pass(cfg).run(streamed.model, PassContext(calibration=ids, plan=Plan.of(streamed.model), batch_size=2, seed=0))
    quantized = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "mlp.down_proj")]
    records = {}
    for name in quantized:
        W = streamed.read(f"{name}.weight")  # (out, in) as the cut leaves it
        codes, scale, zero = rtn(W, QuantSpec(bits=4, group_size=32))
        records[name] = QuantRecord(4, 32, True, (W.shape[0], W.shape[1]), packed=pack(codes, 4, 1), scale=scale,
                                    zero=zero.round().to(torch.int32), g_idx=torch.arange(W.shape[1]) // 32)
    streamed.pending = {}
    streamed.exported = Exported(torch.bfloat16, torch.bfloat16, records)
    streamed.read("model.layers.0.input_layernorm.weight")  # block 0 cut: its tensors pending
    assert streamed.pending and not any(f"{name}.weight" in streamed.pending for name in quantized)
    got = streamed.read(f"{quantized[0]}.weight")  # from the record
    assert torch.equal(got, records[quantized[0]].dequantize(torch.bfloat16).float())
    tensors = dict(streamed.module_tensors())
    assert tensors[quantized[1]][f"{quantized[1]}.weight"].device.type == "meta"  # the writer stores the record
    assert not streamed.pending  # every other tensor of the cut blocks handed out once
