"""A low-rank correction in the artifact (issue 14, item 5): export writes the plan's adapters as a standard PEFT LoRA
folder, counted in bits per weight and bytes; our loader rebuilds LoRALinear around the packed linears and gives the
in-memory model's logits; stock transformers + compressed-tensors + peft give our loader's logits within 1e-3."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import export
from compress.models import llama
from compress.ops.gptq import Quantized
from compress.ops.lowrank import svd_fit
from compress.ops.quant import QuantSpec, rtn
from compress.passes.targets import quant_record
from compress.plan import Plan
from export.format import ArtifactError, Manifest
from export.lowrank import wrap
from export.records import QuantRecord
from tests.export_stubs import LowRankPair, StubPlan
from tests.tiny import make_tiny_model

SPEC = QuantSpec(bits=4, group_size=32, sym=True)
# ranks per projection: q/k/v and the MLP input projections get 4, o_proj and down_proj 8 (a per-module rank pattern);
# layer 1 is quantized but not corrected, and nothing of layer 2's attention is quantized or corrected
RANKS = {"self_attn.q_proj": 4, "self_attn.k_proj": 4, "self_attn.v_proj": 4, "self_attn.o_proj": 8,
         "mlp.gate_proj": 4, "mlp.up_proj": 4, "mlp.down_proj": 8}


def _records(model: nn.Module) -> dict[str, QuantRecord]:
    """4-bit g32 RTN of every projection except layer 2's attention; the in-memory weights become the dequantized
    ones, as the quantize pass leaves them."""
    records = {}
    with torch.no_grad():
        for name, (i, short, lin) in llama.named_linears(model).items():
            if i == 2 and short in llama.ATTN:
                continue
            codes, scale, zero = rtn(lin.weight, SPEC)
            g_idx = (torch.arange(lin.in_features) // SPEC.group_size).to(torch.int32)
            shape = (lin.out_features, lin.in_features)
            records[name] = quant_record(Quantized(codes, scale, zero, g_idx), SPEC, shape)
            records[name].scale = records[name].scale.half()  # as a float32 export stores them
            lin.weight.copy_(records[name].dequantize(torch.float32))
    return records


def _tensors(model: nn.Module):
    """export.write's stream: the state dict module by module (as compress.pipeline gives it)."""
    for module, items in itertools.groupby(model.state_dict().items(), key=lambda kv: kv[0].rpartition(".")[0]):
        yield module, dict(items)


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """A tiny Llama, quantized, with fitted corrections on layers 0 and 2 (stored in float16, so the in-memory A and
    B are rounded to it), written by export.write; (artifact, model, ids, logits before correcting)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    source = make_tiny_model(root / "source")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    dense = {n: lin.weight.detach().clone() for n, (_, _, lin) in llama.named_linears(model).items()}
    records = _records(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    pairs = {}
    for name, (i, _, lin) in llama.named_linears(model).items():
        short = name.split(".", 3)[3]
        if i != 1:
            A, B = svd_fit(dense[name] - lin.weight.detach(), RANKS[short])
            pairs[name] = (A.half().float(), B.half().float())
    wrap(model, list(pairs), {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()})
    plan = StubPlan(Plan.of(model).widths, records, {n: LowRankPair(*p) for n, p in pairs.items()})
    provenance = export.Provenance(folder=source, source={"name": "tiny", "identity": "tiny", "path": str(source)},
                                   config=model.config.to_dict(), recipe={"name": "t"}, recipe_yaml="name: t\n",
                                   seed=0)
    report: dict = {}
    export.write(root / "art", _tensors(model), plan, report, provenance,
                 export.ExportSettings(dtype=torch.float32), check=lambda folder: {}, card=lambda rep: "card\n")
    return root / "art", model, ids, before, report, pairs, records


def test_our_loader_applies_the_correction(corrected):
    art, model, ids, before, *_ = corrected
    reloaded = export.load(art, dtype=torch.float32)
    assert sum(1 for m in reloaded.modules() if isinstance(m, export.lowrank.LoRALinear)) == 14
    with torch.no_grad():
        ours, want = reloaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((ours - want).abs().max()) < 1e-4
    assert float((want - before).abs().max()) > 1e-2  # the correction changes the logits: the check above can fail
    native = export.load(art)  # no dtype: A and B compute in the model's float32, not the stored float16
    assert native.get_submodule("model.layers.0.self_attn.q_proj.lora_A").weight.dtype == torch.float32
    with torch.no_grad():
        assert float((native(input_ids=ids).logits - want).abs().max()) < 1e-4


def test_peft_loads_the_adapter_onto_stock_transformers(corrected):
    """As docs/format.md says: compressed-tensors keeps the weights packed until the first forward pass and peft needs
    a `weight` to wrap, so the base is decompressed first, as that first pass would (transformers' dequantize=True
    rounds a float32 model's weights through the float16 scales instead: 2e-3 off here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    art, model, ids, before, *_ = corrected
    base = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32)
    quantizer: Any = base.hf_quantizer
    quantizer.compressor.decompress_model(base)  # what the first forward pass would do
    packed = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()  # compressed-tensors, 4-bit
    with torch.no_grad():
        plain = packed(input_ids=ids).logits
        stock = PeftModel.from_pretrained(base, art / "adapter").eval()(input_ids=ids).logits
        ours = export.load(art, dtype=torch.float32)(input_ids=ids).logits
    assert float((plain - before).abs().max()) < 1e-4  # the packed base alone is the uncorrected model
    assert float((stock - ours).abs().max()) < 1e-3
    assert float((stock - plain).abs().max()) > 1e-2


