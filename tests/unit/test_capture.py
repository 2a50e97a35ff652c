"""The block-by-block engine: statistics are exact and propagated inputs equal the model's own hidden states."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from calibration.capture import capture_block_inputs, for_each_block
from compress.search.scoring import TailKL
from compress.models import llama


def test_engine_matches_full_forward(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, block outputs...
    seen_inputs, captured = [], {}

    def grab(_m, args):
        captured.setdefault("down0", []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    h = llama.blocks(model)[0].mlp.down_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    X = torch.cat(captured["down0"]).double()  # (tokens, intermediate)

    def visit(i, block, inputs, outputs, stats):
        seen_inputs.append(torch.cat(inputs))
        if i == 0:
            s = stats["down_proj"]
            assert s.n == 5 * 32
            torch.testing.assert_close(s.mean, X.mean(0))
            torch.testing.assert_close(s.var, X.var(0, unbiased=True))
            torch.testing.assert_close(s.sq_norm, (X * X).sum(0))

    for_each_block(model, llama.blocks(model), ids, visit,
                   watch=lambda i, b: {"down_proj": b.mlp.down_proj}, batch_size=2)
    assert len(seen_inputs) == 3
    for i, x in enumerate(seen_inputs):  # inputs of block i are the model's hidden state i
        torch.testing.assert_close(x, hs[i], atol=1e-5, rtol=1e-5)


MIXED = dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=1,
             layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])


@pytest.mark.parametrize("arch, over, attn", [("llama", {}, "sdpa"), ("qwen2", MIXED, "sdpa"), ("qwen3", MIXED, "sdpa"),
                                              ("qwen3", MIXED, "eager")])
def test_every_block_gets_its_own_layer_types_mask(tmp_path, arch, over, attn):
    """Block i's inputs and outputs equal the model's own hidden states i and i+1 bit for bit, batch by batch (the
    same batches, so every matmul has the same shapes and reduction order), on models whose layers mix full and
    sliding-window attention (window 8 < 32 tokens, so the two masks differ)."""
    from tests.tiny import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / arch, arch, **over), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    ids = torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))
    batch = 2
    with torch.no_grad():
        hs = [model(input_ids=ids[s : s + batch], output_hidden_states=True).hidden_states for s in range(0, 5, batch)]
    n_blocks = len(llama.blocks(model))
    seen = []

    def visit(i, block, inputs, outputs, stats):
        seen.append(i)
        for b, (x, y) in enumerate(zip(inputs, outputs)):
            assert torch.equal(x, hs[b][i]), f"block {i} batch {b}: inputs differ from the model's hidden state {i}"
            want = hs[b][i + 1]
            got = y if i + 1 < n_blocks else model.model.norm(y)  # the model's last hidden state is after the norm
            assert torch.equal(got, want), f"block {i} ({model.config.layer_types[i]}) batch {b}: outputs differ"

    calls = []  # a block's submodules run only in the engine's own block calls, never while capturing
    hooks = [b.mlp.register_forward_hook(lambda *_: calls.append(1)) for b in llama.blocks(model)]
    cap = capture_block_inputs(model, llama.blocks(model), ids, batch)
    assert calls == [] and len(cap.kwargs) == n_blocks and all(len(k) == 3 for k in cap.kwargs)
    for_each_block(model, llama.blocks(model), ids, visit, batch_size=batch)
    for h in hooks:
        h.remove()
    assert seen == list(range(n_blocks)) and len(calls) == 3 * n_blocks
    assert all("forward" not in b.__dict__ for b in llama.blocks(model))  # the blocks' own forwards are back
    kl = TailKL(model, ids, batch_size=batch)  # the KL's dense reference runs the same per-block kwargs
    for i in range(n_blocks):
        assert all(torch.equal(x, h[i]) for x, h in zip(kl.inputs[i], hs))
    assert kl.kl_from(1) == 0.0
    if over:  # the masks really differ: the sliding block 1 run with block 0's (full) mask gives other outputs
        with torch.no_grad():
            wrong = llama.blocks(model)[1](hs[0][1], **cap.kwargs[0][0])
        assert not torch.equal(wrong, hs[0][2])


def test_a_block_the_forward_never_calls_is_named(tiny_llama):
    """A forward that skips a block would leave it without keyword arguments: refused by block index, not replayed."""
    from compress.errors import CompressError

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model.config.num_hidden_layers = 2  # the model's forward runs layers[:2]; the engine is given all 3
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    own = llama.blocks(model)[1].forward = type(llama.blocks(model)[1]).forward.__get__(llama.blocks(model)[1])
    with pytest.raises(CompressError, match=r"blocks \[2\] of 3"):
        capture_block_inputs(model, llama.blocks(model), ids, 2)
    assert llama.blocks(model)[1].__dict__["forward"] is own  # an instance forward (accelerate's hooks) is restored
    assert "forward" not in llama.blocks(model)[0].__dict__ and "forward" not in llama.blocks(model)[2].__dict__
