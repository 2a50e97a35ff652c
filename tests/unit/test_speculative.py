"""Draft-and-verify decoding (export.speculative) on a tiny seeded Llama: greedy output equals plain greedy's token for
token whatever the heads draft (random heads over many seeds and prompts, heads always wrong, heads always right, an
end of text inside an accepted draft), the rolled-back cache gives a fresh forward's logits, the sampling rule keeps
the model's distribution (chi-square), and transformers' n-gram and draft-model paths with their counts."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from export.generate import generate
from export.medusa import MedusaHeads
from export.speculative import (
    SAMPLING_DEFAULTS,
    DraftCounts,
    library_generate,
    rejection_step,
    sampling_settings,
    speculative_generate,
    warp,
)

PROMPTS = ["def main(", "The license", "import os", "class Foo:", "Return the", "for i in range(", "# This module",
           "If the file"]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def random_heads(hidden: int, seed: int, num_heads: int = 4, scale: float = 0.05) -> MedusaHeads:
    """Heads with nonzero seeded weights: their drafts are right sometimes and wrong sometimes."""
    torch.manual_seed(seed)
    heads = MedusaHeads(hidden, num_heads)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, scale)
    return heads


class ScriptedHeads(MedusaHeads):
    """Heads that draft from a script: `script(hidden)` -> (K,) tokens, as one-hot logits (..., K, V)."""

    def __init__(self, hidden: int, vocab: int, script, num_heads: int = 4) -> None:
        super().__init__(hidden, num_heads)
        self.vocab, self.script = vocab, script

    def forward(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        tokens = self.script(hidden)  # (K,)
        return torch.nn.functional.one_hot(tokens, self.vocab).float() * 10  # (K, V)


def greedy(model, tok, prompt: str, n: int = NEW_TOKENS, **kw) -> tuple[torch.Tensor, list[int]]:
    ids = tok(prompt, return_tensors="pt").input_ids
    return ids, generate(model, tok, ids, n, 0, **kw).token_ids


def test_greedy_equals_plain_greedy_over_seeds_and_prompts(tiny):
    model, tok = tiny
    total = DraftCounts(0, 0, 0)
    for seed in range(4):
        heads = random_heads(model.config.hidden_size, seed)
        for prompt in PROMPTS:
            ids, want = greedy(model, tok, prompt)
            got, counts = speculative_generate(model, heads, ids, NEW_TOKENS)
            assert got == want, (seed, prompt)
            assert counts.steps + 1 + counts.accepted == len(got) == NEW_TOKENS  # no end of text in these
            total = DraftCounts(*(a + b for a, b in zip(vars(total).values(), vars(counts).values(), strict=True)))
    assert 0 < total.accepted < total.drafted  # drafts were both kept and refused: both branches ran
    assert total.drafted <= 4 * total.steps


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7])
def test_max_new_tokens_exact(tiny, n):
    model, tok = tiny
    ids, want = greedy(model, tok, PROMPTS[0], n)
    got, _ = speculative_generate(model, random_heads(model.config.hidden_size, 0), ids, n)
    assert got == want and len(got) == n


def test_rejection_at_the_first_drafted_token(tiny):
    """Heads that always draft a token greedy never picks: every step refuses its first draft, rolls the whole draft
    back, and keeps only the model's own token; output unchanged."""
    model, tok = tiny
    ids, want = greedy(model, tok, PROMPTS[1])
    never = next(t for t in range(model.config.vocab_size) if t not in want)
    heads = ScriptedHeads(model.config.hidden_size, model.config.vocab_size, lambda h: torch.full((4,), never))
    got, counts = speculative_generate(model, heads, ids, NEW_TOKENS)
    assert got == want
    assert (counts.accepted, counts.steps) == (0, NEW_TOKENS - 1)
    assert counts.drafted == 4 * (NEW_TOKENS - 5) + 3 + 2 + 1  # the last steps draft only what max_new_tokens allows


def oracle_heads(model, want: list[int], prompt_len: int, num_heads: int = 4) -> ScriptedHeads:
    """Heads that draft the true greedy continuation: they know `want` and find their place by the cache length,
    read off the call count (each step follows one accepted prefix)."""
    state = {"pos": 0}

    def script(hidden: torch.Tensor) -> torch.Tensor:
        # the state a step drafts from predicted want[pos]; the drafts are want[pos + 1: pos + 1 + K]
        pos = state["pos"]
        tokens = (want[pos + 1:pos + 1 + num_heads] + [0] * num_heads)[:num_heads]
        state["pos"] = pos + num_heads + 1  # all accepted: the next step starts K + 1 tokens later
        return torch.tensor(tokens)

    return ScriptedHeads(model.config.hidden_size, model.config.vocab_size, script, num_heads)


