"""The Llama-family adapter: where blocks, attention, MLP and norms are, and the one place that does surgery on them.

Llama, Mistral, Qwen2 and Qwen3 (q/k norms) share the layout `model.model.layers[i].{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj}`, grouped-query attention included. Attention is pruned by whole key-value groups: a group
is one key head, one value head and the `n_heads / n_kv_heads` query heads that read them, so every kept group keeps
all its query heads and the per-layer query-to-key ratio, which the attention kernels assume, never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from compress.errors import InputError
from compress.models.checks import is_json_int

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# config.json sizes the adapter reads: required ones, then optional ones (absent or null means derived)
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def check_supported(config: object, where: str) -> dict[str, Any]:
    """Refuse anything but a Llama-family config with sane sizes before any weight is read, naming `where`
    (the config.json path) and the field: architecture, model_type, positive integer sizes, heads that divide.
    Returns the config, now known to be a JSON object."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: a config is a JSON object, this one is a {type(config).__name__}")
    archs = config.get("architectures") or [f"<model_type {config.get('model_type')!r}>"]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"{where}: architectures: {archs!r} is not a list of class names")
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise InputError(
            f"{where}: architecture {', '.join(archs)} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = config.get("model_type")
    if model_type != MODEL_TYPES[supported[0]]:
        raise InputError(f"{where}: model_type: {model_type!r} is not the {MODEL_TYPES[supported[0]]!r} that "
                         f"architecture {supported[0]} has")
    for key in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in REQUIRED_SIZES:
            raise InputError(f"{where}: {key}: missing")
        if value is not None and not is_json_int(value, 1):
            raise InputError(f"{where}: {key}: {value!r} is not a positive integer")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise InputError(f"{where}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                         f"{heads} (and head_dim is not given)")
    return config


@dataclass(frozen=True)
class BlockShape:
    """Widths of one decoder block; `bias` names the projections that carry a bias."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    bias: tuple[str, ...]

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        return {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "bias": list(self.bias),
        }


class Attention(Protocol):
    """What the adapter reads and writes on a block's attention module (transformers' LlamaAttention and kin)."""

    head_dim: int
    num_key_value_groups: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear


class Mlp(Protocol):
    """A block's gated MLP: gate and up (intermediate, hidden), down (hidden, intermediate)."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


class DecoderBlock(Protocol):
    """One decoder layer of the Llama family, as the adapter sees it."""

    self_attn: Attention
    mlp: Mlp


class Backbone(Protocol):
    """The decoder stack under the head: its blocks and the final norm."""

    layers: nn.ModuleList
    norm: nn.Module


class ModelConfig(Protocol):
    """The parts of a transformers config the toolkit reads (PretrainedConfig declares none of the sizes)."""

    hidden_size: int

    def to_dict(self) -> dict[str, Any]: ...


class CausalLM(Protocol):
    """A Llama-family causal LM (transformers' LlamaForCausalLM and kin): config, backbone, head (vocab, hidden)."""

    config: ModelConfig
    model: Backbone
    lm_head: nn.Linear


def as_causal_lm(model: nn.Module) -> CausalLM:
    """The typed view of a whole model (nn.Module's attribute access is untyped: Tensor | Module)."""
    return cast(CausalLM, model)


def as_block(block: nn.Module) -> DecoderBlock:
    """The typed view of a decoder layer (nn.Module's attribute access is untyped: Tensor | Module)."""
    return cast(DecoderBlock, block)


def hidden_size(model: nn.Module) -> int:
    """The model's residual width (config.hidden_size)."""
    return as_causal_lm(model).config.hidden_size


def blocks(model: nn.Module) -> nn.ModuleList:
    return as_causal_lm(model).model.layers


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The seven projections of a block, by their short name."""
    attn, mlp = as_block(block).self_attn, as_block(block).mlp
    return {**{n: getattr(attn, n) for n in ATTN}, **{n: getattr(mlp, n) for n in MLP}}


def block_shape(block: nn.Module) -> BlockShape:
    attn = as_block(block).self_attn
    hd = attn.head_dim
    n_heads = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    return BlockShape(
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=hd,
        intermediate_size=as_block(block).mlp.up_proj.out_features,
        bias=tuple(n for n, lin in linears(block).items() if lin.bias is not None),
    )


def block_params(shape: BlockShape, hidden: int) -> int:
    """Projection weights of a block (biases not counted): attention q/k/v/o + MLP gate/up/down."""
    attn = (2 * shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim * hidden
    return attn + 3 * shape.intermediate_size * hidden


def group_params(shape: BlockShape, hidden: int) -> int:
    """Weights one key-value group removes: its query heads' q rows and o columns, one k and one v head."""
    return (2 * shape.group_size + 2) * shape.head_dim * hidden


def channel_params(hidden: int) -> int:
    """Weights one MLP channel removes: a gate row, an up row, a down column."""
    return 3 * hidden


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep rows (outputs) and/or columns (inputs) of a linear layer, in place."""
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[rows].clone(), requires_grad=False)
        lin.out_features = int(rows.numel())
    if cols is not None:
        w = w[:, cols]
        lin.in_features = int(cols.numel())
    lin.weight = nn.Parameter(w.clone().contiguous(), requires_grad=False)


def set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give a linear new weights of any shape (out, in), and a bias or none, in place (in the current dtype, on the
    current device)."""
    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=lin.weight.device, dtype=lin.weight.dtype).contiguous(), requires_grad=False)

    new_weight = param(weight)
    # register_parameter is what `lin.bias = ...` calls; it also takes None, which nn.Linear's typed bias does not
    lin.register_parameter("bias", None if bias is None else param(bias))
    lin.weight = new_weight
    lin.out_features, lin.in_features = lin.weight.shape


