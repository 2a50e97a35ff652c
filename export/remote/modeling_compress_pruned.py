"""Modeling code shipped inside a compress artifact (export: {remote_code: true}) so that stock transformers loads a
model whose decoder blocks have different widths:

    AutoModelForCausalLM.from_pretrained(artifact, trust_remote_code=True)

Self-contained: it needs transformers and torch only, not the compress package. The config is the base model's
config (Llama, Mistral, Qwen2 or Qwen3) plus `base_model_type` and one `layers` entry per block with its head
counts, head_dim, MLP width and which projections carry a bias. The model is the stock causal LM of the base type
with each block's projections resized to those widths; its forward is the stock forward.
"""

from __future__ import annotations

from typing import Protocol, cast

from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PER_LAYER_KEYS = ("base_model_type", "layers", "block_configs", "auto_map")  # ours, not the base config's


class _Attention(Protocol):
    """The width attributes a stock attention module's forward reads."""

    head_dim: int
    num_key_value_groups: int
    scaling: float


def resize_blocks(blocks: nn.ModuleList, layers: list[dict], hidden: int, device=None) -> None:
    """Give each block the projections its `layers` entry describes (head counts, head_dim, MLP width, biases).
    Also used by compress's own loader (export.loader), on the meta device."""
    for spec, block in zip(layers, blocks, strict=True):
        hd, heads, kv, inter = (spec["head_dim"], spec["num_attention_heads"], spec["num_key_value_heads"],
                                spec["intermediate_size"])
        dims = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
                "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                "down_proj": (inter, hidden)}
        for name, (n_in, n_out) in dims.items():
            parent = block.self_attn if name in ATTN else block.mlp
            setattr(parent, name, nn.Linear(n_in, n_out, bias=name in spec["bias"], device=device))
        attn = cast(_Attention, block.self_attn)
        attn.head_dim = hd
        attn.num_key_value_groups = heads // kv
        attn.scaling = hd**-0.5
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = inter


class CompressPrunedConfig(PretrainedConfig):
    model_type = "compress_pruned"

    def __init__(self, base_model_type: str = "llama", layers: list | None = None, **kwargs):
        self.base_model_type = base_model_type
        self.layers = layers or []
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in ("model_type", "architectures", "transformers_version", *PER_LAYER_KEYS)}
        return AutoConfig.for_model(self.base_model_type, **fields)


class CompressPrunedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CompressPrunedConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: CompressPrunedConfig):
        super().__init__(config)
        base_config = config.base_config()
        base_config._attn_implementation = config._attn_implementation
        # a model class; transformers annotates every lazy auto mapping's values as the tokenizers' (slow, fast) pair
        self._base_class = cast(type[PreTrainedModel], MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)])
        full = self._base_class(base_config)
        self.model, self.lm_head = full.model, full.lm_head
        if len(config.layers) != len(self.model.layers):
            raise ValueError(f"config describes {len(config.layers)} layers, "
                             f"the base config has {len(self.model.layers)}")
        resize_blocks(self.model.layers, config.layers, base_config.hidden_size)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint
        pass

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, *args, **kwargs):
        return self._base_class.forward(self, *args, **kwargs)


__all__ = ["CompressPrunedConfig", "CompressPrunedForCausalLM", "PER_LAYER_KEYS", "resize_blocks"]
