"""End to end on tiny models of every supported architecture: budget met, artifact reloads with identical logits,
stock transformers loads the uniform (stock-config) case and refuses the per-layer one."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import export
from compress import api

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]


def _recipe(model, structure, **flap):
    return {"name": "tiny", "model": str(model),
            "passes": [{"pass": "flap", "target": 0.3, "structure": structure, **flap}]}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
def test_run_reload_equal(tiny_any, tmp_path, structure):
    res = api.run(_recipe(tiny_any, structure), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    # adaptive: the global threshold stops at the unit whose cumulative cost is nearest the budget; one key-value group
    # is about 5% of these tiny models' decoder parameters, so the cut can miss by half of that (2.4%)
    assert abs(rep["decoder_params"]["removed"] - 0.3) < (0.025 if structure == "adaptive" else 0.02)
    assert rep["verify"]["max_abs_logit_diff"] < 1e-4
    assert {q["text"] for q in rep["quality"]} == {"pydoc-heldout", "licenses"}
    assert export.verify(res.artifact) == []
    model = export.load(res.artifact)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids[:1, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(tiny_any.resolve())
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "recipe.yaml", "report.json", "README.md",
                                      "tokenizer.json", "plan.json"}
    card = (res.artifact / "README.md").read_text()
    assert "| pydoc-heldout |" in card
    # the card shows the structure per layer, as the report has it
    assert "## passes[0]: flap" in card and "| layer | q_heads | kv_heads | mlp | kept |" in card
    first = rep["passes"][0]["rows"][0]
    assert f"| 0 | {first['q_heads']} | {first['kv_heads']} | {first['mlp']} |" in card


def test_uniform_llama_loads_in_stock_transformers(tiny_llama, tmp_path):
    res = api.run(_recipe(tiny_llama, "uniform"), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    assert res.report["stock_config"] is True
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["attention_bias"] and cfg["mlp_bias"]
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32).eval()
    ours = export.load(res.artifact)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (_logits(stock, ids) - _logits(ours, ids)).abs().max() < 1e-4
    assert stock.model.layers[0].self_attn.q_proj.bias.abs().max() == 0  # zero biases where none were added


def test_no_compensation_uniform_llama_has_no_biases(tiny_llama, tmp_path):
    res = api.run(_recipe(tiny_llama, "uniform", compensate=False), out=tmp_path / "art", overrides=SMALL,
                  log=lambda *_: None)
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False


def test_adaptive_artifact_is_refused_by_stock_transformers(tiny_llama, tmp_path):
    res = api.run(_recipe(tiny_llama, "adaptive"), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert cfg["model_type"] == "compress_pruned" and len(cfg["layers"]) == 3
    widths = {(l["num_key_value_heads"], l["intermediate_size"]) for l in cfg["layers"]}
    assert len(widths) > 1
    with pytest.raises((ValueError, KeyError)):
        AutoModelForCausalLM.from_pretrained(res.artifact)


def test_wanda_sp_baseline_runs(tiny_llama, tmp_path):
    recipe = {"name": "tiny", "model": str(tiny_llama), "passes": [{"pass": "wanda_sp", "target": 0.3}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    assert res.report["passes"][0]["summary"]["compensated"] is False
    assert res.report["stock_config"] is True  # uniform, no biases


def test_inspect_and_eval(tiny_llama, tmp_path):
    res = api.run(_recipe(tiny_llama, "adaptive"), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    ins = api.inspect(res.artifact)
    assert len(ins.layer_rows()) == 3 and "flap" in str(ins)
    ev = api.eval(res.artifact, max_windows=2, new_tokens=4)
    dense, comp = ev.rows
    assert dense["params"] > comp["params"] and dense["weights MB"] > comp["weights MB"]
    assert comp["recovery pydoc-heldout"] == pytest.approx(dense["ppl pydoc-heldout"] / comp["ppl pydoc-heldout"], rel=1e-3)
    assert comp["ppl pydoc-heldout"] == pytest.approx(res.report["quality"][0]["compressed ppl"], rel=0.2)


def test_sharded_untied_artifact_round_trips(tmp_path):
    from tests.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "untied", "llama", tie_word_embeddings=False)
    res = api.run(_recipe(src, "adaptive"), out=tmp_path / "art", log=lambda *_: None,
                  overrides=SMALL + ["export.shard_size_mb=0.25"])
    shards = sorted(p.name for p in res.artifact.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (res.artifact / "model.safetensors.index.json").is_file()
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert "lm_head.weight" in manifest["tensors"]  # untied: stored
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4 and export.verify(res.artifact) == []


def test_bfloat16_export_matches_rounded_model(tiny_llama, tmp_path):
    res = api.run(_recipe(tiny_llama, "uniform"), out=tmp_path / "art", log=lambda *_: None,
                  overrides=SMALL + ["export.dtype=bfloat16"])
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"bfloat16"}
    assert res.report["verify"]["max_abs_logit_diff"] < 1e-4
    assert export.load(res.artifact, dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16


def test_cli_good_paths(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {tiny_llama}\npasses: [{{pass: flap, target: 0.25}}]\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(recipe), "--json", "--set", "passes.0.structure=uniform"])
    assert res.exit_code == 0 and json.loads(res.output)["passes"][0]["structure"] == "uniform"
    art = tmp_path / "art"
    res = runner.invoke(cli, ["run", "-r", str(recipe), "--out", str(art), "--json", *sum((["--set", o] for o in SMALL), [])])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # the log goes to stderr with --json
    assert data["artifact"] == str(art) and abs(data["decoder_params"]["removed"] - 0.25) < 0.01
    res = runner.invoke(cli, ["inspect", str(art), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["layers"]) == 3


@pytest.mark.parametrize("compensate", [False, True])
def test_cfsp_prunes_mlp_only_to_budget_and_reloads(tiny_any, tmp_path, compensate):
    recipe = {"name": "tiny", "model": str(tiny_any),
              "passes": [{"pass": "cfsp", "target": 0.3, "compensate": compensate, "temperature": 2.0}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    assert abs(rep["decoder_params"]["removed"] - 0.3) < 0.01
    assert rep["verify"]["max_abs_logit_diff"] < 1e-4
    rows = rep["passes"][0]["rows"]
    widths = [int(r["mlp"].split("/")[0]) for r in rows]
    assert len(set(widths)) > 1  # budgets differ per block
    order = sorted(range(len(rows)), key=lambda i: rows[i]["angular distance"])
    assert widths[order[-1]] >= widths[order[0]]  # the block that changes its input most keeps the most
    model = export.load(res.artifact)
    for layer, w in zip(model.model.layers, widths):
        assert layer.mlp.down_proj.in_features == w
        assert layer.self_attn.q_proj.weight.shape == tiny_any_shape(tiny_any)  # attention untouched
        assert (layer.mlp.down_proj.bias is not None) == compensate


def tiny_any_shape(path):
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return (cfg["num_attention_heads"] * head_dim, cfg["hidden_size"])


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory):
    """MLP width 768 = 3 x 256, so CFSP widths rounded to 256 are expressible as nemotron-nas blocks."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-wide"), "llama", hidden_size=128, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=16, intermediate_size=768, num_hidden_layers=4)


