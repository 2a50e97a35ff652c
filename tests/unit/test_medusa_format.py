"""The drafter folder (<artifact>/medusa/) against what vLLM's Medusa code reads. vLLM cannot run here, so its reading
is restated from its source (vllm-project/vllm, read 2026-11):

- vllm/transformers_utils/configs/medusa.py, MedusaConfig: model_type "medusa"; hidden_size, vocab_size, num_heads,
  num_hidden_layers, truncated_vocab_size (default vocab_size); from_pretrained renames every key containing "num"
  and "heads" to num_heads and every key containing "num" and "layers" to num_hidden_layers.
- vllm/model_executor/models/registry.py: architecture "MedusaModel" -> ("medusa", "Medusa").
- vllm/model_executor/models/medusa.py, Medusa: `num_heads` ResidualBlocks, each `num_hidden_layers` nn.Linear(hidden,
  hidden, bias=getattr(config, "medusa_fc_bias", False)) named blocks.{h}.layers.{l}, forward x = x + SiLU(layer(x));
  with getattr(config, "original_lm_head", False) one ParallelLMHead(truncated_vocab_size, hidden) named lm_head shared
  by every head, else lm_heads.{h}; load_weights strips "medusa_heads.", takes a name found in its parameters, and
  with original_lm_head maps "lm_heads.0.weight" to "lm_head.weight"; it asserts truncated_vocab_size == vocab_size
  unless the checkpoint has a token_map.
- vllm/model_executor/model_loader/default_loader.py, load_weights: a model whose parameters are not all loaded from
  the checkpoint is refused ("Following weights were not initialized from checkpoint")."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import export
from compress.plan import Plan
from export.format import Manifest
from export.medusa import DRAFTER_DIR, MedusaHeads, load_heads
from tests.export_stubs import StubPlan
from tests.tiny import make_tiny_model

HIDDEN, VOCAB = 96, 384  # tests/tiny.py


@dataclass
class StubHeads:
    """export.write's HeadsPlan without compress."""

    tensors: dict[str, torch.Tensor]
    num_heads: int
    num_layers: int


@dataclass
class HeadsStubPlan(StubPlan):
    heads: StubHeads | None = None  # type: ignore[assignment]


def _vllm_config(raw: dict) -> dict:
    """MedusaConfig.from_pretrained's renaming and defaults, as vLLM applies them to config.json."""
    config = dict(raw)
    for key in list(config):
        if "num" in key:
            if "heads" in key:
                config["num_heads"] = config.pop(key)
            elif "layers" in key:
                config["num_hidden_layers"] = config.pop(key)
    config.setdefault("truncated_vocab_size", config.get("vocab_size"))
    return config


def _vllm_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    """The parameters vLLM's Medusa builds for `config`, with their shapes."""
    hidden, bias = config["hidden_size"], config.get("medusa_fc_bias", False)
    params: dict[str, tuple[int, ...]] = {}
    for h, layer in itertools.product(range(config["num_heads"]), range(config["num_hidden_layers"])):
        params[f"blocks.{h}.layers.{layer}.weight"] = (hidden, hidden)
        if bias:
            params[f"blocks.{h}.layers.{layer}.bias"] = (hidden,)
    heads = ["lm_head"] if config.get("original_lm_head", False) else [f"lm_heads.{h}" for h in
                                                                        range(config["num_heads"])]
    params |= {f"{name}.weight": (config["truncated_vocab_size"], hidden) for name in heads}
    return params


