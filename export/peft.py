"""The low-rank correction as a standard PEFT LoRA adapter folder, which `peft.PeftModel.from_pretrained` (and vLLM's
LoRA support) load onto the stock model of the artifact's base, and which our loader reads too (one copy of the
tensors in the artifact).

  adapter/adapter_config.json        peft_type LORA, r = lora_alpha (scale 1), target_modules (full module names),
                                     rank_pattern / alpha_pattern for the modules whose rank is not r
  adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight (rank, in),
                                     base_model.model.<module>.lora_B.weight (out, rank)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the causal LM


def tensor_names(module: str) -> tuple[str, str]:
    """The adapter file's names of module `module`'s A (rank, in) and B (out, rank)."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def peft_tensors(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' tensors from {module: (A (rank, in), B (out, rank))}, in `dtype`, on the CPU."""
    out = {}
    for module, (A, B) in adapters.items():
        name_A, name_B = tensor_names(module)
        out[name_A] = A.detach().to("cpu", dtype).contiguous()
        out[name_B] = B.detach().to("cpu", dtype).contiguous()
    return out


def peft_config(ranks: Mapping[str, int], base_model: str) -> dict:
    """adapter_config.json for modules of ranks {full module name: rank}: r is the most common rank (the smallest
    among equally common ones), the others go in rank_pattern, and lora_alpha = r everywhere (alpha_pattern mirrors
    rank_pattern) so that PEFT's scale lora_alpha / r is 1, as our y = base(x) + B A x. Raises ValueError for no
    modules or a rank below 1."""
    if not ranks or min(ranks.values()) < 1:
        raise ValueError(f"peft_config: ranks must name at least one module, each of rank >= 1: {dict(ranks)}")
    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k))
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
