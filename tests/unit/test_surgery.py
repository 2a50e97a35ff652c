"""Physical removal equals zeroing the removed structure, for every supported architecture (GQA included)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.models import llama


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_pruning_equals_masking(tmp_path, arch):
    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path, arch)
    pruned = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    masked = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    block_p, block_m = llama.blocks(pruned)[1], llama.blocks(masked)[1]
    shape = llama.block_shape(block_p)
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.group_size) == (6, 3, 2)
    keep_groups = torch.tensor([0, 2])
    keep_ch = torch.arange(0, 128, 3)
    bias_o = torch.randn(96, generator=torch.Generator().manual_seed(1))
    llama.prune_attention_groups(block_p, keep_groups, o_bias=bias_o)
    llama.prune_mlp_channels(block_p, keep_ch)
    with torch.no_grad():  # zero the removed query heads' o_proj columns and the removed MLP channels
        o = block_m.self_attn.o_proj
        o.weight[:, 2 * 16 : 4 * 16] = 0  # group 1 = query heads 2, 3
        if o.bias is None:
            o.bias = torch.nn.Parameter(torch.zeros(96), requires_grad=False)
        o.bias += bias_o
        mask = torch.ones(128, dtype=torch.bool)
        mask[keep_ch] = False
        block_m.mlp.down_proj.weight[:, mask] = 0
    after = llama.block_shape(block_p)
    assert (after.num_attention_heads, after.num_key_value_heads, after.intermediate_size) == (4, 2, keep_ch.numel())
    assert block_p.self_attn.q_proj.weight.shape == (4 * 16, 96)
    assert block_p.self_attn.k_proj.weight.shape == (2 * 16, 96)
    assert block_p.self_attn.o_proj.weight.shape == (96, 4 * 16)
    assert block_p.mlp.down_proj.weight.shape == (96, keep_ch.numel())
    if arch == "qwen2":  # q/k/v biases are sliced with their rows
        assert block_p.self_attn.k_proj.bias.shape == (32,)
    with torch.no_grad():
        a = pruned(input_ids=ids).logits
        b = masked(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_named():
    from compress.errors import InputError

    with pytest.raises(InputError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"):
        llama.check_supported({"architectures": ["GPT2LMHeadModel"]}, "x/config.json")