def _vllm_load(config: dict, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Medusa.load_weights's name mapping, then default_loader's check that every parameter was loaded."""
    params = _vllm_parameters(config)
    loaded = {}
    for name, tensor in checkpoint.items():
        name = name.replace("medusa_heads.", "")
        if name in params:
            loaded[name] = tensor
        elif config.get("original_lm_head", False) and name == "lm_heads.0.weight":
            loaded["lm_head.weight"] = tensor
    missing = set(params) - set(loaded)
    assert not missing, f"Following weights were not initialized from checkpoint: {missing}"
    for name, tensor in loaded.items():
        assert tuple(tensor.shape) == params[name], name
    return loaded


def _vllm_logits(config: dict, loaded: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Medusa.forward then compute_logits: (P, H) -> (P, K, V)."""
    out = []
    for h in range(config["num_heads"]):
        x = hidden
        for layer in range(config["num_hidden_layers"]):
            prefix = f"blocks.{h}.layers.{layer}"
            x = x + F.silu(F.linear(x, loaded[f"{prefix}.weight"], loaded.get(f"{prefix}.bias")))
        out.append(F.linear(x, loaded["lm_head.weight"]))
    return torch.stack(out, dim=-2)


def _tensors(model: nn.Module):
    for module, items in itertools.groupby(model.state_dict().items(), key=lambda kv: kv[0].rpartition(".")[0]):
        yield module, dict(items)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def drafter(request, tmp_path_factory):
    """A tiny Llama (embeddings tied to lm_head, or not) with 3 random heads of 2 layers, written by export.write in
    bfloat16; (artifact, model, heads as written)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("medusa")
    source = make_tiny_model(root / "source", tie_word_embeddings=request.param)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    heads = MedusaHeads(HIDDEN, num_heads=3, num_layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = {k: v.clone() for k, v in heads.state_dict().items()}
    plan = HeadsStubPlan(Plan.of(model).widths, heads=StubHeads(state, 3, 2))
    provenance = export.Provenance(folder=source, source={"name": "tiny", "identity": "tiny", "path": str(source)},
                                   config=model.config.to_dict(), recipe={"name": "t"}, recipe_yaml="name: t\n",
                                   seed=0)
    export.write(root / "art", _tensors(model), plan, {}, provenance, export.ExportSettings(dtype=torch.bfloat16),
                 check=lambda folder: {}, card=lambda rep: "card\n")
    return root / "art", model, state


def test_the_config_is_what_vllm_reads(drafter):
    art, _, _ = drafter
    raw = json.loads((art / DRAFTER_DIR / "config.json").read_text())
    assert raw["model_type"] == "medusa" and raw["architectures"] == ["MedusaModel"]
    config = _vllm_config(raw)
    assert config == raw  # no key of ours is renamed onto num_heads / num_hidden_layers
    assert {k: config[k] for k in ("hidden_size", "vocab_size", "num_heads", "num_hidden_layers")} == {
        "hidden_size": HIDDEN, "vocab_size": VOCAB, "num_heads": 3, "num_hidden_layers": 2}
    assert config["original_lm_head"] is True and config["medusa_fc_bias"] is True
    assert config["truncated_vocab_size"] == config["vocab_size"]  # no token_map: vLLM asserts they are equal


def test_every_parameter_vllm_builds_is_in_the_checkpoint_and_nothing_else(drafter):
    art, model, state = drafter
    config = json.loads((art / DRAFTER_DIR / "config.json").read_text())
    assert sorted(p.name for p in (art / DRAFTER_DIR).iterdir()) == ["config.json", "model.safetensors"]
    checkpoint = load_file(art / DRAFTER_DIR / "model.safetensors")
    loaded = _vllm_load(config, checkpoint)
    assert len(loaded) == len(checkpoint)  # every stored tensor is one vLLM loads
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.values())
    assert torch.equal(loaded["lm_head.weight"], model.lm_head.weight.detach().bfloat16())  # the model's own
    assert all(torch.equal(loaded[k], v.bfloat16()) for k, v in state.items())


def test_vllm_computes_what_our_heads_compute(drafter):
    """The folder's tensors through vLLM's forward give our MedusaHeads' logits (both from the stored bfloat16)."""
    art, model, _ = drafter
    config = json.loads((art / DRAFTER_DIR / "config.json").read_text())
    loaded = {k: v.float() for k, v in _vllm_load(config, load_file(art / DRAFTER_DIR / "model.safetensors")).items()}
    ours = load_heads(art, dtype=torch.float32)
    assert ours is not None
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    lm_head.weight = nn.Parameter(loaded["lm_head.weight"])
    with torch.no_grad():
        assert torch.allclose(ours(hidden, lm_head), _vllm_logits(config, loaded, hidden), atol=1e-5)
        assert (ours(hidden, lm_head) - lm_head(hidden)[:, None]).abs().max() > 1e-2  # the heads do something


def test_the_manifest_lists_the_folder_and_refuses_a_missing_head_tensor(drafter):
    art, _, _ = drafter
    assert export.verify(art) == []
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["heads"]["path"] == DRAFTER_DIR and raw["heads"]["dtype"] == "bfloat16"
    del raw["tensors"]["blocks.2.layers.1.bias"]
    with pytest.raises(ValidationError, match=r"heads: tensors\.blocks\.2\.layers\.1\.bias must be listed in medusa/"):
        Manifest.model_validate(raw)


def test_a_model_loaded_from_the_artifact_ignores_the_folder(drafter):
    art, model, _ = drafter
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    reloaded = export.load(art, dtype=torch.float32)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert (reloaded(input_ids=ids).logits - want).abs().max() < 0.1 * want.abs().max()  # bfloat16 storage

