"""Streamed GPTQ to an artifact: the skeleton's tensors, read module by module after the pass, go through export.write
and give the same weight bytes (sha256) as the in-memory path; the streamed forward of what was written equals the
runtime loader's, and the streamed perplexity equals compress.evaluate's on the loaded model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import export
from compress import evaluate as ev
from compress.models import llama, load_model, resolve_model
from compress.models.streaming import StreamedModel
from compress.models.synthetic import SyntheticLlama, write_synthetic
from compress.passes import PassContext, make_pass
from compress.pipeline import _module_tensors, _round_to_export
from compress.plan import Plan
from compress.recipe import GptqConfig

SPEC = SyntheticLlama(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, seed=2)
GPTQ = GptqConfig.model_validate({"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                                  "static_groups": True, "damp": 0.1})
SETTINGS = export.ExportSettings(dtype=torch.bfloat16, quant_format="compressed-tensors", shard_bytes=2**20,
                                 remote_code=False)


def _write(out: Path, tensors, plan: Plan, folder: Path, config: dict) -> Path:
    provenance = export.Provenance(folder=folder, source={"name": "synthetic", "identity": "synthetic",
                                                          "path": str(folder)},
                                   config=config, recipe={"name": "stream"}, recipe_yaml="name: stream\n", seed=0)
    export.write(out, tensors, plan, {}, provenance, SETTINGS, check=lambda _folder: {}, card=lambda _r: "card\n")
    return out


def _weights_sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_export")
    folder = write_synthetic(root / "source", SPEC, shard_mb=0.3)
    ids = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(resolve_model(str(folder)))
    plan = Plan.of(model)
    make_pass(GPTQ).run(model, PassContext(calibration=ids, plan=plan, batch_size=2, seed=0))
    _round_to_export(model, plan, SETTINGS)
    config = llama.as_causal_lm(model).config.to_dict()
    in_memory = _write(root / "memory", _module_tensors(model), plan, folder, config)
    streamed = StreamedModel.open(folder)
    plan_s = Plan.of(streamed.model)
    make_pass(GPTQ).run(streamed.model, PassContext(calibration=ids, plan=plan_s, batch_size=2, seed=0))
    streamed.as_exported(plan_s.quantized, SETTINGS)
    out = _write(root / "stream", streamed.module_tensors(), plan_s, folder, config)
    return {"memory": in_memory, "stream": out, "model": model, "streamed": streamed, "ids": ids}


def test_same_weight_bytes(written):
    memory, stream = _weights_sha(written["memory"]), _weights_sha(written["stream"])
    assert len(memory) >= 1 and memory == stream
    assert export.verify(written["stream"]) == []  # manifest, files, tensors all as recorded


def test_streamed_forward_is_the_artifacts(written):
    ids, streamed = written["ids"], written["streamed"]
    got = streamed.logits(ids, batch_size=2)  # (N, T, vocab), blocks rebuilt from the plan's records
    reloaded = export.load(written["stream"], dtype=torch.float32)
    with torch.no_grad():
        want = reloaded(input_ids=ids, use_cache=False).logits
        in_memory = written["model"](input_ids=ids, use_cache=False).logits
    assert got.shape == (4, 24, 49152)
    assert float((got - want).abs().max()) < 1e-4  # the pipeline's reload tolerance
    assert torch.equal(got, in_memory)
    assert streamed.resident_bytes == 0


def test_streamed_perplexity_is_evaluates(written):
    windows = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(5))
    want = ev.perplexity(written["model"], windows, batch_size=2)
    assert written["streamed"].perplexity(windows, batch_size=2) == pytest.approx(want, rel=1e-6)