def test_manifest_config_and_bytes_describe_the_adapter(corrected):
    art, _, _, _, report, pairs, records = corrected
    manifest = Manifest.model_validate(json.loads((art / "manifest.json").read_text()))
    assert manifest.adapter is not None and manifest.adapter.path == "adapter" and manifest.adapter.dtype == "float16"
    assert list(manifest.adapter.modules) == list(pairs)  # plan order
    assert manifest.adapter.modules["model.layers.2.mlp.down_proj"].model_dump() == {"rank": 8, "shape": [96, 128]}
    config = json.loads((art / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)  # 10 modules of rank 4, 4 of 8
    assert config["rank_pattern"] == config["alpha_pattern"] == {
        f"model.layers.{i}.{p}": 8 for i in (0, 2) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert config["target_modules"] == list(pairs)
    stored = load_file(art / "adapter" / "adapter_model.safetensors")
    A = stored["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert A.shape == (4, 96) and A.dtype == torch.float16 and torch.equal(A.float(), pairs[
        "model.layers.0.self_attn.q_proj"][0])
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" not in load_file(art / "model.safetensors")
    # bits: 4-bit codes + a 16-bit scale per 32 weights, plus 16 bits per adapter number on the quantized modules
    weights = sum(r.shape[0] * r.shape[1] for r in records.values())
    adapter_numbers = sum(A.numel() + B.numel() for n, (A, B) in pairs.items() if n in records)
    bits = report["bits_per_weight"]
    assert bits["adapter"] == round(16 * adapter_numbers / weights, 4)
    assert bits["stored"] == round(4.5 + 16 * adapter_numbers / weights, 4)
    adapter_bytes = (art / "adapter" / "adapter_model.safetensors").stat().st_size
    assert report["adapter"]["bytes"] == adapter_bytes and report["adapter"]["ranks"] == [4, 8]
    assert export.weights_bytes(art) == (art / "model.safetensors").stat().st_size + adapter_bytes
    assert export.verify(art) == []


def test_altered_adapter_is_refused_by_name(corrected, tmp_path):
    import shutil

    art = shutil.copytree(corrected[0], tmp_path / "art")
    path = art / "adapter" / "adapter_model.safetensors"
    stored = load_file(path)
    name = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    stored[name] = stored[name].clone()
    stored[name][0, 0] = float("nan")
    save_file(stored, path, metadata={"format": "pt"})  # same size: the hash and the value tell
    assert export.verify(art) == ["adapter/adapter_model.safetensors: sha256 differs from the manifest (file altered)"]
    with pytest.raises(ArtifactError, match=r"non-finite values \(NaN or Inf\) in 1 tensor\(s\): "
                                            r"model.layers.2.mlp.up_proj.lora_B.weight \(1\)"):
        export.load(art)


def test_manifest_refuses_an_adapter_that_does_not_fit(corrected):
    raw = json.loads((corrected[0] / "manifest.json").read_text())
    raw["adapter"]["modules"]["model.layers.0.mlp.up_proj"]["rank"] = 5
    with pytest.raises(ValueError, match=r"adapter.modules.model.layers.0.mlp.up_proj: tensors.base_model.model."
                                         r"model.layers.0.mlp.up_proj.lora_A.weight must be listed in adapter/ with "
                                         r"shape \[5, 96\] and dtype float16"):
        Manifest.model_validate(raw)
    raw = json.loads((corrected[0] / "manifest.json").read_text())
    raw["adapter"]["modules"]["model.layers.0.mlp.up_proj"]["shape"] = [96, 128]
    with pytest.raises(ValueError, match=r"adapter.modules.model.layers.0.mlp.up_proj: no projection of shape "
                                         r"\[96, 128\]"):
        Manifest.model_validate(raw)


def test_no_adapter_leaves_the_manifest_as_it_was(tmp_path):
    """Artifacts without a correction keep their manifest bytes: no `adapter` key, no adapter folder."""
    source = make_tiny_model(tmp_path / "source")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    provenance = export.Provenance(folder=source, source={"name": "tiny", "identity": "tiny", "path": str(source)},
                                   config=model.config.to_dict(), recipe={"name": "t"}, recipe_yaml="name: t\n", seed=0)
    report: dict = {}
    export.write(tmp_path / "art", _tensors(model), StubPlan(Plan.of(model).widths), report, provenance,
                 export.ExportSettings(dtype=torch.float32), check=lambda folder: {}, card=lambda rep: "card\n")
    assert "adapter" not in json.loads((tmp_path / "art" / "manifest.json").read_text()) and "adapter" not in report
    assert not Path(tmp_path / "art" / "adapter").exists()
