"""The streamed skeleton: no weight in memory until asked, a block materialized equals the loaded model's, the block
engine streams it (one block resident at a time) and streamed GPTQ decides exactly what the in-memory pass decides."""

from __future__ import annotations

import hashlib
from typing import Any, cast

import pytest
import torch

from calibration.capture import for_each_block
from compress.errors import InputError
from compress.models import llama, load_model, resolve_model
from compress.models.streaming import StreamedModel
from compress.models.synthetic import SyntheticLlama, write_synthetic
from compress.passes import PassContext, make_pass
from compress.plan import Plan
from compress.recipe import GptqConfig

SPEC = SyntheticLlama(layers=6, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=1)
GPTQ = {"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True, "damp": 0.1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("stream") / "m", SPEC, shard_mb=0.2)  # several shards


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _embeddings(model: torch.nn.Module) -> Any:
    return cast(Any, model).model.embed_tokens


def _plan_digest(plan: Plan) -> str:
    sha = hashlib.sha256()
    for name, q in plan.quantized.items():
        sha.update(name.encode())
        for t in (q.packed, q.scale, q.zero, q.g_idx):
            sha.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _calibration() -> torch.Tensor:
    return torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))


def test_skeleton_holds_no_weight_and_loads_one_module(folder):
    streamed = StreamedModel.open(folder)
    model = streamed.model
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed buffers are real
    dense, _ = load_model(resolve_model(str(folder)))
    block = llama.blocks(model)[4]
    with streamed.loaded(block):
        assert streamed.resident_bytes == _bytes(llama.blocks(dense)[4]) == _bytes(block)
        for (name, got), (_, want) in zip(block.state_dict().items(), llama.blocks(dense)[4].state_dict().items(),
                                          strict=True):
            assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert streamed.resident_bytes == 0 and all(p.device.type == "meta" for p in block.parameters())
    with streamed.loaded(model.lm_head):  # tied: read from the embeddings
        assert torch.equal(model.lm_head.weight, _embeddings(dense).weight)


def test_engine_streams_blocks_with_outputs_of_the_loaded_model(folder):
    streamed = StreamedModel.open(folder)
    dense, _ = load_model(resolve_model(str(folder)))
    ids = _calibration()
    outputs: dict[str, list[torch.Tensor]] = {"dense": [], "stream": []}
    resident: list[int] = []

    def visit(key):
        def record(i, block, inputs, outs, stats):
            outputs[key].append(outs[0].clone())
            if key == "stream":
                resident.append(streamed.resident_bytes)
        return record

    for_each_block(dense, llama.blocks(dense), ids, visit("dense"), batch_size=2)
    for_each_block(streamed.model, llama.blocks(streamed.model), ids, visit("stream"), batch_size=2)
    assert len(outputs["stream"]) == SPEC.layers
    assert all(torch.equal(a, b) for a, b in zip(outputs["dense"], outputs["stream"], strict=True))
    one_block = _bytes(llama.blocks(dense)[0])
    assert resident == [one_block] * SPEC.layers  # the embeddings are freed after the capture, one block at a time
    assert streamed.peak_bytes == _bytes(_embeddings(dense))  # the largest module here
    assert streamed.resident_bytes == 0


def test_streamed_gptq_decides_what_the_in_memory_pass_decides(folder):
    ids, cfg = _calibration(), GptqConfig.model_validate(GPTQ)
    dense, _ = load_model(resolve_model(str(folder)))
    plan = Plan.of(dense)
    make_pass(cfg).run(dense, PassContext(calibration=ids, plan=plan, batch_size=2, seed=0))
    streamed = StreamedModel.open(folder)
    finished: dict[int, dict[str, torch.Tensor]] = {}
    streamed.on_block_done.append(lambda i, block: finished.__setitem__(i, {k: v.clone() for k, v in
                                                                           block.state_dict().items()}))
    plan_streamed = Plan.of(streamed.model)
    make_pass(cfg).run(streamed.model, PassContext(calibration=ids, plan=plan_streamed, batch_size=2, seed=0))
    assert len(plan.quantized) == len(plan_streamed.quantized) == 7 * SPEC.layers
    assert _plan_digest(plan) == _plan_digest(plan_streamed)
    for i, block in enumerate(llama.blocks(dense)):  # the blocks handed on hold the quantized weights
        assert all(torch.equal(finished[i][k], v) for k, v in block.state_dict().items())
    assert streamed.peak_bytes < _bytes(dense) / SPEC.layers + _bytes(_embeddings(dense))


def test_refusals(folder, tmp_path):
    streamed = StreamedModel.open(folder)
    with pytest.raises(ValueError, match="not part of this model"):
        streamed.load(torch.nn.Linear(2, 2))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    second = sorted(broken.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(InputError, match=f"shard {second.name} .* is missing"):
        StreamedModel.open(broken)
