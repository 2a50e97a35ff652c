"""The typed plan (what passes record) and export.write (what lands on disk) on their own: widths follow the recorded
decisions, export writes from the plan and the tensors alone (zero biases sized by the plan's widths, lm_head
dropped when tied, manifest through the typed Manifest), and refuses a format that cannot store the model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import export
from compress.plan import BlockPlan, Plan, Structure
from export.format import Manifest
from export.packing import pack
from export.records import BlockWidths, QuantRecord
from tests.export_stubs import StubPlan

DENSE = BlockWidths(num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=128)
HIDDEN, VOCAB = 96, 50


def test_prune_sets_widths_from_the_decision():
    plan = Plan(blocks={0: BlockPlan(DENSE)})
    after = plan.prune(0, DENSE, Structure(kept_kv_groups=[0, 2], kept_mlp_channels=list(range(40)), compensated=True),
                       biased=("down_proj", "o_proj"))
    assert after == BlockWidths(4, 2, 16, 40, ("o_proj", "down_proj"))  # 2 groups x 2 query heads; projection order
    # a second pruning pass starts from the first one's widths and keeps indices into them
    again = plan.prune(0, after, Structure(kept_mlp_channels=[1, 5]))
    assert again == BlockWidths(4, 2, 16, 2, ("o_proj", "down_proj"))
    assert plan.to_dict() == {"passes": [], "layers": {"0": {"kept_kv_groups": [0, 2], "kept_mlp_channels": [1, 5],
                                                             "compensated": False}}}


def test_prune_refuses_a_pass_that_saw_other_widths():
    plan = Plan()
    plan.prune(0, DENSE, Structure(kept_mlp_channels=[0]))
    with pytest.raises(ValueError, match="block 0 is"):
        plan.prune(0, DENSE, Structure(kept_mlp_channels=[0]))


def test_widths_need_every_block():
    plan = Plan()
    plan.prune(1, DENSE, Structure(kept_mlp_channels=[0]))
    with pytest.raises(ValueError, match=r"blocks \[1\] are not every block from 0"):
        _ = plan.widths


def _record(out_f: int, in_f: int, bits: int = 4, group: int = 32) -> QuantRecord:
    g = torch.Generator().manual_seed(out_f * in_f)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    n_groups = in_f // group
    return QuantRecord(bits=bits, group_size=group, sym=True, shape=(out_f, in_f), packed=pack(codes, bits, 1),
                       scale=torch.rand(out_f, n_groups, generator=g) + 0.5,
                       zero=torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32),
                       g_idx=(torch.arange(in_f) // group).to(torch.int32))



def _config(**over) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3,
            "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "attention_bias": False, "mlp_bias": False, **over}


def _modules(widths: list[BlockWidths]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """A model's tensors module by module (state-dict order), o_proj of every block with a bias."""
    g = torch.Generator().manual_seed(0)
    mods = [("model.embed_tokens", {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)})]
    for i, w in enumerate(widths):
        q, kv = w.num_attention_heads * w.head_dim, w.num_key_value_heads * w.head_dim
        shapes = {"self_attn.q_proj": (q, HIDDEN), "self_attn.k_proj": (kv, HIDDEN), "self_attn.v_proj": (kv, HIDDEN),
                  "self_attn.o_proj": (HIDDEN, q), "mlp.gate_proj": (w.intermediate_size, HIDDEN),
                  "mlp.up_proj": (w.intermediate_size, HIDDEN), "mlp.down_proj": (HIDDEN, w.intermediate_size)}
        for name, shape in shapes.items():
            m = f"model.layers.{i}.{name}"
            parts = {f"{m}.weight": torch.randn(*shape, generator=g)}
            if name.endswith("o_proj"):
                parts[f"{m}.bias"] = torch.randn(HIDDEN, generator=g)
            mods.append((m, parts))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            mods.append((f"model.layers.{i}.{norm}", {f"model.layers.{i}.{norm}.weight": torch.ones(HIDDEN)}))
    mods += [("model.norm", {"model.norm.weight": torch.ones(HIDDEN)}),
             ("lm_head", {"lm_head.weight": mods[0][1]["model.embed_tokens.weight"]})]
    return mods


