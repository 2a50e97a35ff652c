"""The quantize passes end to end on tiny models: packed artifacts, stock loading, mixed precision, errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import export
from compress import api
from compress.cli import cli

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    """hidden 128 and MLP 256: group sizes 32 and 64 divide every projection."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-q"), "llama", hidden_size=128, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=16, intermediate_size=256, num_hidden_layers=4)


def _run(model, passes, out, extra=()):
    return api.run({"name": "q", "model": str(model), "passes": passes}, out=out, overrides=[*SMALL, *extra], **QUIET)


def _bits_per_weight(artifact) -> float:
    manifest = json.loads((artifact / "manifest.json").read_text())
    total_bits = n_weights = 0
    for name, scheme in manifest["quantization"].items():
        out_f, in_f = scheme["shape"]
        n_weights += out_f * in_f
        with safe_open(artifact / "model.safetensors", framework="pt") as f:
            for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
                key = f"{name}.{suffix}"
                if key in f.keys():
                    t = f.get_tensor(key)
                    total_bits += t.numel() * t.element_size() * 8
    return total_bits / n_weights


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gptq_w4_artifact_loads_in_stock_transformers(tiny_q, tmp_path):
    from transformers import AutoModelForCausalLM

    res = _run(tiny_q, [{"pass": "gptq", "bits": 4, "group_size": 32}], tmp_path / "a")
    rep = res.report
    assert rep["stock_config"] is True and rep["verify"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((res.artifact / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert list(qc["config_groups"].values())[0]["weights"]["num_bits"] == 4
    # 4-bit codes + one 16-bit scale per 32 weights = 4.5 bits per weight (float16 scales beside float32 weights)
    assert _bits_per_weight(res.artifact) == pytest.approx(4 + 16 / 32, rel=0.02)
    assert rep["bits_per_weight"]["stored"] == pytest.approx(rep["bits_per_weight"]["theory"], rel=0.02)
    assert rep["bits_per_weight"]["stored"] == pytest.approx(_bits_per_weight(res.artifact), rel=1e-6)
    assert rep["weights_bytes"]["compressed"] < 0.6 * rep["weights_bytes"]["dense"]
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = export.load(res.artifact)
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32).eval()
    assert (_logits(stock, ids) - _logits(ours, ids)).abs().max() < 1e-3
    q = ours.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "QuantLinear" and q.weight_packed.dtype == torch.int32  # memory held stays packed


def test_gptq_beats_rtn_on_held_out_text(tiny_q, tmp_path):
    ppl = {}
    for method in ("gptq", "rtn"):
        res = _run(tiny_q, [{"pass": method, "bits": 3, "group_size": 32}], tmp_path / method)
        ppl[method] = res.report["quality"][0]["compressed ppl"]
    assert ppl["gptq"] < ppl["rtn"]


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_asymmetric_widths_round_trip_with_our_loader(tiny_q, tmp_path, bits):
    res = _run(tiny_q, [{"pass": "rtn", "bits": bits, "group_size": 64, "sym": False}], tmp_path / "a")
    assert res.report["stock_config"] is False and "asymmetric" in res.report["stock_config_reason"]
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4
    assert _bits_per_weight(res.artifact) == pytest.approx(bits + (16 + bits) / 64, rel=0.02)  # 16-bit scale
    with pytest.raises((ValueError, KeyError)):  # stock transformers refuses rather than loading wrong weights
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(res.artifact)


def test_act_order_without_static_groups_keeps_g_idx(tiny_q, tmp_path):
    res = _run(tiny_q, [{"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": False}],
               tmp_path / "a")
    assert res.report["stock_config"] is False and "g_idx" in res.report["stock_config_reason"]
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert any(k.endswith("weight_g_idx") for k in manifest["tensors"])


def test_mixed_precision_meets_average_and_fused_groups_share(tiny_q, tmp_path):
    res = _run(tiny_q, [{"pass": "gptq", "bits": {"average": 3.5, "choices": [3, 4], "importance": "lim"},
                         "group_size": 32}], tmp_path / "a")
    summary = res.report["passes"][0]["summary"]
    assert summary["layer_bits"].count(4) == 2 and summary["layer_bits"].count(3) == 2
    assert summary["average_bits"] <= 3.5
    scores = summary["importance"]["scores"]
    top = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert all(summary["layer_bits"][i] == 4 for i in top)  # the most changed layers get the wider width
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    for i in range(4):
        widths = {s["bits"] for n, s in manifest["quantization"].items() if n.startswith(f"model.layers.{i}.")}
        assert len(widths) == 1
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert len(cfg["quantization_config"]["config_groups"]) == 2


def _widths(manifest: dict, short: str) -> set[int]:
    return {s["bits"] for n, s in manifest.items() if n.endswith(short)}


def test_override_bits_pin_modules_under_mixed_precision(tiny_q, tmp_path):
    """down_proj pinned at 8 bits (23.5% of the weights): the ranking spends only what is left of 4.5 bits on the
    rest, (4.5 - 8 * 0.235) / 0.765 = 3.42 bits, so one of the four equal layers gets 4 bits, the others 3."""
    res = _run(tiny_q, [{"pass": "gptq", "group_size": 32, "bits": {"average": 4.5, "choices": [3, 4]},
                         "overrides": [{"pattern": r"down_proj", "bits": 8}]}], tmp_path / "a")
    summary = res.report["passes"][0]["summary"]
    manifest = json.loads((res.artifact / "manifest.json").read_text())["quantization"]
    assert _widths(manifest, "down_proj") == {8}
    assert sorted(s["bits"] for n, s in manifest.items() if n.endswith("q_proj")) == [3, 3, 3, 4]
    n = sum(s["shape"][0] * s["shape"][1] for s in manifest.values())
    avg = sum(s["bits"] * s["shape"][0] * s["shape"][1] for s in manifest.values()) / n
    assert avg <= 4.5 and summary["average_bits"] == pytest.approx(avg, abs=1e-4)
    assert len(summary["pinned"]) == 4 and set(summary["pinned"].values()) == {8}
    assert sorted(summary["layer_bits"]) == [4.176, 4.176, 4.176, 4.941]  # (3 or 4) * 0.765 + 8 * 0.235
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4


def test_override_bits_pin_units_in_the_knapsack(tiny_q, tmp_path, monkeypatch):
    """A pinned unit has one option: its variants exist only at that width, and the knapsack fills the rest."""
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    res = _run(tiny_q, [{"pass": "gptq", "group_size": 32,
                         "bits": {"average": 4.5, "choices": [3, 4], "allocator": "knapsack", "error_windows": 2},
                         "overrides": [{"pattern": r"down_proj", "bits": 8}]}], tmp_path / "a")
    summary = res.report["passes"][0]["summary"]
    manifest = json.loads((res.artifact / "manifest.json").read_text())["quantization"]
    assert _widths(manifest, "down_proj") == {8}
    assert {b for u, b in summary["unit_bits"].items() if u.endswith(".down")} == {8}
    free = [b for u, b in summary["unit_bits"].items() if not u.endswith(".down")]
    assert set(free) == {3, 4}  # the budget left after the pinned units is spent on a mix
    assert summary["average_bits"] <= 4.5
    variants = Path(summary["variants"])
    assert len(list(variants.glob("*.safetensors"))) == 4 * (6 * 2 + 1)  # down_proj only at its pinned width
    kl = json.loads((variants / "unit_kl-2w.json").read_text())
    assert {k for k in kl if ".down@" in k} == {f"model.layers.{i}.down@8" for i in range(4)}


def test_adaptive_flap_then_gptq_with_matching_round_to(tiny_q, tmp_path):
    """passes: [flap, gptq] composes once the pruning keeps widths the groups divide; widths still differ per layer."""
    res = _run(tiny_q, [{"pass": "flap", "target": 0.3, "round_to": 8}, {"pass": "gptq", "bits": 4, "group_size": 8}],
               tmp_path / "a")
    manifest = json.loads((res.artifact / "manifest.json").read_text())["quantization"]
    widths = [s["shape"][1] for n, s in manifest.items() if n.endswith("down_proj")]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 256 and len(set(widths)) > 1
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4


def test_overrides_and_targets(tiny_q, tmp_path):
    res = _run(tiny_q, [{"pass": "gptq", "bits": 4, "group_size": 32, "ignore": [r"layers\.0\."],
                         "overrides": [{"pattern": r"mlp\.down_proj", "bits": 8}]}], tmp_path / "a")
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    q = manifest["quantization"]
    assert not any(n.startswith("model.layers.0.") for n in q)
    assert q["model.layers.1.mlp.down_proj"]["bits"] == 8 and q["model.layers.1.mlp.up_proj"]["bits"] == 4
    assert "model.layers.0.mlp.down_proj.weight" in manifest["tensors"]  # left dense


def test_prune_then_quantize_is_stock(tiny_q, tmp_path):
    res = _run(tiny_q, [{"pass": "flap", "target": 0.3, "structure": "uniform", "round_to": 32},
                        {"pass": "gptq", "bits": 4, "group_size": 32}], tmp_path / "a")
    assert res.report["stock_config"] is True
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(2))
    assert (_logits(stock, ids) - _logits(export.load(res.artifact), ids)).abs().max() < 1e-3


@pytest.mark.parametrize("passes, expected", [
    ([{"pass": "gptq", "bits": 5}], "passes.0.bits"),
    ([{"pass": "gptq", "bits": 4, "group_size": 48}], "group_size: 48 does not divide"),
    ([{"pass": "gptq", "bits": {"average": 9}}], "cannot be met with choices"),
    ([{"pass": "gptq", "bits": {"average": 1.5, "choices": [2, 4]}}], "cannot be met"),
    ([{"pass": "rtn", "targets": ["nothing_here"]}], "matched no module"),
    ([{"pass": "rtn", "targets": [r"q_proj"]}], "k_proj of layer 0 is not"),
    ([{"pass": "rtn", "group_size": 32, "overrides": [{"pattern": "k_proj", "bits": 8}]}], "share one scheme"),
    ([{"pass": "rtn", "group_size": 32}, {"pass": "gptq", "group_size": 32}], "already quantized"),
    ([{"pass": "rtn", "group_size": 32, "bits": {"average": 3, "allocator": "knapsack"}}], "use pass: gptq"),
    ([{"pass": "gptq", "group_size": 32, "bits": {"average": 3, "allocator": "knapsack", "error_windows": 9}}],
     "scores on 9 calibration windows but calibration.windows is 8"),
    ([{"pass": "gptq", "group_size": 32,
       "bits": {"average": 3, "allocator": "evolution", "evolution": {"survivors": [2, 1], "stage_windows": [2, 4]}}}],
     "stage_windows needs one entry per stage: 3"),
    # an override's bits pin modules outside the allocation: the rest must still be able to meet the average
    ([{"pass": "gptq", "group_size": 32, "bits": {"average": 3.0, "choices": [3, 4]},
       "overrides": [{"pattern": r"\.mlp\.", "bits": 2}]}],
     "passes.0.bits.average: 3.0 cannot be met: the overrides fix 71% of the quantized weights at 2 bits, which "
     "leaves 5.400 bits per weight for the rest, outside the choices [3, 4]"),
    ([{"pass": "gptq", "group_size": 32, "bits": {"average": 3.0, "choices": [3, 4], "allocator": "knapsack"},
       "overrides": [{"pattern": "q_proj", "bits": 8}]}],
     "passes.0.overrides pin model.layers.0.self_attn.q_proj to 8 bits but leave model.layers.0.self_attn.k_proj to "
     "the allocation; fused groups (q/k/v, gate/up) share one scheme"),
    ([{"pass": "gptq", "group_size": 32, "bits": {"average": 3.0, "choices": [3, 4]},
       "overrides": [{"pattern": "proj", "bits": 8}]}], "fix the width of every targeted module"),
    # pruned widths a later quantization cannot group: refused before any pass runs (a Tyr search is minutes)
    ([{"pass": "flap", "target": 0.3}, {"pass": "gptq", "group_size": 32}],
     "passes.0.round_to: 8 changes MLP widths in steps that passes.1.group_size 32 does not divide "
     "(model.layers.0.mlp.down_proj reads the MLP width); set passes.0.round_to to a multiple of 32"),
    ([{"pass": "cfsp", "target": 0.3}, {"pass": "rtn", "group_size": 64}], "set passes.0.round_to to a multiple of 64"),
    ([{"pass": "flap", "target": 0.3}, {"pass": "gptq", "group_size": 64, "overrides": [{"pattern": "mlp", "group_size": 32}]}],
     "passes.0.round_to: 8 changes MLP widths in steps that passes.1.overrides.0.group_size 32 does not divide"),
    ([{"pass": "flap", "target": 0.3, "round_to": 32},
      {"pass": "gptq", "group_size": 32, "bits": {"average": 3.0, "choices": [3, 4]}, "overrides": [{"pattern": "up_proj", "bits": 8}]}],
     "passes.1.overrides leave model.layers.0.mlp.gate_proj to the allocation but pin model.layers.0.mlp.up_proj "
     "to 8 bits"),
    ([{"pass": "gptq", "group_size": 32, "bits": {"average": 5.0, "choices": [3, 4]}, "overrides": [{"pattern": "nothing", "bits": 8}]}],
     "passes.0.bits.average: 5.0 cannot be met with choices [3, 4]: it must lie in [3, 4] (no override's bits"),
    ([{"pass": "tyr", "target": 0.3, "round_to": 128}, {"pass": "gptq", "group_size": 128}],
     "passes.1.group_size: 128 does not divide the 64 input columns of model.layers.0.self_attn.o_proj that "
     "passes.0 removes with each key-value group"),
])
def test_bad_quantization_input(tiny_q, tmp_path, passes, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "q", "model": str(tiny_q), "passes": passes}))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(out), *sum((["--set", o] for o in SMALL), [])])
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert not out.exists()
    assert not re.search(r"passes\[0\] \w+ \(\d+ s\)", res.output)  # refused before the first pass ran


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_format_export_round_trips(tiny_q, tmp_path, bits):
    """GPTQ (v1) layout: qweight (in*bits/32, out), qzeros = zero - 1, fp16 scales; our loader reads it back exactly.
    (gptqmodel 7.6.0 dequantizes these tensors to the same weights bit for bit; see docs/format.md.)"""
    res = _run(tiny_q, [{"pass": "gptq", "bits": bits, "group_size": 32}], tmp_path / "a",
               extra=["export.quant_format=gptq"])
    rep = res.report
    assert rep["stock_config"] is True and rep["verify"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((res.artifact / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["sym"] is True
    with safe_open(res.artifact / "model.safetensors", framework="pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        qz = f.get_tensor("model.layers.0.mlp.down_proj.qzeros")
        sc = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    assert qw.shape == (256 * bits // 32, 128) and sc.shape == (256 // 32, 128) and sc.dtype == torch.float16
    from export.packing import unpack

    assert (unpack(qz, bits, 128, dim=1) == 2 ** (bits - 1) - 1).all()  # v1 stores the symmetric zero minus one
    assert rep["bits_per_weight"]["stored"] == pytest.approx(rep["bits_per_weight"]["theory"], rel=1e-6)


@pytest.mark.parametrize("passes", [
    [{"pass": "gptq", "bits": {"average": 3.5, "choices": [3, 4]}, "group_size": 32}],
    [{"pass": "gptq", "bits": 4, "group_size": 32, "sym": False}],
    [{"pass": "gptq", "bits": 4, "group_size": 32, "ignore": ["layers\\.0\\."]}],
    [{"pass": "flap", "target": 0.3}],
])
def test_gptq_format_refuses_what_it_cannot_store(tiny_q, tmp_path, passes):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "q", "model": str(tiny_q), "passes": passes,
                                  "export": {"quant_format": "gptq"}}))
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 2 and "export.quant_format" in res.output, res.output


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_format_loads_in_transformers_and_gptqmodel(tiny_q, tmp_path, bits):
    """Stock transformers (optimum + gptqmodel 7.6.0, its torch kernel) runs the GPTQ-format artifact in fp32 with our
    runtime's logits; gptqmodel's own loader (fp16/bf16 only) dequantizes to our weights bit for bit."""
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    res = _run(tiny_q, [{"pass": "gptq", "bits": bits, "group_size": 32}], tmp_path / "a",
               extra=["export.quant_format=gptq"])
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = export.load(res.artifact)
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32,
                                                 quantization_config=GPTQConfig(bits=bits, backend="torch")).eval()
    assert type(stock.model.layers[0].mlp.up_proj).__name__ == "TorchLinear"
    assert (_logits(stock, ids) - _logits(ours, ids)).abs().max() < 1e-3

    theirs = GPTQModel.load(str(res.artifact), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
        w_theirs = theirs.get_submodule(name).dequantize_weight().T
        assert torch.equal(w_theirs.float(), ours.get_submodule(name).dequantized().float())
    ours16 = export.load(res.artifact, dtype="float16")
    # both compute in fp16 here; the logits (scale ~4) agree to a few fp16 steps (one step at 4 is 0.004)
    assert (_logits(theirs, ids).float() - _logits(ours16, ids).float()).abs().max() < 0.03


def test_knapsack_allocation_meets_budget_shares_fused_groups_and_reuses_variants(tiny_q, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    passes = [{"pass": "gptq", "group_size": 32,
               "bits": {"average": 3.0, "choices": [2, 3, 4], "allocator": "knapsack", "error_windows": 2}}]
    res = _run(tiny_q, passes, tmp_path / "a")
    summary = res.report["passes"][0]["summary"]
    assert summary["allocator"] == "knapsack" and summary["knapsack"]["exact"] is True
    assert summary["variants_reused"] is False
    assert summary["average_bits"] <= 3.0 and len(set(summary["unit_bits"].values())) > 1  # a real mix
    manifest = json.loads((res.artifact / "manifest.json").read_text())["quantization"]
    for layer in range(4):  # fused groups share one width in the artifact
        p = f"model.layers.{layer}."
        assert len({manifest[p + f"self_attn.{m}_proj"]["bits"] for m in "qkv"}) == 1
        assert manifest[p + "mlp.gate_proj"]["bits"] == manifest[p + "mlp.up_proj"]["bits"]
        assert manifest[p + "self_attn.q_proj"]["bits"] == summary["unit_bits"][p + "qkv"]
    n = sum(s["shape"][0] * s["shape"][1] for s in manifest.values())
    assert sum(s["bits"] * s["shape"][0] * s["shape"][1] for s in manifest.values()) / n <= 3.0
    variants = Path(summary["variants"])
    assert len(list(variants.glob("*.safetensors"))) == 28 * 3 and (variants / "unit_kl-2w.json").exists()
    # the summed KL of the chosen widths is the least any allocation within the budget has: uniform 3 bits is one
    kl = json.loads((variants / "unit_kl-2w.json").read_text())
    assert summary["knapsack"]["summed_unit_kl"] <= sum(v for k, v in kl.items() if k.endswith("@3")) + 1e-9
    # a rerun reuses the variants and the measured errors: the same artifact weights
    stamp = {p: p.stat().st_mtime_ns for p in variants.iterdir()}
    again = _run(tiny_q, passes, tmp_path / "b")
    assert {p: p.stat().st_mtime_ns for p in variants.iterdir()} == stamp
    assert again.report["passes"][0]["summary"]["variants_reused"] is True
    with safe_open(res.artifact / "model.safetensors", "pt") as f, safe_open(again.artifact / "model.safetensors", "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    # another budget searches the same variants and errors: nothing recomputed
    wider = _run(tiny_q, [{**passes[0], "bits": {**passes[0]["bits"], "average": 3.5}}], tmp_path / "c")
    assert wider.report["passes"][0]["summary"]["variants"] == str(variants)
    assert {p: p.stat().st_mtime_ns for p in variants.iterdir()} == stamp
    assert wider.report["passes"][0]["summary"]["average_bits"] > 3.0
    # a budget nearest another width calibrates later blocks at that width: its own variants, never these
    low = _run(tiny_q, [{**passes[0], "bits": {**passes[0]["bits"], "average": 2.4}}], tmp_path / "d")
    assert low.report["passes"][0]["summary"]["variants"] != str(variants)
    assert low.report["passes"][0]["summary"]["variants_reused"] is False


def test_evolution_refines_the_knapsack_and_resumes(tiny_q, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    evo = {"generations": 4, "offspring": 4, "survivors": [2], "stage_windows": [2, 4]}
    passes = [{"pass": "gptq", "group_size": 32, "bits": {"average": 3.0, "choices": [2, 3, 4], "allocator": "evolution",
                                                           "error_windows": 2, "evolution": evo}}]
    res = _run(tiny_q, passes, tmp_path / "a")
    summary = res.report["passes"][0]["summary"]
    ev = summary["evolution"]
    assert summary["allocator"] == "evolution" and summary["average_bits"] <= 3.0
    assert len(ev["kl_by_generation"]) == 5 and ev["final_kl"] <= ev["start_kl"]
    assert all(b <= a for a, b in zip(ev["kl_by_generation"], ev["kl_by_generation"][1:]))
    assert ev["evaluations"] == 1 + 4 * (4 + 2)  # start, then per generation: 4 offspring on stage 0, 2 finalists
    state, = Path(summary["variants"]).glob("evolution-*.json")
    assert json.loads(state.read_text())["generation"] == 4
    again = _run(tiny_q, passes, tmp_path / "b")  # the saved state is complete: nothing left to search
    ev2 = again.report["passes"][0]["summary"]["evolution"]
    assert ev2["resumed_from"] == 4 and ev2["final_kl"] == ev["final_kl"]
    assert again.report["passes"][0]["summary"]["unit_bits"] == summary["unit_bits"]
