"""Synthetic Llama checkpoints on disk: random weights of a real architecture at any depth, width, head count and
grouped-query ratio, written shard by shard as transformers writes them (model-0000i-of-0000n.safetensors plus
model.safetensors.index.json, or one model.safetensors), with a config.json and the packaged default model's
tokenizer, so `compress run` and AutoModelForCausalLM load them like any local model folder.

    python -m compress.models.synthetic --layers 64 --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 OUT

Only one shard is in memory at a time (never the model), so checkpoints larger than memory can be made. Each tensor
is drawn from its own generator seeded by (seed, tensor name): the bytes do not depend on the shard size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import InputError
from compress.models.default import packaged_model_path
from export.format import SINGLE_WEIGHTS, TOKENIZER_FILES, WEIGHTS_INDEX

TOKENIZER_MODEL = "smollm2-135m"  # whose tokenizer (and vocabulary size, special token ids) the checkpoints use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02  # the Llama initializer range; residual outputs are scaled down by depth (GPT-2's scheme)
RESIDUAL_OUT = ("o_proj", "down_proj")  # projections that write into the residual stream


@dataclass(frozen=True)
class SyntheticLlama:
    """Sizes of a synthetic Llama checkpoint; `head_dim` fixes q/k/v widths, so `hidden` need not divide by heads."""

    layers: int
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    tie_embeddings: bool = True
    dtype: str = "bfloat16"  # what the shards store: float32, bfloat16, float16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"synthetic model: {name} = {getattr(self, name)} is not a positive integer")
        if self.heads % self.kv_heads:
            raise InputError(f"synthetic model: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.dtype not in DTYPES:
            raise InputError(f"synthetic model: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def config(self) -> dict:
        """The config.json (a dict): these sizes, with the vocabulary and special token ids of the tokenizer's model."""
        from transformers import LlamaConfig

        base = json.loads((packaged_model_path(TOKENIZER_MODEL) / "config.json").read_text())
        cfg = LlamaConfig(
            vocab_size=base["vocab_size"], hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=base["max_position_embeddings"],
            rms_norm_eps=base["rms_norm_eps"], tie_word_embeddings=self.tie_embeddings,
            bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        )
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.dtype = self.dtype
        cfg._name_or_path = f"synthetic-llama-{self.layers}x{self.hidden}-seed{self.seed}"
        return cfg.to_dict()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every stored tensor, in transformers' state-dict order (built on the meta device, so the
        names are the real architecture's; a tied lm_head is not stored)."""
        from transformers import AutoModelForCausalLM, LlamaConfig

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(self.config()))
        tied = set(model.get_expanded_tied_weights_keys()) if self.tie_embeddings else set()
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}

    def n_params(self) -> int:
        """Stored parameters (a tied lm_head counted once)."""
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def weight_bytes(self) -> int:
        """Bytes of the stored weights in `dtype`."""
        return self.n_params() * DTYPES[self.dtype].itemsize


def random_tensor(name: str, shape: tuple[int, ...], layers: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One tensor's synthetic values: norms (1-D) are ones; matrices N(0, 0.02), the residual outputs (o_proj,
    down_proj) scaled by 1/sqrt(2 layers) so activations stay bounded at any depth. Seeded by (seed, name)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    std = INIT_STD / math.sqrt(2 * layers) if name.split(".")[-2] in RESIDUAL_OUT else INIT_STD
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def shard_plan(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards in order, each shard at most `shard_bytes` unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_synthetic(out: str | Path, spec: SyntheticLlama, shard_mb: float = 500.0) -> Path:
    """Write `spec` as a Hugging Face model folder at `out` (created; refused if it exists and is not empty): shards of
    at most `shard_mb` MiB, the index when there is more than one, config.json, the default model's tokenizer files.
    Holds one shard in memory at a time. Returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder; the synthetic model is written to a new one")
    if shard_mb <= 0:
        raise InputError(f"shard_mb: {shard_mb} is not positive")
    out.mkdir(parents=True, exist_ok=True)
    dtype, shapes = DTYPES[spec.dtype], spec.tensor_shapes()
    shards = shard_plan(shapes, dtype.itemsize, int(shard_mb * 2**20))
    files = [SINGLE_WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        tensors = {n: random_tensor(n, shapes[n], spec.layers, spec.seed, dtype) for n in names}
        save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        weight_map = {n: f for f, names in zip(files, shards, strict=True) for n in names}
        total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(spec.config(), indent=2, sort_keys=True) + "\n")
    source = packaged_model_path(TOKENIZER_MODEL)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m compress.models.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="new folder for the model")
    ap.add_argument("--layers", type=int, required=True)
    for flag in ("hidden", "intermediate", "heads", "kv-heads", "head-dim", "seed"):
        default = SyntheticLlama.__dataclass_fields__[flag.replace("-", "_")].default
        ap.add_argument(f"--{flag}", type=int, default=default, help=f"default {default}")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--untied", action="store_true", help="store an lm_head of its own (default: tied embeddings)")
    ap.add_argument("--shard-mb", type=float, default=500.0, help="largest shard, MiB (default 500)")
    args = ap.parse_args(argv)
    spec = SyntheticLlama(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                          kv_heads=args.kv_heads, head_dim=args.head_dim, tie_embeddings=not args.untied,
                          dtype=args.dtype, seed=args.seed)
    try:
        out = write_synthetic(args.out, spec, args.shard_mb)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{out}: {spec.n_params():,} parameters, {spec.weight_bytes() / 2**20:.1f} MiB as {spec.dtype}")


if __name__ == "__main__":
    main()
