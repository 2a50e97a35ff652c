"""The block-by-block engine: statistics are exact and propagated inputs equal the model's own hidden states."""

import torch
from transformers import AutoModelForCausalLM

from calibration.capture import for_each_block
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