def test_non_uniform_artifact_views_block_configs_and_remote_code(tiny_wide, tmp_path):
    recipe = {"name": "tiny", "model": str(tiny_wide), "export": {"remote_code": True},
              "passes": [{"pass": "cfsp", "target": 0.3, "round_to": 256, "temperature": 3.0}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    assert rep["stock_config"] is False and rep["remote_code"] is True
    assert rep["block_configs"].startswith("written")
    cfg = json.loads((res.artifact / "config.json").read_text())
    ours = export.load(res.artifact)
    # the block_configs view decodes (DeciLM's formulas) to exactly the per-layer shapes of the loaded model
    assert len(cfg["block_configs"]) == len(cfg["layers"]) == len(ours.model.layers)
    for block, spec, layer in zip(cfg["block_configs"], cfg["layers"], ours.model.layers):
        inter = -(-int(2 * block["ffn"]["ffn_mult"] * cfg["hidden_size"] / 3) // 256) * 256
        kv = cfg["num_attention_heads"] // block["attention"]["n_heads_in_group"]
        assert inter == spec["intermediate_size"] == layer.mlp.down_proj.in_features
        assert kv == spec["num_key_value_heads"] == layer.self_attn.k_proj.out_features // spec["head_dim"]
        assert not block["attention"]["no_op"] and not block["ffn"]["no_op"]
    assert len({l["intermediate_size"] for l in cfg["layers"]}) > 1
    # stock transformers runs the shipped modeling code only when trusted, with our logits
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, trust_remote_code=True, dtype=torch.float32).eval()
    assert (_logits(stock, ids) - _logits(ours, ids)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(res.artifact, trust_remote_code=False)


def test_block_configs_not_written_when_inexpressible(tiny_llama, tmp_path):
    """FLAP removes whole kv groups (query heads differ per block) and adds biases: the report says why."""
    res = api.run(_recipe(tiny_llama, "adaptive"), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    assert res.report["block_configs"].startswith("not written: layer")
    assert "block_configs" not in json.loads((res.artifact / "config.json").read_text())
    assert res.report["remote_code"] is False
    with pytest.raises(ValueError):  # compress_pruned without shipped code: transformers refuses it
        AutoModelForCausalLM.from_pretrained(res.artifact)


def test_remote_code_with_quantization_is_refused(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "q", "model": str(tiny_llama), "export": {"remote_code": True},
                                  "passes": [{"pass": "rtn", "bits": 4, "group_size": 32}]}))
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 2 and "export.remote_code" in res.output, res.output


TYR_SEARCH = {"generations": 4, "offspring": 4, "survivors": [2], "stage_windows": [2, 4]}


def _tyr(model, **over):
    return {"name": "tiny-tyr", "model": str(model),
            "passes": [{"pass": "tyr", "target": 0.3, "evolution": TYR_SEARCH, **over}]}


@pytest.mark.parametrize("bias", [False, True])
def test_tyr_searches_per_unit_sparsity_within_budget_and_reloads(tiny_any, tmp_path, bias):
    res = api.run(_tyr(tiny_any, bias=bias), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    rep = res.report
    assert 0.3 <= rep["decoder_params"]["removed"] < 0.36  # never over budget; the search uses what it is given
    assert rep["verify"]["max_abs_logit_diff"] < 1e-4
    summary = rep["passes"][0]["summary"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["spacing"] == summary["rounds"][0]["spacing"] / 2
    for r in summary["rounds"]:
        kl = r["kl_by_generation"]
        assert all(b <= a for a, b in zip(kl, kl[1:]))  # elitist: the parent never worsens within a round
    assert summary["rounds"][0]["final_kl"] < summary["rounds"][0]["start_kl"]  # the search beats the uniform start
    model = export.load(res.artifact)
    rows = rep["passes"][0]["rows"]
    for layer, row in zip(model.model.layers, rows):
        kept, width = map(int, row["mlp"].split("/"))
        assert layer.mlp.down_proj.in_features == kept
        assert layer.self_attn.k_proj.out_features == int(row["kv_heads"].split("/")[0]) * layer.self_attn.head_dim
        # a pruned unit carries the refit bias when asked; a unit left whole is the dense one (no bias)
        assert (layer.mlp.down_proj.bias is not None) == (bias and kept < width)
    if bias:
        assert any(int(r["mlp"].split("/")[0]) < int(r["mlp"].split("/")[1]) for r in rows)
    assert len({r["mlp"] for r in rows} | {r["kv_heads"] for r in rows}) > 2  # widths differ per unit


def test_tyr_interrupted_run_resumes_to_the_same_result_and_refuses_changed_inputs(tiny_llama, tmp_path,
                                                                                    monkeypatch):
    from compress.errors import InputError
    from compress.search.scoring import TailKL

    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs-whole"))
    whole = api.run(_tyr(tiny_llama), out=tmp_path / "whole", overrides=SMALL, log=lambda *_: None)
    monkeypatch.setenv("COMPRESS_RUNS", str(tmp_path / "runs"))
    real, calls = TailKL.kl_from, []

    def dies_in_round_two(self, start):
        calls.append(start)
        if len(calls) == 40:  # round 1 uses 1 + 4 * (4 + 2) = 25 evaluations
            raise KeyboardInterrupt
        return real(self, start)

    monkeypatch.setattr(TailKL, "kl_from", dies_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        api.run(_tyr(tiny_llama), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None)
    assert not (tmp_path / "art").exists()  # nothing half-written
    monkeypatch.setattr(TailKL, "kl_from", real)
    # a resume whose recipe or data changed is refused, naming what changed
    with pytest.raises(InputError, match=r"what changed: recipe\.passes\.0\.target: 0\.3 -> 0\.25"):
        api.run(_tyr(tiny_llama, target=0.25), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None,
                resume=True)
    with pytest.raises(InputError, match=r"what changed: calibration tokens sha256.*recipe\.calibration\.windows"):
        api.run(_tyr(tiny_llama), out=tmp_path / "art", overrides=[*SMALL, "calibration.windows=7"],
                log=lambda *_: None, resume=True)
    resumed = api.run(_tyr(tiny_llama), out=tmp_path / "art", overrides=SMALL, log=lambda *_: None, resume=True)
    r1, r2 = resumed.report["passes"][0]["summary"]["rounds"]
    assert r1["resumed_from"] == 4 and r2["resumed_from"] is not None  # round 1 was done, round 2 mid-way
    assert resumed.report["passes"][0]["rows"] == whole.report["passes"][0]["rows"]
    assert r2["final_kl"] == whole.report["passes"][0]["summary"]["rounds"][1]["final_kl"]
    # finished: nothing left to resume
    with pytest.raises(InputError, match="no unfinished run"):
        api.run(_tyr(tiny_llama), out=tmp_path / "art2", overrides=SMALL, log=lambda *_: None, resume=True)


def test_cli_resume_without_an_interrupted_run_is_refused(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_tyr(tiny_llama)))
    res = CliRunner().invoke(cli, ["run", "--recipe", str(recipe), "--out", str(tmp_path / "art"), "--resume"])
    assert res.exit_code == 2 and "--resume: no unfinished run of" in res.output, res.output


@pytest.mark.parametrize("over, message", [
    ({"target": 0.6, "max_sparsity": 0.5}, "levels do not cover 60%"),
    ({"target": 0.0}, "passes.0.target: Input should be greater than 0"),  # a budget at or above the dense size
    ({"target": 1.0}, "passes.0.target: Input should be less than 1"),
    ({"levels": 1}, "passes.0.levels"),
    ({"evolution": {**TYR_SEARCH, "stage_windows": [2, 99]}}, "stage_windows"),
])
def test_tyr_bad_inputs(tiny_llama, tmp_path, over, message):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_tyr(tiny_llama, **over)))
    res = CliRunner().invoke(cli, ["run", "--recipe", str(recipe), "--out", str(tmp_path / "art"), *sum(
        (["--set", s] for s in SMALL), [])])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "art").exists()
