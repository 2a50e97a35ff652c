"""Stock-format views of a pruned model: a plain Llama-family config.json when every layer has the same widths and
the biases fit the stock flags; otherwise the documented `compress_pruned` per-layer form that our loader reads."""

from __future__ import annotations

import copy

from export.format import ATTN, MLP, PRUNED_ARCHITECTURE, PRUNED_MODEL_TYPE, stock_bias


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


def artifact_config(base: dict, layers: list[dict]) -> tuple[dict, list[dict], str | None]:
    """(config.json content, layers with the biases the config implies, why not stock or None).

    Stock form: widths in the config's own fields, zero biases filled in where the stock flags add some."""
    config = copy.deepcopy(base)
    for key in ("quantization_config", "auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    model_type = config["model_type"]
    widths = {(l["num_attention_heads"], l["num_key_value_heads"], l["head_dim"], l["intermediate_size"]) for l in layers}
    needed = set().union(*(set(l["bias"]) for l in layers))
    flags = _bias_flags(model_type, needed)
    why = None
    if len(widths) > 1:
        why = "layers have different widths; a stock config expresses one width for all"
    elif flags is None:
        why = f"{model_type} has no config flag for biases on {sorted(needed - set(stock_bias(model_type, {})))}"
    if why is None:
        (heads, kv, head_dim, inter), = widths
        stock = {**config, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
                 "intermediate_size": inter, **flags}
        why = _config_refusal(stock)
        if why is None:
            bias = list(stock_bias(model_type, stock))
            return stock, [{**l, "bias": bias} for l in layers], None
    config["base_model_type"] = model_type
    config["model_type"] = PRUNED_MODEL_TYPE
    config["architectures"] = [PRUNED_ARCHITECTURE]
    config["layers"] = layers
    return config, layers, why