def test_all_drafts_accepted(tiny):
    model, tok = tiny
    ids, want = greedy(model, tok, PROMPTS[2], 31)  # 1 + 6 steps x 5 tokens
    got, counts = speculative_generate(model, oracle_heads(model, want, ids.shape[1]), ids, 31)
    assert got == want
    assert counts == DraftCounts(steps=6, drafted=24, accepted=24)
    assert counts.mean_accepted == 4.0


def test_end_of_text_inside_an_accepted_draft(tiny, tiny_llama):
    """When the end-of-text token is the third token of an accepted draft, the output ends with it, as plain greedy's
    does with that token as end of text (the model is made to treat a token it emits as its end of text)."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    ids, want = greedy(model, tok, PROMPTS[3])
    # the first token inside step 1's draft (positions 1..4 of the output) that does not occur before it
    stop = next(i for i in range(1, 5) if want[i] not in want[:i])
    eos_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    eos_model.config.eos_token_id = eos_model.generation_config.eos_token_id = want[stop]
    _, plain = greedy(eos_model, tok, PROMPTS[3])
    assert plain == want[:stop + 1]  # plain greedy stops there too
    got, counts = speculative_generate(eos_model, oracle_heads(eos_model, want, ids.shape[1]), ids, NEW_TOKENS)
    assert got == plain
    assert counts.steps == 1 and counts.accepted == 4  # the draft was accepted whole, then cut at the end of text


def test_the_end_of_text_ids_are_generates_own(tiny, tiny_llama):
    """A model whose generation_config lists a second end-of-text id beside its config's (as Llama 3's does): plain
    greedy stops at it, and so does draft-and-verify."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    ids, want = greedy(model, tok, PROMPTS[3])
    stop = next(i for i in range(1, 5) if want[i] not in want[:i])
    eos_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    eos_model.generation_config.eos_token_id = [eos_model.config.eos_token_id, want[stop]]
    _, plain = greedy(eos_model, tok, PROMPTS[3])
    assert plain == want[:stop + 1] and eos_model.config.eos_token_id != want[stop]
    got, _ = speculative_generate(eos_model, oracle_heads(eos_model, want, ids.shape[1]), ids, NEW_TOKENS)
    assert got == plain


def test_cache_rollback_gives_a_fresh_forwards_logits(tiny):
    """Crop the cache back past three refused tokens, feed a different token: its logits equal those of a full
    forward over the kept sequence without a cache."""
    from transformers import DynamicCache

    model, tok = tiny
    seq = tok(PROMPTS[4], return_tensors="pt").input_ids  # (1, T)
    drafts = torch.tensor([[11, 12, 13, 14, 15]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=seq, cache=cache, use_cache=True)
        model(input_ids=drafts, cache=cache, use_cache=True)
        cache.crop(-3)  # keep drafts 11, 12
        assert cache.get_seq_length() == seq.shape[1] + 2
        after = model(input_ids=torch.tensor([[99]]), cache=cache, use_cache=True).logits[0, -1]
        fresh = model(input_ids=torch.cat([seq, torch.tensor([[11, 12, 99]])], 1), use_cache=False).logits[0, -1]
    assert float((after - fresh).abs().max()) < 1e-4
    assert float((after - fresh).abs().max()) < 1e-2 * float(fresh.std())


def test_warp_matches_transformers_processors():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 10, 0.6)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p is not None:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.allclose(warp(logits, temperature, top_k, top_p), ref.softmax(-1), atol=1e-6)


