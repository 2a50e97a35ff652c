"""Verification rounds as decoding does (export.speculative.exact_verification): on a 4-bit artifact through torch's
CPU int4 kernel, the logits of one forward over k new tokens behind a KV cache equal, bit for bit, those of k
one-token forwards through the model as plain decoding runs it, and so does the cache; greedy draft-and-verify and
n-gram drafting give plain greedy's tokens there. Without it transformers' SDPA took another path for several
queries than for one (GQA packed for a lone query) and the lm_head another matmul for several rows; the int4
kernel's bfloat16 inputs amplified those last-bit differences (0.18 in the default 4-bit model's logits)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

import export
from compress import api
from export.generate import generate
from export.medusa import MedusaHeads
from export.speculative import exact_verification, library_generate, speculative_generate
from tests.tiny import make_tiny_model

# SmolLM2's attention layout (head_dim 64, 3 query heads per key/value head), narrow and shallow
SHAPE = dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64, intermediate_size=256,
             num_hidden_layers=2)
SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.enabled=false"]
PROMPTS = ["def main(", "The license", "import os", "class Foo:"]


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    """The tiny model's 4-bit artifact (GPTQ, groups of 64), loaded with the int4 kernel, and its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("exact")
    source = make_tiny_model(out / "tiny", "llama", **SHAPE)
    recipe = {"name": "w4", "model": str(source), "passes": [{"pass": "gptq", "bits": 4, "group_size": 64,
                                                              "sym": True}]}
    artifact = api.run(recipe, out=out / "w4", overrides=SMALL, log=lambda *_: None).artifact
    model = export.load(artifact, kernel="cpu")
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} == {"cpu-int4"}
    return model, AutoTokenizer.from_pretrained(artifact)


@torch.no_grad()
def test_a_k_token_forward_equals_k_one_token_forwards_bit_for_bit(int4):
    from transformers import DynamicCache

    model, _ = int4
    gen = torch.Generator().manual_seed(0)
    for prompt_len, k in [(20, 5), (37, 3), (9, 2)]:
        prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=gen)
        step = torch.randint(1, model.config.vocab_size, (1, k), generator=gen)
        batched, single = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(input_ids=prompt, cache=single, use_cache=True)
        with exact_verification(model):
            model(input_ids=prompt, cache=batched, use_cache=True)
            logits = model(input_ids=step, cache=batched, use_cache=True, logits_to_keep=0).logits[0]  # (k, V)
        ones = torch.cat([model(input_ids=step[:, i:i + 1], cache=single, use_cache=True).logits[0]
                          for i in range(k)])  # (k, V): plain decoding's forwards
        assert torch.equal(logits, ones), (prompt_len, k, float((logits - ones).abs().max()))
        for a, b in zip(batched.layers, single.layers, strict=True):  # DynamicLayers: (1, kv heads, L, D) each
            a, b = cast(Any, a), cast(Any, b)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    assert "forward" not in vars(model.get_output_embeddings())


def test_speculative_and_ngram_greedy_equal_plain_greedy_on_the_int4_path(int4):
    model, tok = int4
    torch.manual_seed(0)
    heads = MedusaHeads(model.config.hidden_size, 4)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    accepted = 0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        want = generate(model, tok, ids, 48, 0, min_new_tokens=48).token_ids
        got, counts = speculative_generate(model, heads, ids, 48)
        assert got == want[:len(got)] and (len(got) == 48 or got[-1] == model.config.eos_token_id), prompt
        ngram, ngram_counts = library_generate(model, tok, ids, 48, 0, "ngram", min_new_tokens=48)
        assert ngram.token_ids == want, prompt
        accepted += counts.accepted + ngram_counts.accepted
    assert accepted > 0  # drafts were kept: the verifying forwards read several tokens
