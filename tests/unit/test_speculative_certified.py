"""Greedy verification reads a float32 lm_head once (export.speculative.certified_argmax): a row's argmax is taken
from the several-row product only when a rounding bound proves that the one-row product plain decoding runs has the
same argmax; the rest are recomputed alone. These tests check the bound against float64 products, that near-ties
are recomputed, and, on a dense tiny model, that a k-token verifying forward reads the lm_head once and picks what
k one-token forwards pick."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.speculative import certified_argmax, exact_verification
from tests.tiny import make_tiny_model, verification_case


def test_a_certified_row_has_the_exact_products_argmax():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 64, generator=gen)  # (V, H)
    states = torch.randn(400, 64, generator=gen) * 8  # (n, H)
    logits = states @ weight.T  # (n, V) float32
    exact = (states.double() @ weight.double().T).argmax(-1)
    sure = certified_argmax(logits, states, weight)
    assert sure.float().mean() > 0.9  # random logits seldom tie within the bound
    assert torch.equal(logits.argmax(-1)[sure], exact[sure])
    alone = torch.cat([states[i:i + 1] @ weight.T for i in range(len(states))])  # one-row products
    assert torch.equal(alone.argmax(-1)[sure], logits.argmax(-1)[sure])


def test_a_near_tie_is_not_certified_and_a_clear_lead_is():
    weight = torch.zeros(4, 3)
    weight[0] = torch.tensor([1.0, 0.0, 0.0])
    weight[1] = torch.tensor([1.0, 1e-6, 0.0])  # ties row 0 up to 1e-6 * h[1]
    weight[2] = torch.tensor([0.0, 1.0, 0.0])
    states = torch.tensor([[100.0, 1.0, 0.0],  # logits 100, 100.000001, 1: a near-tie -> not certified
                           [0.0, 100.0, 0.0],  # logits 0, 1e-4, 100: a clear lead -> certified
                           [float("nan"), 0.0, 0.0]])  # not finite -> not certified
    logits = states @ weight.T
    assert certified_argmax(logits, states, weight).tolist() == [False, True, False]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    source = make_tiny_model(tmp_path_factory.mktemp("certified") / "tiny", "llama", hidden_size=64,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2)
    return AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()


@torch.no_grad()
def test_greedy_verification_picks_what_decoding_picks(dense):
    model = dense
    assert type(model.get_output_embeddings()) is nn.Linear and model.get_output_embeddings().bias is None
    gen = torch.Generator().manual_seed(0)
    for prompt_len, k in [(20, 5), (9, 3), (33, 4)]:
        prompt, step, batched, single = verification_case(model, gen, prompt_len, k)
        model(input_ids=prompt, cache=single, use_cache=True)
        with exact_verification(model, greedy=True) as draft_lm_head:
            model(input_ids=prompt, cache=batched, use_cache=True)
            logits = model(input_ids=step, cache=batched, use_cache=True, logits_to_keep=0).logits[0]  # (k, V)
            assert draft_lm_head(torch.ones(2, model.config.hidden_size)).shape == (2, model.config.vocab_size)
        ones = torch.cat([model(input_ids=step[:, i:i + 1], cache=single, use_cache=True).logits[0]
                          for i in range(k)])  # (k, V): plain decoding's forwards
        assert torch.equal(logits.argmax(-1), ones.argmax(-1)), (prompt_len, k)
    assert "forward" not in vars(model.get_output_embeddings())


@torch.no_grad()
def test_greedy_verification_recomputes_only_uncertified_rows(dense, monkeypatch):
    """The several-row product is computed once; rows the bound cannot vouch for (forced here) are recomputed alone,
    and then equal the one-row product bit for bit."""
    import export.speculative as spec

    model = dense
    lm_head = model.get_output_embeddings()
    widths: list[int] = []
    real_forward = type(lm_head).forward

    def counting(self, x):
        widths.append(x.shape[-2])
        return real_forward(self, x)

    monkeypatch.setattr(type(lm_head), "forward", counting)
    states = torch.randn(1, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(spec, "certified_argmax",
                        lambda logits, *_a, **_k: torch.tensor([[True, False, True, False]]))
    with exact_verification(model, greedy=True):
        out = lm_head(states)  # (1, 4, V)
    assert widths == [4, 1, 1]  # once for all rows, then rows 1 and 3 alone
    for i in (1, 3):
        assert torch.equal(out[:, i], real_forward(lm_head, states[:, i:i + 1])[:, 0])
    widths.clear()
    with exact_verification(model):  # not greedy: every row alone, as before
        lm_head(states)
    assert widths == [1, 1, 1, 1]
