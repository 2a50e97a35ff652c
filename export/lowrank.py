"""LoRALinear: a linear layer (nn.Linear or QuantLinear) with a low-rank correction beside it,
y = base(x) + (x A^T) B^T, A (rank, in), B (out, rank); the scale is 1 (PEFT's r = lora_alpha). Module surgery to put
wrappers in and take them out by full module name (`model.layers.3.mlp.up_proj`).

The wrapper is transparent to whoever reads tensors or weights: in its state dict the base's tensors keep their stock
names (`q_proj.weight`, not `q_proj.base.weight`) beside `q_proj.lora_A.weight` and `q_proj.lora_B.weight`, loading
takes the same names, and `weight` / `bias` are the base's."""

from __future__ import annotations

import torch
from torch import nn

from export.qlinear import QuantLinear

BASE = "base"  # the wrapped linear's attribute name (its tensors are stored without it)
LORA_PARTS = ("lora_A", "lora_B")  # the correction's submodules: <module>.lora_A.weight, <module>.lora_B.weight


class LoRALinear(nn.Module):
    """base(x) + lora_B(lora_A(x)): `base` is the wrapped linear (its tensors keep their names under `base.`),
    `lora_A.weight` (rank, in), `lora_B.weight` (out, rank). The correction runs in its own weights' dtype and is
    cast back to the base output's dtype."""

    base: nn.Linear | QuantLinear  # a submodule (registered in __init__; declared for the type checker)

    def __init__(self, base: nn.Linear | QuantLinear, A: torch.Tensor, B: torch.Tensor):
        """base: a linear with in_features/out_features; A (rank, in), B (out, rank), copied. Raises ValueError when
        the shapes do not fit the base or each other."""
        super().__init__()
        in_features, out_features = base.in_features, base.out_features
        rank = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape != (out_features, rank) or rank < 1:
            raise ValueError(f"LoRALinear: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a linear "
                             f"{in_features} -> {out_features} (A must be (rank, in), B (out, rank), rank >= 1)")
        self.base = base
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=A.device, dtype=A.dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
        self.register_state_dict_post_hook(_stock_names)
        self.register_load_state_dict_pre_hook(_base_names)

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (out, in); AttributeError for a packed base (QuantLinear has none)."""
        if not isinstance(self.base, nn.Linear):
            raise AttributeError(f"LoRALinear: its base is a {type(self.base).__name__}, which has no weight")
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))  # (..., rank) -> (..., out)
        return y + delta.to(y.dtype)

    def merged(self) -> torch.Tensor:
        """The base weight plus B @ A, (out, in), in the base weight's dtype (computed in float32 at least).
        Raises TypeError for a base that is not an nn.Linear (a packed weight has no exact merge)."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"LoRALinear.merged: the base is a {type(self.base).__name__}, not an nn.Linear")
        W = self.base.weight
        work = torch.promote_types(W.dtype, torch.float32)
        delta = self.lora_B.weight.to(work) @ self.lora_A.weight.to(work)  # (out, in)
        return (W.to(work) + delta.to(W.device)).to(W.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def wrap(model: nn.Module, names: list[str], A_by_name: dict[str, torch.Tensor],
         B_by_name: dict[str, torch.Tensor]) -> dict[str, LoRALinear]:
    """Replace each linear `names[i]` (full module name; an nn.Linear or QuantLinear) of `model` by a LoRALinear
    around it with A_by_name[name] (rank, in) and B_by_name[name] (out, rank); returns the wrappers by name.
    Raises ValueError naming the module when it is already wrapped, is not such a linear, or its shapes do not fit
    (nothing is wrapped then)."""
    bases: dict[str, nn.Linear | QuantLinear] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"wrap: {name} already has a low-rank correction")
        if not isinstance(module, nn.Linear | QuantLinear):
            raise ValueError(f"wrap: {name} is a {type(module).__name__}, not an nn.Linear or QuantLinear")
        if name not in A_by_name or name not in B_by_name:
            raise ValueError(f"wrap: no A or B given for {name}")
        bases[name] = module
    wrappers = {}
    for name, module in bases.items():
        try:
            wrappers[name] = LoRALinear(module, A_by_name[name], B_by_name[name])
        except ValueError as err:
            raise ValueError(f"wrap: {name}: {err}") from None
    for name, wrapper in wrappers.items():
        _replace(model, name, wrapper)
    return wrappers


def unwrap(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put every LoRALinear's base back in its place; returns {full name: (A (rank, in), B (out, rank))}, detached
    copies of the trained tensors, in module order."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for name, wrapper in found.items():
        out[name] = (wrapper.lora_A.weight.detach().clone(), wrapper.lora_B.weight.detach().clone())
        _replace(model, name, wrapper.base)
    return out


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear wrappers by full module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def round_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Round A and B of every LoRALinear to `dtype` in place (their own dtype kept), so that the in-memory model
    computes what readers of an artifact that stores them in `dtype` compute (export.ExportSettings.adapter_dtype)."""
    with torch.no_grad():
        for wrapper in adapters(model).values():
            for w in (wrapper.lora_A.weight, wrapper.lora_B.weight):
                w.copy_(w.to(dtype))


def _stock_names(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata) -> None:
    """State-dict hook: `<prefix>base.<k>` -> `<prefix><k>`, in place and in order (this module's keys are the
    last ones added)."""
    base = f"{prefix}{BASE}."
    mine = [k for k in state if k.startswith(prefix)]
    for k in mine:
        state[prefix + k.removeprefix(base) if k.startswith(base) else k] = state.pop(k)


def _base_names(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata, strict: bool,
                missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Load-state-dict pre-hook: the stock names `<prefix><k>` of the base's own tensors -> `<prefix>base.<k>`."""
    for k in list(state):
        rest = k.removeprefix(prefix)
        if k.startswith(prefix) and "." not in rest:
            state[f"{prefix}{BASE}.{rest}"] = state.pop(k)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
