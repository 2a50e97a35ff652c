"""Stock-format views of a compressed model: a plain Llama-family config.json when every layer has the same widths
and the biases fit the stock flags, with a compressed-tensors or GPTQ quantization_config when projections are
quantized; otherwise the documented `compress_pruned` per-layer form that our loader reads."""

from __future__ import annotations

import copy
import re

import torch

from export.format import ATTN, MLP, PRUNED_ARCHITECTURE, PRUNED_MODEL_TYPE, stock_bias
from export.packing import pack

LM_HEAD = "lm_head"  # the output projection: outside the decoder blocks, named exactly in a config's targets


def _bias_flags(model_type: str, needed: set[str]) -> dict | None:
    """Stock config flags whose bias set covers `needed`, or None when this model type cannot express it."""
    if model_type == "llama":
        flags = {"attention_bias": bool(needed & set(ATTN)), "mlp_bias": bool(needed & set(MLP))}
    elif model_type == "qwen3":
        flags = {"attention_bias": bool(needed & set(ATTN))}
    else:
        flags = {}
    return flags if needed <= set(stock_bias(model_type, flags)) else None


def _config_refusal(config: dict) -> str | None:
    """Why stock transformers would refuse this config (its own validation), or None."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        AutoConfig.for_model(config["model_type"], **fields)
    except Exception as err:  # transformers raises several error types from its config validators
        return f"stock {config['model_type']} config refuses these widths: {str(err).splitlines()[-1].strip()}"
    return None


def _layer_regex(names: list[str]) -> list[str]:
    """Compact compressed-tensors targets: whole layers as one regex, other modules by exact name."""
    by_layer: dict[int, set[str]] = {}
    for n in names:
        by_layer.setdefault(int(n.split(".")[2]), set()).add(n)
    full = sorted(i for i, ns in by_layer.items() if len(ns) == len(ATTN) + len(MLP))
    out = []
    if full:
        out.append(r"re:^model\.layers\.(?:" + "|".join(map(str, full)) + r")\.(?:self_attn|mlp)\.[a-z]+_proj$")
    out += ["re:^" + re.escape(n) + "$" for i, ns in sorted(by_layer.items()) if i not in full for n in sorted(ns)]
    return out


def compressed_tensors_config(schemes: dict[str, dict]) -> tuple[dict | None, str | None]:
    """compressed-tensors `pack-quantized` quantization_config for {module name: {bits, group_size, sym, ordered}},
    one config group per distinct scheme; (None, why) when the format cannot express the schemes."""
    if any(not s["ordered"] for s in schemes.values()):
        return None, ("act-order without static groups needs a g_idx, which compressed-tensors no longer reads "
                      "(use static_groups: true)")
    if any(not s["sym"] for s in schemes.values()):
        return None, ("asymmetric pack-quantized zero points do not load in stock transformers 5 with "
                      "compressed-tensors 0.20 (a known upstream gap, llm-compressor#1618); symmetric schemes do")
    groups: dict[tuple, list[str]] = {}
    for name, s in schemes.items():
        if name != LM_HEAD:
            groups.setdefault((s["bits"], s["group_size"], s["sym"]), []).append(name)
    config_groups = {f"group_{k}": _config_group(_layer_regex(names), *scheme)
                     for k, (scheme, names) in enumerate(sorted(groups.items()))}
    if (head := schemes.get(LM_HEAD)) is not None:  # a group of its own, after the decoder's; nothing left to ignore
        config_groups[f"group_{len(groups)}"] = _config_group([LM_HEAD], head["bits"], head["group_size"], head["sym"])
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [] if head is not None else [LM_HEAD],
            "kv_cache_scheme": None}, None


def _config_group(targets: list[str], bits: int, group: int, sym: bool) -> dict:
    """One compressed-tensors config group: integer weights of `bits`, per group of `group` columns (-1: channel)."""
    return {
        "targets": targets,
        "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                    "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
                    "dynamic": False, "actorder": None, "observer": "minmax"},
        "input_activations": None, "output_activations": None,
    }


def gptq_config(schemes: dict[str, dict], n_projections: int) -> tuple[dict | None, str | None]:
    """GPTQ-format quantization_config (one symmetric width for every decoder projection, and for the lm_head when it
    is quantized: `lm_head: true`, as GPTQModel and vLLM read it), or (None, why)."""
    kinds = {(s["bits"], s["group_size"], s["sym"], s["ordered"]) for s in schemes.values()}
    if len(kinds) != 1:
        return None, "the GPTQ format stores one width and group size for the whole model"
    (bits, group, sym, ordered), = kinds
    if not sym:
        return None, "the GPTQ (v1) format stores zero - 1, which loses a zero point of 0: symmetric only"
    decoder = len(schemes) - (LM_HEAD in schemes)
    if decoder != n_projections:
        return None, f"the GPTQ format quantizes every decoder projection; {decoder} of {n_projections} are"
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": not ordered, "sym": True,
            "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": LM_HEAD in schemes,
            "true_sequential": True}, None


def gptq_tensors(name: str, q) -> dict[str, torch.Tensor]:
    """One quantized linear in the GPTQ (v1) format: qweight (in*bits/32, out) packed along the input, qzeros
    (G, out*bits/32) holding zero - 1 packed along the output, scales (G, out) fp16, g_idx (in,) int32."""
    zeros_v1 = (q.zero - 1) & (2**q.bits - 1)  # (out, G)
    return {f"{name}.qweight": q.packed.T.contiguous(), f"{name}.qzeros": pack(zeros_v1.T.contiguous(), q.bits, dim=1),
            f"{name}.scales": q.scale.T.to(torch.float16).contiguous(), f"{name}.g_idx": q.g_idx.to(torch.int32)}


def gptq_to_packed(state: dict[str, torch.Tensor], name: str, scheme: dict) -> None:
    """Rename a GPTQ-format linear's tensors, in place, to the pack-quantized buffers our QuantLinear holds."""
    qweight, scales, g_idx = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales"), state.pop(f"{name}.g_idx")
    state.pop(f"{name}.qzeros")  # symmetric: zero = 2^(bits-1) by definition
    state[f"{name}.weight_packed"] = qweight.T.contiguous()
    state[f"{name}.weight_scale"] = scales.T.contiguous()
    state[f"{name}.weight_shape"] = torch.tensor(scheme["shape"], dtype=torch.int64)
    if not scheme["ordered"]:
        state[f"{name}.weight_g_idx"] = g_idx


