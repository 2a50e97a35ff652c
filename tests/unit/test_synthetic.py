"""Synthetic Llama checkpoints: sharded as transformers writes them, loadable by transformers and by compress, seeded
values independent of the sharding, shapes of the asked architecture, refusals named."""

from __future__ import annotations

import json
import math
from typing import Any, cast

import pytest
import torch
from safetensors import safe_open

from compress.errors import InputError
from compress.models import llama, load_model, resolve_model
from compress.models.synthetic import SyntheticLlama, main, write_synthetic
from export.format import SINGLE_WEIGHTS, WEIGHTS_INDEX

SPEC = SyntheticLlama(layers=3, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, seed=3)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "m", SPEC, shard_mb=0.1)


def test_sharded_with_index_as_transformers_writes(sharded):
    index = json.loads((sharded / WEIGHTS_INDEX).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n == 3  # at 0.1 MiB per shard: the 6.3 MB embeddings alone, then 3 layers of 61 kB in two
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    stored = _tensors(sharded)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert SPEC.weight_bytes() == index["metadata"]["total_size"]
    assert not (sharded / SINGLE_WEIGHTS).exists()
    assert (sharded / "tokenizer.json").is_file()


def test_architecture_shapes_and_values(sharded):
    t = _tensors(sharded)
    assert "lm_head.weight" not in t  # tied
    assert len([k for k in t if k.startswith("model.layers.")]) == 3 * 9
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 64)
    assert t["model.layers.2.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA: 2 key-value heads
    assert t["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(t["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert t["model.embed_tokens.weight"].float().std().item() == pytest.approx(0.02, rel=0.01)
    down = t["model.layers.1.mlp.down_proj.weight"].float().std().item()
    assert down == pytest.approx(0.02 / math.sqrt(6), rel=0.05)  # residual outputs scaled by 1/sqrt(2 layers)


def test_loads_in_transformers_and_compress(sharded):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    model, info = cast(tuple[Any, dict], loaded)
    assert all(not v for v in info.values()), info
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 2
    ours, tokenizer = load_model(resolve_model(str(sharded)))  # every header and tensor checked
    ids = torch.tensor(cast(Any, tokenizer)("def f(x): return x")["input_ids"])[None]
    logits = cast(Any, ours)(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    stored = _tensors(sharded)["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(llama.as_block(llama.blocks(ours)[2]).mlp.up_proj.weight, stored.float())


def test_values_do_not_depend_on_sharding(sharded, tmp_path):
    one = write_synthetic(tmp_path / "one", SPEC, shard_mb=100)
    assert [p.name for p in one.glob("*.safetensors")] == [SINGLE_WEIGHTS] and not (one / WEIGHTS_INDEX).exists()
    a, b = _tensors(sharded), _tensors(one)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _tensors(write_synthetic(tmp_path / "seed4", SyntheticLlama(**{**SPEC.__dict__, "seed": 4}), 100))
    assert not torch.equal(other["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="heads 6 is not a multiple of kv_heads 4"):
        SyntheticLlama(layers=2, heads=6, kv_heads=4)
    with pytest.raises(InputError, match="layers = 0 is not a positive integer"):
        SyntheticLlama(layers=0)
    with pytest.raises(InputError, match="dtype 'int8'"):
        SyntheticLlama(layers=1, dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        write_synthetic(tmp_path / "full", SPEC)


def test_command_line(tmp_path, capsys):
    main(["--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
          "--head-dim", "16", "--dtype", "float32", "--untied", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (2, 32, 1)
    assert cfg["tie_word_embeddings"] is False and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "lm_head.weight" in _tensors(tmp_path / "cli")
    n = 2 * 49152 * 32 + 2 * (2 * 2 * 16 * 32 + 2 * 1 * 16 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert f"{n:,} parameters" in printed
    with pytest.raises(SystemExit, match="error: .* exists and is not an empty folder"):
        main(["--layers", "1", str(tmp_path / "cli")])
