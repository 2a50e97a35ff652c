"""export.write streams: tensors arrive module by module and shards are written as they fill. The shards, index and
manifest equal those of the one-shot split of the whole stored state (computed here); no more than one shard's worth
of earlier modules' tensors is alive while later modules are produced; a stream out of plan order is refused."""

from __future__ import annotations

import itertools
import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import export
from export.format import SINGLE_WEIGHTS, WEIGHTS_INDEX, shard_name
from export.interop import gptq_tensors, quantized_tensors
from export.packing import pack
from export.records import BlockWidths, QuantRecord
from tests.export_stubs import StubPlan

HIDDEN, VOCAB, BLOCKS = 64, 80, 3
WIDTHS = BlockWidths(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, bias=("o_proj",))
PROJ = {"self_attn.q_proj": (64, HIDDEN), "self_attn.k_proj": (32, HIDDEN), "self_attn.v_proj": (32, HIDDEN),
        "self_attn.o_proj": (HIDDEN, 64), "mlp.gate_proj": (96, HIDDEN), "mlp.up_proj": (96, HIDDEN),
        "mlp.down_proj": (HIDDEN, 96)}
MODULE = "model.layers.{}.{}"



def _record(shape: tuple[int, int], bits: int, group: int, sym: bool = True, ordered: bool = True) -> QuantRecord:
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f * in_f + bits)
    n_groups = in_f // group
    g_idx = torch.arange(in_f) // group
    if not ordered:  # act-order: columns visit the groups in a permuted order
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return QuantRecord(bits=bits, group_size=group, sym=sym, shape=shape,
                       packed=pack(torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32), bits, 1),
                       scale=torch.rand(out_f, n_groups, generator=g) + 0.5,
                       zero=(torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32) if sym else
                             torch.randint(0, 2**bits, (out_f, n_groups), generator=g, dtype=torch.int32)),
                       g_idx=g_idx.to(torch.int32))


def _plan(quant_format: str) -> StubPlan:
    """gptq: every projection at 4 bits (a stock config: zero q/k/v biases beside the o_proj biases);
    compressed-tensors: mixed widths, one asymmetric act-order linear (per-layer config: no zero biases)."""
    if quant_format == "gptq":
        quantized = {MODULE.format(i, p): _record(s, 4, 32) for i in range(BLOCKS) for p, s in PROJ.items()}
    else:
        quantized = {MODULE.format(0, p): _record(PROJ[p], 4, 32) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                             "self_attn.v_proj", "mlp.up_proj")}
        quantized[MODULE.format(1, "mlp.down_proj")] = _record(PROJ["mlp.down_proj"], 3, 32, sym=False, ordered=False)
        quantized[MODULE.format(2, "mlp.gate_proj")] = _record(PROJ["mlp.gate_proj"], 8, 16)
    return StubPlan([WIDTHS] * BLOCKS, quantized)


def _config(tied: bool) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": 96, "num_hidden_layers": BLOCKS, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
            "attention_bias": False, "mlp_bias": False}


def _module_list() -> list[str]:
    """Module names in state-dict order."""
    names = ["model.embed_tokens"]
    for i in range(BLOCKS):
        names += [MODULE.format(i, p) for p in PROJ]
        names += [MODULE.format(i, "input_layernorm"), MODULE.format(i, "post_attention_layernorm")]
    return names + ["model.norm", "lm_head"]