def sync_widths(block: nn.Module) -> None:
    """Set the width attributes some attention / MLP code reads from the block's current projections."""
    typed = as_block(block)
    typed.self_attn.num_key_value_groups = block_shape(block).group_size
    if hasattr(typed.mlp, "intermediate_size"):
        typed.mlp.intermediate_size = typed.mlp.up_proj.out_features


def add_output_bias(lin: nn.Linear, bias: torch.Tensor) -> None:
    """Add `bias` (out,) to a linear's output, creating the bias if the layer had none."""
    bias = bias.to(lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
    else:
        lin.bias = nn.Parameter(lin.bias.data + bias, requires_grad=False)


def group_dims(shape: BlockShape, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of q_proj (= columns of o_proj) and rows of k_proj / v_proj that key-value groups `groups` own:
    (len * group_size * head_dim,), (len * head_dim,)."""
    hd, m = shape.head_dim, shape.group_size
    kv_dims = (groups[:, None] * hd + torch.arange(hd)).reshape(-1)
    q_heads = (groups[:, None] * m + torch.arange(m)).reshape(-1)
    q_dims = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    return q_dims, kv_dims


def prune_attention_groups(block: nn.Module, keep_groups: torch.Tensor, o_bias: torch.Tensor | None = None) -> None:
    """Keep key-value groups `keep_groups` (sorted indices); add `o_bias` (hidden,) to o_proj if given."""
    attn = as_block(block).self_attn
    shape = block_shape(block)
    if keep_groups.numel() < 1:
        raise ValueError("a block keeps at least one key-value group")
    q_dims, kv_dims = group_dims(shape, keep_groups)
    _slice_linear(attn.q_proj, rows=q_dims)
    _slice_linear(attn.k_proj, rows=kv_dims)
    _slice_linear(attn.v_proj, rows=kv_dims)
    _slice_linear(attn.o_proj, cols=q_dims)
    if o_bias is not None:
        add_output_bias(attn.o_proj, o_bias)
    sync_widths(block)


def prune_mlp_channels(block: nn.Module, keep: torch.Tensor, down_bias: torch.Tensor | None = None) -> None:
    """Keep MLP channels `keep` (sorted indices); add `down_bias` (hidden,) to down_proj if given."""
    if keep.numel() < 1:
        raise ValueError("a block keeps at least one MLP channel")
    mlp = as_block(block).mlp
    _slice_linear(mlp.gate_proj, rows=keep)
    _slice_linear(mlp.up_proj, rows=keep)
    _slice_linear(mlp.down_proj, cols=keep)
    if down_bias is not None:
        add_output_bias(mlp.down_proj, down_bias)
    sync_widths(block)


def named_linears(model: nn.Module) -> dict[str, tuple[int, str, nn.Linear]]:
    """Every decoder projection by its full module name (`model.layers.3.mlp.up_proj`): (layer, short name, module)."""
    out = {}
    for i, block in enumerate(blocks(model)):
        for short, lin in linears(block).items():
            sub = "self_attn" if short in ATTN else "mlp"
            out[f"model.layers.{i}.{sub}.{short}"] = (i, short, lin)
    return out


# Projections that read the same input: one Hessian serves the group, and serving engines fuse them, so they must
# share one quantization scheme.
SHARED_INPUT = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                "gate_proj": "up_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
