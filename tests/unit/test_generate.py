"""`compress generate` / api.generate on every artifact kind, the KV-cached generation against full forwards, the fast
path's greedy tokens against the reference's, and bad input refused with exit 2 and a named message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import export
from compress import api
from compress.cli import cli
from compress.evaluate import pad_token_id
from export.generate import generate

GOLDEN = Path(__file__).parents[1] / "golden"
SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.enabled=false"]
PROMPTS = ["def main(", "The license", "import os", "class Foo:", "Return the", "for i in range(", "# This module",
           "If the file"]  # 8 prompts
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """One artifact of each kind: pruned (adaptive widths, our config), quantized (GPTQ 4-bit, groups of 32, the
    int4 kernel's layout), pruned + quantized (golden 'mixed': 2/3/4/8 bits, g_idx) and the GPTQ format (golden)."""
    out = tmp_path_factory.mktemp("gen")
    recipes = {"pruned": [{"pass": "flap", "target": 0.3, "structure": "adaptive"}],
               "quantized": [{"pass": "gptq", "bits": 4, "group_size": 32, "sym": True}]}
    arts = {kind: api.run({"name": kind, "model": str(tiny_llama), "passes": passes}, out=out / kind,
                          overrides=SMALL, log=lambda *_: None).artifact for kind, passes in recipes.items()}
    return {**arts, "pruned+quantized": GOLDEN / "mixed", "gptq format": GOLDEN / "gptq"}


@pytest.mark.parametrize("kind", ["pruned", "quantized", "pruned+quantized", "gptq format"])
def test_generate_every_kind_prints_text_and_speed(artifacts, kind):
    res = CliRunner().invoke(cli, ["generate", str(artifacts[kind]), "--prompt", "def main(", "-n", "12", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["new_tokens"] == len(out["token_ids"]) == 12
    assert out["text"] and out["seconds"] > 0
    assert out["tokens_per_second"] == pytest.approx(12 / out["seconds"], rel=0.01)
    if kind == "quantized":  # every linear of the 4-bit artifact takes the int4 kernel
        assert out["kernels"] == {"cpu-int4": 21}  # 3 layers x 7 projections
    res = CliRunner().invoke(cli, ["generate", str(artifacts[kind]), "--prompt", "def main(", "-n", "5"])
    assert res.exit_code == 0 and "5 new tokens in" in res.output and "tokens/s" in res.output


@pytest.mark.parametrize("kind", ["pruned", "pruned+quantized", "gptq format"])
def test_cached_generation_is_greedy_under_full_forwards(artifacts, kind):
    """The KV cache (per-layer widths, GQA) gives the tokens a full forward pass picks: each new token's logit is
    the row's maximum to 1e-4 when the whole sequence is recomputed without a cache (reference kernel, fp32)."""
    model = export.load(artifacts[kind], dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 150]])
    gen = generate(model, _Ids(), ids, 24, pad_token_id(model), min_new_tokens=24)
    full = torch.cat([ids, torch.tensor([gen.token_ids])], 1)  # (1, 5 + 24)
    with torch.no_grad():
        logits = model(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1:-1]  # (24, vocab)
    picked = logits.gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    assert float((logits.max(1).values - picked).max()) < 1e-4


def test_fast_path_greedy_tokens_diverge_only_at_near_ties(artifacts):
    """Issue 17 asks for identical greedy tokens through the int4 kernel and the reference (128 new tokens, 8
    prompts). The kernel computes in bfloat16 (export.kernels.cpu), so a float32 reference and it agree to a logit
    deviation, not bit for bit, and greedy decoding flips wherever the reference's two best logits are closer than
    that (the default 4-bit artifact: 7 of 8 prompts, at gaps of 0.009-0.03 against deviations of 0.15-0.27; see
    docs/results/decode_speed.md). What must hold: the tokens agree up to the first position where the reference's
    top-2 gap is below the fast path's logit deviation there, and that deviation stays within 5% of the logits'
    spread (bfloat16's 2^-9 per rounding, compounded over the tiny model's 3 blocks, gives about 1%; a wrong zero
    point or layout gives 100%)."""
    fast = export.load(artifacts["quantized"], kernel="cpu")
    ref = export.load(artifacts["quantized"], kernel="reference")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts["quantized"])
    pad = pad_token_id(ref)
    identical = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        a = generate(fast, tok, ids, NEW_TOKENS, pad, min_new_tokens=NEW_TOKENS).token_ids
        b = generate(ref, tok, ids, NEW_TOKENS, pad, min_new_tokens=NEW_TOKENS).token_ids
        assert len(a) == len(b) == NEW_TOKENS
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), NEW_TOKENS)
        identical += first == NEW_TOKENS
        seq = torch.tensor([ids[0].tolist() + b])  # teacher-forced on the reference's tokens
        with torch.no_grad():
            lr = ref(input_ids=seq).logits[0, ids.shape[1] - 1:-1]  # (NEW_TOKENS, vocab)
            lf = fast(input_ids=seq).logits[0, ids.shape[1] - 1:-1]
        deviation = (lf - lr).abs().max(1).values  # (NEW_TOKENS,)
        assert float(deviation.max()) < 0.05 * float(lr.std()), (prompt, float(deviation.max()), float(lr.std()))
        if first < NEW_TOKENS:
            top2 = lr[first].topk(2).values
            assert float(top2[0] - top2[1]) <= float(deviation[first]), (prompt, first)
    print(f"identical greedy continuations: {identical} of {len(PROMPTS)}")


def test_dense_oracle_greedy_tokens_equal_reference(artifacts):
    """kernel='dense' (the benchmark's fast oracle) keeps the reference's weights: identical tokens, 128 new."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts["quantized"])
    runs = [export.load(artifacts["quantized"], kernel=k) for k in ("dense", "reference")]
    for prompt in PROMPTS[:2]:
        ids = tok(prompt, return_tensors="pt").input_ids
        a, b = (generate(m, tok, ids, NEW_TOKENS, 0, min_new_tokens=NEW_TOKENS).token_ids for m in runs)
        assert a == b


class _Ids:
    """A stand-in tokenizer for calls that only decode."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def test_bad_input_exit_2_with_named_message(artifacts, tmp_path):
    art = str(artifacts["quantized"])
    cases = [
        (["generate", str(tmp_path / "nope"), "--prompt", "x"], "no such artifact folder"),
        (["generate", art, "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens: 0; at least 1 new token"),
        (["generate", art, "--prompt", "word " * 600], "exceed the model's context of 512 tokens"),
        (["generate", art, "--prompt", "x", "-n", "512"], "1 tokens + max_new_tokens 512 exceed the model's context"),
        (["generate", art, "--prompt", "x", "--chat"], "--chat: " + art + ": the tokenizer has no chat template"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args[2:], res.output)
        assert message in res.output, res.output


def test_sampling_is_seeded(artifacts):
    art = artifacts["quantized"]
    runs = [api.generate(art, "def main(", 10, do_sample=True, temperature=1.5, top_k=50, seed=s).token_ids
            for s in (1, 1, 2)]
    greedy = api.generate(art, "def main(", 10).token_ids
    assert runs[0] == runs[1] and runs[0] != runs[2] and greedy != runs[0]


def test_cli_prints_no_import_noise():
    """A whole `compress` process: stderr holds nothing (torchao's "Failed to load ... _C_mxfp8" and torch's pytree
    deprecation warnings, logged when transformers imports torchao, are kept out)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "compress"), "generate", str(GOLDEN / "gptq"), "-p", "x", "-n", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "2 new tokens in" in done.stdout