def _write(tmp_path, plan: StubPlan, quant_format="compressed-tensors", **config_over):
    provenance = export.Provenance(folder=tmp_path / "source", source={"name": "t", "identity": "t", "path": "t"},
                                   config=_config(**config_over), recipe={"name": "t"}, recipe_yaml="name: t\n", seed=0)
    (tmp_path / "source").mkdir(parents=True, exist_ok=True)
    report: dict = {}
    checked = []
    notes = export.write(tmp_path / "art", _modules(plan.widths), plan, report, provenance,
                         export.ExportSettings(dtype=torch.float32, quant_format=quant_format),
                         check=lambda folder: checked.append(folder) or {"verify": "ok"},
                         card=lambda rep: f"card {rep['verify']}\n")
    return report, checked, notes


def test_write_fills_zero_biases_from_the_plan_and_drops_tied_head(tmp_path):
    biased = DENSE.with_bias("o_proj")
    plan = StubPlan([biased, biased], {"model.layers.1.mlp.up_proj": _record(128, HIDDEN)})
    report, checked, notes = _write(tmp_path, plan)
    art = tmp_path / "art"
    assert notes == [] and len(checked) == 1 and not checked[0].exists()  # checked in the temporary folder
    assert report["stock_config"] is True and report["verify"] == "ok"
    config = json.loads((art / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is False  # o_proj's bias needs the flag
    state = load_file(art / "model.safetensors")
    assert "lm_head.weight" not in state  # tied to the embeddings
    assert state["model.layers.0.self_attn.q_proj.bias"].shape == (96,)  # 6 heads x 16, from the plan's widths
    assert state["model.layers.0.self_attn.k_proj.bias"].shape == (48,)
    assert float(state["model.layers.0.self_attn.k_proj.bias"].abs().sum()) == 0.0
    assert "model.layers.1.mlp.up_proj.weight" not in state
    assert state["model.layers.1.mlp.up_proj.weight_packed"].shape == (128, HIDDEN * 4 // 32)
    # codes 4 bits + one 16-bit scale per 32 weights = 4.5 bits per weight (a float32 export stores float16 scales)
    assert report["bits_per_weight"] == {"stored": 4.5, "theory": 4.5, "quantized_weights": 128 * HIDDEN}
    assert state["model.layers.1.mlp.up_proj.weight_scale"].dtype == torch.float16
    text = (art / "manifest.json").read_text()
    manifest = Manifest.model_validate(json.loads(text))
    assert manifest.dumps() == text  # one class writes and reads it
    assert manifest.quantization["model.layers.1.mlp.up_proj"].bits == 4
    assert (art / "README.md").read_text() == "card ok\n"
    assert json.loads((art / "report.json").read_text())["weights_bytes"]["compressed"] == (
        (art / "model.safetensors").stat().st_size)


def test_write_per_layer_widths_and_gptq_refusal(tmp_path):
    pruned = BlockWidths(4, 2, 16, 64, ("o_proj",))
    report, _, _ = _write(tmp_path, StubPlan([DENSE.with_bias("o_proj"), pruned]))
    assert report["stock_config"] is False
    layers = json.loads((tmp_path / "art" / "manifest.json").read_text())["architecture"]["layers"]
    assert layers[1] == {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64,
                         "bias": ["o_proj"]}
    with pytest.raises(export.UnwritableError, match="export.quant_format: gptq cannot store this model"):
        _write(tmp_path / "g", StubPlan([DENSE, pruned], {"model.layers.1.mlp.up_proj": _record(64, HIDDEN)}), "gptq")
    assert not (tmp_path / "g" / "art").exists()


def test_write_refuses_a_bias_the_plan_does_not_record(tmp_path):
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.o_proj.bias: a bias that the plan does not"):
        _write(tmp_path, StubPlan([DENSE, DENSE.with_bias("o_proj")]))
    assert not (tmp_path / "art").exists()


def test_a_failed_check_commits_nothing(tmp_path):
    plan = StubPlan([DENSE.with_bias("o_proj")] * 2)
    provenance = export.Provenance(folder=tmp_path, source={"name": "t", "identity": "t", "path": "t"},
                                   config=_config(), recipe={}, recipe_yaml="", seed=0)

    def check(folder):
        raise RuntimeError("reload differs")

    with pytest.raises(RuntimeError, match="reload differs"):
        export.write(tmp_path / "art", _modules(plan.widths), plan, {}, provenance,
                     export.ExportSettings(dtype=torch.float32), check=check, card=lambda rep: "")
    assert [p.name for p in tmp_path.iterdir()] == []
