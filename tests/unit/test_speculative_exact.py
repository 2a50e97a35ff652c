"""Verification rounds as decoding does (export.speculative.exact_verification): on a 4-bit artifact through torch's
CPU int4 kernel, the logits of one forward over k new tokens behind a KV cache equal, bit for bit, those of k
one-token forwards through the model as plain decoding runs it, and so does the cache; greedy draft-and-verify and
n-gram drafting give plain greedy's tokens there. Without it transformers' SDPA took another path for several
queries than for one (GQA packed for a lone query) and the lm_head another matmul for several rows; the int4
kernel's bfloat16 inputs amplified those last-bit differences (0.18 in the default 4-bit model's logits)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch

import export
from compress import api
from export.generate import generate
from export.medusa import MedusaHeads
from export.speculative import exact_verification, library_generate, speculative_generate
from tests.tiny import make_tiny_model, verification_case

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


@contextmanager
def attention_outputs(model) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within: every o_proj's input (its layer's attention output, (1, q, heads * D)) of each forward, by layer.
    Compared directly, since the int4 kernel's bfloat16 rounding hides most last-bit differences there from the
    logits of a 2-layer model (not from those of a 30-layer one)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        return lambda _module, args: seen.setdefault(name, []).append(args[0].clone())

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules() if n.endswith("o_proj")]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def same_rows(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]], first: int) -> bool:
    """Whether each layer's attention outputs from row `first` on (calls joined along the sequence) are equal."""
    return a.keys() == b.keys() and all(torch.equal(torch.cat(a[n], 1)[:, first:], torch.cat(b[n], 1)[:, first:])
                                        for n in a)


@torch.no_grad()
def test_a_k_token_forward_equals_k_one_token_forwards_bit_for_bit(int4):
    model, _ = int4
    gen = torch.Generator().manual_seed(0)
    for prompt_len, k in [(20, 5), (37, 3), (9, 2)]:
        prompt, step, batched, single = verification_case(model, gen, prompt_len, k)
        model(input_ids=prompt, cache=single, use_cache=True)
        with exact_verification(model):
            model(input_ids=prompt, cache=batched, use_cache=True)
            with attention_outputs(model) as verifying:
                logits = model(input_ids=step, cache=batched, use_cache=True, logits_to_keep=0).logits[0]  # (k, V)
        with attention_outputs(model) as decoding:
            ones = torch.cat([model(input_ids=step[:, i:i + 1], cache=single, use_cache=True).logits[0]
                              for i in range(k)])  # (k, V): plain decoding's forwards
        assert same_rows(verifying, decoding, 0), (prompt_len, k)
        assert torch.equal(logits, ones), (prompt_len, k, float((logits - ones).abs().max()))
        for a, b in zip(batched.layers, single.layers, strict=True):  # DynamicLayers: (1, kv heads, L, D) each
            a, b = cast(Any, a), cast(Any, b)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    assert "forward" not in vars(model.get_output_embeddings())


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [20, 200])
def test_a_first_forward_over_prompt_and_drafts_equals_prefill_then_one_token_forwards(int4, prompt_len):
    """transformers' assisted generation (n-gram, draft model) reads the prompt and the first drafts in one forward:
    with the prompt's length given, its last prompt row and draft rows, and the cache, equal plain decoding's
    prefill (the last row's logits only, as generate asks) and one-token forwards bit for bit (200 prompt tokens:
    SDPA's causal kernel splits 200 and 204 queries into different blocks)."""
    from transformers import DynamicCache

    model, _ = int4
    ids = torch.randint(1, model.config.vocab_size, (1, prompt_len + 4), generator=torch.Generator().manual_seed(1))
    joint, single = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with exact_verification(model, prompt_len), attention_outputs(model) as first_forward:
        logits = model(input_ids=ids, cache=joint, use_cache=True, logits_to_keep=0).logits[0, prompt_len - 1:]
    with attention_outputs(model) as decoding:
        plain = [model(input_ids=ids[:, :prompt_len], cache=single, use_cache=True, logits_to_keep=1).logits[0]]
        plain += [model(input_ids=ids[:, i:i + 1], cache=single, use_cache=True).logits[0]
                  for i in range(prompt_len, prompt_len + 4)]
    assert same_rows(first_forward, decoding, 0)
    assert torch.equal(logits, torch.cat(plain)), float((logits - torch.cat(plain)).abs().max())
    for a, b in zip(joint.layers, single.layers, strict=True):
        a, b = cast(Any, a), cast(Any, b)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


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
