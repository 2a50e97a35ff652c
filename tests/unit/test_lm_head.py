"""The lm_head quantized by the quantize passes (`lm_head:`): untied from the embeddings, stored in our layout and the
stock formats, loaded with the same logits by our loader, stock transformers (compressed-tensors) and GPTQModel
(GPTQ format), GPTQ calibrated on the final norm's outputs, and the refusals by field."""

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import export
from compress import api
from compress.cli import cli

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]
HEAD = {"bits": 4, "group_size": 32}


@pytest.fixture(scope="module")
def tiny_h(tmp_path_factory):
    """hidden 128 (group sizes 32 and 64 divide it), embeddings tied to the lm_head as SmolLM2's are."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-h"), "llama", hidden_size=128, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=16, intermediate_size=256, num_hidden_layers=2)


def _run(model, passes, out, extra=()):
    return api.run({"name": "h", "model": str(model), "passes": passes}, out=out, overrides=[*SMALL, *extra],
                   log=lambda *_: None)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


def test_quantized_head_is_untied_stored_and_loads_in_stock_transformers(tiny_h, tmp_path):
    from transformers import AutoModelForCausalLM

    source = load_file(tiny_h / "model.safetensors")
    res = _run(tiny_h, [{"pass": "gptq", "bits": 4, "group_size": 32, "lm_head": HEAD}], tmp_path / "a")
    rep = res.report
    summary = rep["passes"][0]["summary"]["lm_head"]
    assert summary == {"bits": 4, "group_size": 32, "sym": True, "method": "gptq", "rel_err": summary["rel_err"],
                       "untied": True}
    assert 0 < summary["rel_err"] < 0.02  # 4-bit g32: ~0.4% of the head's output energy on the tiny model
    assert rep["passes"][0]["rows"][-1]["notes"] == "untied from the embeddings (they stay unquantized)"
    assert rep["verify"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    qc = cfg["quantization_config"]
    assert qc["ignore"] == [] and qc["config_groups"]["group_1"]["targets"] == ["lm_head"]
    assert qc["config_groups"]["group_1"]["weights"]["num_bits"] == 4
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert manifest["quantization"]["lm_head"]["shape"] == list(source["model.embed_tokens.weight"].shape)
    with safe_open(res.artifact / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "lm_head.weight_packed" in f.keys()
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), source["model.embed_tokens.weight"])
    ours: Any = export.load(res.artifact)
    assert type(ours.lm_head).__name__ == "QuantLinear" and ours.lm_head.bits == 4
    stock = AutoModelForCausalLM.from_pretrained(res.artifact, dtype=torch.float32).eval()
    assert (_logits(stock, IDS) - _logits(ours, IDS)).abs().max() < 1e-3
    # the head really is quantized: the unquantized-head run's logits differ from these
    plain = _run(tiny_h, [{"pass": "gptq", "bits": 4, "group_size": 32}], tmp_path / "b")
    assert (_logits(export.load(plain.artifact), IDS) - _logits(ours, IDS)).abs().max() > 1e-3
    assert "lm_head" not in json.loads((plain.artifact / "manifest.json").read_text())["quantization"]


def test_gptq_on_the_head_reads_the_final_norm_outputs(tiny_h, tmp_path):
    """The engine's last step hands the last block's outputs over: their final norm is what the lm_head reads, so
    the head through them gives the model's own logits."""
    from calibration.capture import for_each_block
    from compress.models import llama, load_model, resolve_model

    model = load_model(resolve_model(str(tiny_h)))[0].eval()
    got: list[torch.Tensor] = []
    lm = llama.as_causal_lm(model)
    for_each_block(model, llama.blocks(model), IDS, lambda *_: None, batch_size=1,
                   finish=lambda hidden: got.extend(lm.lm_head(lm.model.norm(h)) for h in hidden))
    assert len(got) == 2
    assert (torch.cat(got) - _logits(model, IDS)).abs().max() < 1e-5


