"""Content keys: what a variant database, a search state or a run journal depends on, as one sha256."""

from __future__ import annotations

import hashlib
import json

import torch


def fingerprint(*parts) -> str:
    """sha256 over tensors (their bytes, dtype and shape) and JSON-serializable settings, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_parts(model) -> list:
    """What a model's variants and search scores depend on besides the pass: every tensor of its state (embeddings,
    norms and head included, by name) and its config (rope, norm epsilon, ...), for `fingerprint`."""
    state = model.state_dict()
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # where it was read from
    return [config, *[p for name in sorted(state) for p in (name, state[name])]]