def _parts(module: str) -> dict[str, torch.Tensor]:
    """One module's tensors (fp32, seeded by its name); o_proj carries a bias, as the plan's widths say."""
    g = torch.Generator().manual_seed(sum(map(ord, module)))
    short = module.rsplit(".", 1)[-1]
    if module in ("model.embed_tokens", "lm_head"):
        return {f"{module}.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    if short.endswith("norm"):
        return {f"{module}.weight": torch.randn(HIDDEN, generator=g)}
    shape = next(s for p, s in PROJ.items() if module.endswith(p))
    parts = {f"{module}.weight": torch.randn(*shape, generator=g)}
    if short == "o_proj":
        parts[f"{module}.bias"] = torch.randn(HIDDEN, generator=g)
    return parts


def _stream(order: list[str] | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    for module in order or _module_list():
        yield module, _parts(module)


def _write(out: Path, plan: StubPlan, settings: export.ExportSettings, tensors, tied: bool = True) -> dict:
    source = out.parent / "source"
    source.mkdir(parents=True, exist_ok=True)
    provenance = export.Provenance(folder=source, source={"name": "t", "identity": "t", "path": "t"},
                                   config=_config(tied), recipe={"name": "t"}, recipe_yaml="name: t\n", seed=0)
    report: dict = {}
    export.write(out, tensors, plan, report, provenance, settings, check=lambda folder: {},
                 card=lambda rep: "card\n")
    return report


def _one_shot(plan: StubPlan, settings: export.ExportSettings, tied: bool) -> dict[str, torch.Tensor]:
    """The whole stored state in stored order, built at once: plain tensors in arrival order (quantized weights and
    a tied lm_head left out), packed parts in plan order, then the zero biases a stock config implies."""
    state = {}
    for module, parts in _stream():
        for key, t in parts.items():
            if not (module in plan.quantized and key == f"{module}.weight") and not (tied and module == "lm_head"):
                state[key] = t.to(settings.dtype)
    for name, q in plan.quantized.items():
        packed = (gptq_tensors(name, q) if settings.quant_format == "gptq"
                  else quantized_tensors(name, q, settings.dtype))
        state.update({k: t.contiguous() for k, t in packed.items()})  # an asymmetric zero point is packed along dim 0
    if settings.quant_format == "gptq":  # stock config with attention_bias: q/k/v get zero biases
        for i in range(BLOCKS):
            for p in ("q_proj", "k_proj", "v_proj"):
                rows = PROJ[f"self_attn.{p}"][0]
                state[f"model.layers.{i}.self_attn.{p}.bias"] = torch.zeros(rows, dtype=settings.dtype)
    return state


def _split(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The one-shot split: a new shard when the current one holds a tensor and the next would pass max_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


@pytest.mark.parametrize("shard_bytes", [1, 3000, 40_000, 10**9])
@pytest.mark.parametrize("quant_format, dtype, tied", [("compressed-tensors", torch.bfloat16, True),
                                                       ("gptq", torch.float32, False)])
def test_streamed_shards_equal_the_one_shot_split(tmp_path, shard_bytes, quant_format, dtype, tied):
    plan = _plan(quant_format)
    settings = export.ExportSettings(dtype=dtype, quant_format=quant_format, shard_bytes=shard_bytes)
    report = _write(tmp_path / "art", plan, settings, _stream(), tied)
    art = tmp_path / "art"
    assert report["stock_config"] is (quant_format == "gptq")

    state = _one_shot(plan, settings, tied)
    shards = _split(state, shard_bytes)
    names = [SINGLE_WEIGHTS] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    if shard_bytes == 1:
        assert len(names) == len(state)  # one tensor per shard
    assert sorted(p.name for p in art.glob("*.safetensors")) == sorted(names)
    assert not list(art.glob("*.part"))
    for fname, shard in zip(names, shards, strict=True):
        assert (art / fname).read_bytes() == save(shard, metadata={"format": "pt"}), fname  # byte for byte
        stored = load_file(art / fname)
        assert sorted(stored) == sorted(shard)
        for key, t in shard.items():
            assert stored[key].dtype == t.dtype and torch.equal(stored[key], t), key

    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map = {k: fname for fname, shard in zip(names, shards, strict=True) for k in shard}
    if len(shards) > 1:
        index = json.loads((art / WEIGHTS_INDEX).read_text())
        assert index == {"metadata": {"total_size": total}, "weight_map": weight_map}
        assert list(index["weight_map"]) == list(state)  # stored order, as the one-shot writer listed it
    else:
        assert not (art / WEIGHTS_INDEX).exists()
    tensors = json.loads((art / "manifest.json").read_text())["tensors"]
    assert list(tensors) == list(state)
    assert tensors == {k: {"file": weight_map[k], "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                       for k, t in state.items()}

    # stored bits per weight, counted as the stream went, equal the count over the whole state
    n = sum(q.shape[0] * q.shape[1] for q in plan.quantized.values())
    packed = sum(t.numel() * t.element_size() * 8 for k, t in state.items()
                 if k.rsplit(".", 1)[0] in plan.quantized and not k.endswith((".bias", ".weight_shape")))
    assert report["bits_per_weight"]["stored"] == round(packed / n, 4)
    assert report["bits_per_weight"]["quantized_weights"] == n
    shapes = [q.shape for q in plan.quantized.values()]
    if quant_format == "gptq":  # 4-bit codes, an fp16 scale and a 4-bit zero per 32 weights, a 32-bit g_idx per column
        theory = sum(o * i * 4 + o * (i // 32) * (16 + 4) + 32 * i for o, i in shapes)
        assert report["bits_per_weight"]["theory"] == round(theory / n, 4)


def test_no_more_than_a_shard_of_earlier_modules_is_held(tmp_path):
    """Each yielded tensor is watched with weakref.finalize; whenever the stream produces module k, the tensors of
    modules before k that are still alive weigh at most one shard plus the module before k (held while its tensors
    are converted). Holding the whole state, as a one-shot writer does, fails this."""
    shard_bytes = 40_000
    alive: dict[int, tuple[int, int]] = {}  # tensor serial -> (module index, bytes)
    worst: list[tuple[int, int]] = []  # per module produced: (bytes of earlier modules alive, bytes allowed)
    sizes: list[int] = []

    serials = itertools.count()

    def watch(k: int, parts: dict[str, torch.Tensor]) -> None:
        for t in parts.values():
            serial = next(serials)
            alive[serial] = (k, t.numel() * t.element_size())
            weakref.finalize(t, alive.pop, serial)

    def watched() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for k, module in enumerate(_module_list()):
            parts = _parts(module)
            earlier = sum(nbytes for mod, nbytes in alive.values() if mod < k)
            worst.append((earlier, shard_bytes + (sizes[-1] if sizes else 0)))
            sizes.append(sum(t.numel() * t.element_size() for t in parts.values()))
            watch(k, parts)
            yield module, parts
            del parts  # the stream itself keeps nothing it has yielded

    plan = _plan("compressed-tensors")
    settings = export.ExportSettings(dtype=torch.float32, shard_bytes=shard_bytes)
    _write(tmp_path / "art", plan, settings, watched(), tied=False)
    total = sum(sizes)
    assert total > 8 * shard_bytes  # the state is much larger than a shard ...
    assert len(list((tmp_path / "art").glob("model-*.safetensors"))) >= 8  # ... and is written in many shards
    over = [(k, held, allowed) for k, (held, allowed) in enumerate(worst) if held > allowed]
    assert over == [], f"(module, bytes of earlier modules alive, allowed): {over[:3]}"
    assert max(held for held, _ in worst) > shard_bytes // 2  # the watch does see the shard being filled
    assert alive == {}  # nothing is kept after the write


def _refused(tmp_path: Path, order: list[str] | None = None, drop: str | None = None) -> str:
    """export.write's refusal message for a stream in `order` (default: state-dict order), with the tensor `drop`
    left out; nothing may be left behind."""
    def stream():
        for module, parts in _stream(order):
            yield module, {k: t for k, t in parts.items() if k != drop}

    settings = export.ExportSettings(dtype=torch.float32, shard_bytes=3000)
    with pytest.raises(ValueError) as err:
        _write(tmp_path / "art", _plan("compressed-tensors"), settings, stream())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no artifact, no temporary folder
    return str(err.value)


def test_quantized_modules_out_of_plan_order_are_refused(tmp_path):
    order = _module_list()
    q, k = order.index("model.layers.0.self_attn.q_proj"), order.index("model.layers.0.self_attn.k_proj")
    order[q], order[k] = order[k], order[q]
    assert _refused(tmp_path, order) == ("model.layers.0.self_attn.k_proj: arrives out of plan order; the plan "
                                         "records model.layers.0.self_attn.q_proj next (after model.embed_tokens)")


def test_a_block_that_comes_back_is_refused(tmp_path):
    order = _module_list()
    order.remove("model.layers.0.post_attention_layernorm")
    order.insert(order.index("model.layers.1.input_layernorm") + 1, "model.layers.0.post_attention_layernorm")
    assert _refused(tmp_path, order) == (
        "model.layers.0.post_attention_layernorm: block 0 arrives after block 1 (after model.layers.1.input_layernorm)"
        "; modules must arrive in plan order, block by block")


def test_a_module_that_comes_twice_is_refused(tmp_path):
    order = _module_list()
    order.insert(order.index("model.norm"), "model.layers.2.mlp.up_proj")
    assert _refused(tmp_path, order) == (
        "model.layers.2.mlp.up_proj: its tensors arrive twice (after model.layers.2.post_attention_layernorm); each "
        "module's tensors must come together")


def test_a_quantized_module_without_its_weight_is_refused(tmp_path):
    message = _refused(tmp_path, drop="model.layers.1.mlp.down_proj.weight")
    assert message == ("model.layers.1.mlp.down_proj: quantized in the plan, but its tensors hold no "
                       "model.layers.1.mlp.down_proj.weight (they hold [])")


def test_a_stream_that_ends_before_a_quantized_module_is_refused(tmp_path):
    order = [m for m in _module_list() if m != "model.layers.2.mlp.gate_proj"]
    assert _refused(tmp_path, order) == ("model.layers.2.mlp.gate_proj: quantized in the plan, but the tensors ended "
                                         "before it arrived (1 quantized modules missing)")


def test_the_writer_refuses_a_tensor_name_twice(tmp_path):
    from export.writer import ArtifactWriter

    t = torch.zeros(4)
    with ArtifactWriter(tmp_path / "art") as w, pytest.raises(ValueError, match=r"^a.weight: arrives twice"):
        w.write_weights(iter([("a.weight", t), ("b.weight", t), ("a.weight", t)]), shard_bytes=8)
    assert list(tmp_path.iterdir()) == []


def test_tensors_that_share_storage_are_stored_apart(tmp_path):
    """An untied config whose model still shares the embedding with lm_head (and a view of it) in one shard:
    safetensors refuses shared storage, so the writer copies those tensors, and each loads as it was."""
    from export.writer import ArtifactWriter

    embed = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with ArtifactWriter(tmp_path / "art") as w:
        w.write_weights(iter([("embed.weight", embed), ("lm_head.weight", embed), ("rows.weight", embed[2:4]),
                              ("norm.weight", torch.ones(4))]), shard_bytes=10**6)
        stored = load_file(w.tmp / SINGLE_WEIGHTS)
    assert sorted(stored) == ["embed.weight", "lm_head.weight", "norm.weight", "rows.weight"]
    assert torch.equal(stored["embed.weight"], embed) and torch.equal(stored["lm_head.weight"], embed)
    assert torch.equal(stored["rows.weight"], embed[2:4]) and torch.equal(stored["norm.weight"], torch.ones(4))