def test_rejection_rule_keeps_the_models_distribution():
    """A drafter q far from the model's p: the first token the rule emits is distributed as p (chi-square p-value
    above 1e-3 over 20000 draws), where q's own draws are rejected by the same test (power check)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])  # (k + 1, V), k = 1
    q = torch.tensor([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3]])  # (k, V)
    draws = 20_000
    first = torch.zeros(6)
    kept = 0
    for _ in range(draws):
        draft = torch.multinomial(q[0], 1, generator=gen)
        n, token = rejection_step(p, q, draft, gen)
        first[int(draft) if n == 1 else token] += 1
        kept += n
    support = p[0] > 0
    assert float(first[~support].sum()) == 0  # a token the model never picks is never emitted
    assert chisquare(first[support].numpy(), p[0][support].numpy() * draws).pvalue > 1e-3
    assert abs(kept / draws - float(torch.minimum(p[0], q[0]).sum())) < 0.015  # acceptance rate: sum min(p, q)
    q_draws = torch.bincount(torch.multinomial(q[0], draws, replacement=True, generator=gen), minlength=6).float()
    assert chisquare(q_draws[support].numpy(), p[0][support].numpy() * q_draws[support].sum().item()).pvalue < 1e-6


def test_sampling_end_to_end_second_token_distribution(tiny):
    """Speculative sampling (random heads, top_k=4) on the tiny model: the second new token, the first one drafted
    and verified (max_new_tokens 3: one draft a run), is distributed as the model's own marginal
    sum_t1 p(t1) p(t2 | t1) (chi-square, 800 draws)."""
    model, tok = tiny
    ids = tok(PROMPTS[5], return_tensors="pt").input_ids
    top_k, draws = 4, 800
    with torch.no_grad():
        p1 = warp(model(input_ids=ids).logits[0, -1], top_k=top_k)  # (V,)
        marginal = torch.zeros_like(p1)
        for t1 in p1.nonzero()[:, 0].tolist():
            seq = torch.cat([ids, torch.tensor([[t1]])], 1)
            marginal += p1[t1] * warp(model(input_ids=seq).logits[0, -1], top_k=top_k)
    heads = random_heads(model.config.hidden_size, 3, scale=0.02)  # close enough to be accepted a quarter of the time
    gen = torch.Generator().manual_seed(1)
    seen = torch.zeros_like(p1)
    drafted = accepted = 0
    for _ in range(draws):
        out, counts = speculative_generate(model, heads, ids, 3, do_sample=True, top_k=top_k, generator=gen)
        seen[out[1]] += 1
        drafted, accepted = drafted + counts.drafted, accepted + counts.accepted
    assert drafted == draws and 0 < accepted < drafted  # both outcomes of the rule were exercised
    support = marginal > 0
    assert float(seen[~support].sum()) == 0
    assert chisquare(seen[support].numpy(), (marginal[support] / marginal[support].sum() * draws).numpy()).pvalue > 1e-3


def test_sampling_without_top_k_keeps_plain_samplings_top_50(tiny):
    """model.generate samples from the top 50 tokens unless told otherwise (transformers' default), so speculative
    sampling must too: with no top_k given, every token it emits (the first, and the drafted-and-verified second) is
    among the model's top 50 there (the tiny model's distribution is close to uniform over 384 tokens: without the
    default, 40 draws land outside the top 50 almost surely)."""
    from transformers import GenerationConfig

    assert SAMPLING_DEFAULTS == {k: GenerationConfig._get_default_generation_params()[k] for k in SAMPLING_DEFAULTS}
    model, tok = tiny
    assert sampling_settings(model) == (1.0, 50, None)
    assert sampling_settings(model, 0.7, 0, 0.9) == (0.7, None, 0.9)  # top_k 0: none, as in transformers
    ids = tok(PROMPTS[6], return_tensors="pt").input_ids
    heads = random_heads(model.config.hidden_size, 5, scale=0.02)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        first_top = set(model(input_ids=ids).logits[0, -1].topk(50).indices.tolist())
        for _ in range(40):
            out, _ = speculative_generate(model, heads, ids, 2, do_sample=True, generator=gen)
            second = model(input_ids=torch.cat([ids, torch.tensor([out[:1]])], 1)).logits[0, -1]
            assert out[0] in first_top and out[1] in set(second.topk(50).indices.tolist()), out


def test_ngram_and_draft_model_equal_plain_greedy(tiny, tiny_llama):
    """transformers' prompt lookup and assisted generation (the same model's copy drafting): plain greedy's tokens,
    and counts that add up (new tokens = 1 + steps + accepted, accepted <= drafted)."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    assistant = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = "import os import os import os import"  # repeats itself: prompt lookup finds drafts
    for draft in ("ngram", assistant):
        ids, want = greedy(model, tok, prompt, 32, min_new_tokens=32)
        gen, counts = library_generate(model, tok, ids, 32, 0, draft, min_new_tokens=32)
        assert gen.token_ids == want
        assert 0 < counts.accepted <= counts.drafted
        assert counts.steps + 1 + counts.accepted >= len(want)  # equal unless the last step was cut short