def test_gptq_head_beats_rounding_on_its_output_error(tiny_h, tmp_path):
    """GPTQ on the head's X^T X leaves less error in the logits than round-to-nearest of the same scheme, on held-out
    text of the calibration's kind (pydoc; the decoder at 8 bits, so the head's 3-bit error dominates)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from calibration.sources import load_corpus, sample_windows

    tokens = load_corpus("pydoc").tokens(PreTrainedTokenizerFast.from_pretrained(tiny_h), "heldout", max_tokens=20_000)
    text = sample_windows(tokens, 4, 64, 1, "held-out windows")
    dense = _logits(AutoModelForCausalLM.from_pretrained(tiny_h).eval(), text)
    err = {}
    for method in ("gptq", "rtn"):
        res = _run(tiny_h, [{"pass": method, "bits": 8, "group_size": 32, "lm_head": {"bits": 3, "group_size": 32}}],
                   tmp_path / method)
        assert res.report["passes"][0]["summary"]["lm_head"]["method"] == method
        err[method] = float((_logits(export.load(res.artifact), text) - dense).pow(2).mean())
    assert err["gptq"] < 0.9 * err["rtn"], err  # measured 0.83x (a random tiny model's states are near isotropic)


def test_rtn_head_8_bit_and_bfloat16_remainder(tiny_h, tmp_path):
    """RTN needs no calibration for the head; export.dtype bfloat16 stores what stays unquantized (embeddings, norms)
    in bfloat16, and stock transformers reads it with our loader's logits."""
    from transformers import AutoModelForCausalLM

    res = _run(tiny_h, [{"pass": "rtn", "bits": 4, "group_size": 32, "lm_head": {"bits": 8, "group_size": 64}}],
               tmp_path / "a", extra=["export.dtype=bfloat16"])
    assert res.report["passes"][0]["summary"]["lm_head"]["rel_err"] < 1e-4  # 8 bits: ~256 steps per group range
    with safe_open(res.artifact / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight_scale").dtype == torch.bfloat16
    ours: Any = export.load(res.artifact)
    stock = AutoModelForCausalLM.from_pretrained(res.artifact).eval()
    assert ours.lm_head.bits == 8 and ours.model.embed_tokens.weight.dtype == torch.bfloat16
    assert (_logits(stock, IDS).float() - _logits(ours, IDS).float()).abs().max() < 1e-3


def test_gptq_format_marks_the_head_and_gptqmodel_reads_it(tiny_h, tmp_path):
    """GPTQ format: `lm_head: true` in quantization_config; GPTQModel (its torch kernel) dequantizes the head to our
    weights bit for bit. (optimum, stock transformers' GPTQ path, replaces only the blocks' linears: docs/format.md.)"""
    from gptqmodel import BACKEND, GPTQModel

    res = _run(tiny_h, [{"pass": "gptq", "bits": 4, "group_size": 32, "lm_head": HEAD}], tmp_path / "a",
               extra=["export.quant_format=gptq"])
    qc = json.loads((res.artifact / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] is True and res.report["verify"]["max_abs_logit_diff"] < 1e-4
    theirs = GPTQModel.load(str(res.artifact), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
    ours16: Any = export.load(res.artifact, dtype="float16")
    assert torch.equal(theirs.lm_head.dequantize_weight().T.float(), ours16.lm_head.dequantized().float())
    # both compute in fp16; the logits (scale ~4) agree to a few fp16 steps (one step at 4 is 0.004)
    assert (_logits(theirs, IDS).float() - _logits(ours16, IDS).float()).abs().max() < 0.03


@pytest.mark.parametrize("recipe, expected", [
    ({"passes": [{"pass": "gptq", "lm_head": {"bits": 5}}]}, "passes.0.lm_head.bits: Input should be 2, 3, 4 or 8"),
    ({"passes": [{"pass": "gptq", "group_size": 32, "lm_head": {"bits": 8}},
                 {"pass": "medusa", "num_heads": 2, "held_out": 2}]},
     "passes.0.lm_head: passes.1 (medusa) trains heads that share a plain lm_head"),
    ({"passes": [{"pass": "gptq", "bits": 4, "group_size": 32, "lm_head": {"bits": 8, "group_size": 32}}],
      "export": {"quant_format": "gptq"}},
     "passes.0.lm_head: the GPTQ format quantizes the lm_head with the model's one scheme (4 bits, group_size 32"),
    ({"passes": [{"pass": "gptq", "group_size": 32, "lm_head": {"bits": 8}}], "execution": "stream"},
     "passes.0.lm_head: a streamed run does not quantize the lm_head yet"),
])
def test_refused_by_field_before_any_work(tiny_h, tmp_path, recipe, expected):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "h", "model": str(tiny_h), **recipe}))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "-r", str(path), "--out", str(out), *sum((["--set", o] for o in SMALL), [])])
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert not out.exists()


@pytest.mark.parametrize("passes, expected", [
    ([{"pass": "gptq", "group_size": 32, "lm_head": {"bits": 4, "group_size": 48}}],
     "passes.0.lm_head.group_size: 48 does not divide the lm_head's 128 input columns"),
    ([{"pass": "gptq", "group_size": 32, "lm_head": {"bits": 4},
       "bits": {"average": 3, "allocator": "knapsack", "error_windows": 2}}],
     "passes.0.lm_head: the knapsack allocator does not quantize the lm_head yet"),
])
def test_refused_before_the_first_pass(tiny_h, tmp_path, passes, expected):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "h", "model": str(tiny_h), "passes": passes}))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "-r", str(path), "--out", str(out), *sum((["--set", o] for o in SMALL), [])])
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert "passes[0] gptq" not in res.output and not out.exists()


def test_no_lm_head_key_by_default():
    """Recipes without the option dump as before (artifacts' recipe.yaml bytes unchanged)."""
    from compress.recipe import Recipe

    plain = Recipe.model_validate({"name": "h", "passes": [{"pass": "gptq"}]}).to_dict()["passes"][0]
    assert "lm_head" not in plain
    head = Recipe.model_validate({"name": "h", "passes": [{"pass": "rtn", "lm_head": {"bits": 8}}]})
    assert head.to_dict()["passes"][0]["lm_head"] == {"bits": 8, "group_size": 64, "sym": True}