def quantized_tensors(name: str, q, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear in compressed-tensors naming (q: a record with bits, sym, shape, packed,
    scale, zero, g_idx, ordered_groups)."""
    out = {f"{name}.weight_packed": q.packed, f"{name}.weight_scale": q.scale.to(dtype),
           f"{name}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
    if not q.sym:
        out[f"{name}.weight_zero_point"] = pack(q.zero, q.bits, dim=0)
    if not q.ordered_groups:
        out[f"{name}.weight_g_idx"] = q.g_idx
    return out


def artifact_config(base: dict, layers: list[dict], quant: dict[str, dict] | None = None,
                    quant_format: str = "compressed-tensors") -> tuple[dict, list[dict], str | None]:
    """(config.json content, layers with the biases the config implies, why not stock or None).

    Stock form: widths in the config's own fields, zero biases filled in where the stock flags add some, and a
    compressed-tensors quantization_config when modules are quantized."""
    config = copy.deepcopy(base)
    for key in ("quantization_config", "auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    if quant and LM_HEAD in quant:  # a quantized head is its own weight; the embeddings are stored as they are
        config["tie_word_embeddings"] = False
    model_type = config["model_type"]
    widths = {(layer["num_attention_heads"], layer["num_key_value_heads"], layer["head_dim"],
               layer["intermediate_size"]) for layer in layers}
    needed = set().union(*(set(layer["bias"]) for layer in layers))
    flags = _bias_flags(model_type, needed)
    why = None
    if len(widths) > 1:
        why = "layers have different widths; a stock config expresses one width for all"
    elif flags is None:
        why = f"{model_type} has no config flag for biases on {sorted(needed - set(stock_bias(model_type, {})))}"
    if not quant:
        qconfig, qwhy = None, None
    elif quant_format == "gptq":
        qconfig, qwhy = gptq_config(quant, len(layers) * (len(ATTN) + len(MLP)))
    else:
        qconfig, qwhy = compressed_tensors_config(quant)
    if why is None and qwhy is not None:
        why = qwhy
    if why is None and flags is not None:  # flags is None only with a reason in `why`
        (heads, kv, head_dim, inter), = widths
        stock = {**config, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
                 "intermediate_size": inter, **flags}
        why = _config_refusal(stock)
        if why is None:
            bias = list(stock_bias(model_type, stock))
            if qconfig is not None:
                stock["quantization_config"] = qconfig
            return stock, [{**layer, "bias": bias} for layer in layers], None
    config["base_model_type"] = model_type
    config["model_type"] = PRUNED_MODEL_TYPE
    config["architectures"] = [PRUNED_ARCHITECTURE]
    config["layers"] = layers
    return config, layers, why


def _decilm_intermediate(ffn_mult: float, hidden: int) -> int:
    """The MLP width DeciLM / nemotron-nas derives from ffn_mult: int(2 * ffn_mult * hidden / 3) rounded up to 256."""
    size = int(2 * ffn_mult * hidden / 3)
    return -(-size // 256) * 256


def block_configs(base: dict, layers: list[dict]) -> tuple[list[dict] | None, str | None]:
    """The nemotron-nas (DeciLM) per-block view vLLM serves natively, or (None, why it cannot express the model).

    DeciLM keeps one query-head count and head_dim for the whole model and varies per block the key-value groups
    (n_heads_in_group = query heads per kv head) and the MLP width (through ffn_mult, in steps of 256); it has no
    projection biases."""
    model_type = base.get("base_model_type", base.get("model_type"))
    if model_type not in ("llama", "mistral"):
        return None, f"nemotron-nas is Llama-based; {model_type} blocks (biases, norms) differ"
    heads = base["num_attention_heads"]
    head_dim = base.get("head_dim") or base["hidden_size"] // heads
    hidden = base["hidden_size"]
    out = []
    for i, layer in enumerate(layers):
        if layer["bias"]:
            return None, f"layer {i} has biases on {layer['bias']} (bias compensation); nemotron-nas has none"
        if layer["num_attention_heads"] != heads or layer["head_dim"] != head_dim:
            return None, (f"layer {i} has {layer['num_attention_heads']} query heads; nemotron-nas keeps {heads} in "
                          "every block (prune MLP channels only, e.g. CFSP, to get this view)")
        if heads % layer["num_key_value_heads"]:
            return None, f"layer {i}: {layer['num_key_value_heads']} kv heads do not divide {heads} query heads"
        ffn_mult = round(1.5 * layer["intermediate_size"] / hidden, 6)
        if _decilm_intermediate(ffn_mult, hidden) != layer["intermediate_size"]:
            return None, (f"layer {i} MLP width {layer['intermediate_size']} is not a multiple of 256 (nemotron-nas "
                          "widths are; use round_to: 256)")
        out.append({"attention": {"no_op": False, "replace_with_linear": False, "sparsify": None,
                                  "n_heads_in_group": heads // layer["num_key_value_heads"]},
                    "ffn": {"no_op": False, "replace_with_linear": False, "sparsify": None, "ffn_mult": ffn_mult}})
    return out, None


REMOTE_CODE_FILE = "modeling_compress_pruned.py"


def remote_code_auto_map() -> dict:
    """auto_map entries that make transformers (with trust_remote_code=True) use the modeling file we ship."""
    stem = REMOTE_CODE_FILE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.CompressPrunedConfig", "AutoModelForCausalLM": f"{stem}.CompressPrunedForCausalLM"}


def remote_code_source() -> str:
    from pathlib import Path

    return (Path(__file__).parent / "remote" / REMOTE_CODE_FILE).read_text()
