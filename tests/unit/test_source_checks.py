"""Source checks that the CLI table cannot show: good checkpoints of every shape pass (sharded, untied, old rotary
buffers, every supported architecture), our header reader agrees with safetensors, the refusals are fast, the counts
and bounds are exact."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compress.errors import InputError
from compress.models import checks, load_model, resolve_model
from tests.tiny import make_tiny_model
from tests.unit.bad_inputs_source import _beyond, _duplicate_key, _overlap, header


def _logits(model) -> torch.Tensor:
    ids = torch.arange(0, 40).reshape(2, 20)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_supported_architecture_passes(tiny_any):
    source = resolve_model(str(tiny_any))  # qwen2 with q/k/v biases, qwen3 with q/k norms, tied lm_head absent
    model, _ = load_model(source)
    assert torch.isfinite(_logits(model)).all()


def test_sharded_checkpoint_loads_like_the_single_file(tiny_llama, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:20], names[20:])):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tensors = checks.check_checkpoint(folder, json.loads((folder / "config.json").read_text()))
    assert {k: e.shape for k, e in tensors.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert {e.file.name for e in tensors.values()} == set(weight_map.values())
    single, _ = load_model(resolve_model(str(tiny_llama)))
    split, _ = load_model(resolve_model(str(folder)))
    assert torch.equal(_logits(single), _logits(split))


def test_untied_head_present_and_old_rotary_buffers_pass(tmp_path):
    folder = make_tiny_model(tmp_path / "untied", "llama", tie_word_embeddings=False)
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" in state
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old Llama checkpoints stored these
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(resolve_model(str(folder)))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("tied", [True, False])
def test_implied_parameters_is_exact_for_llama(tmp_path, tied):
    folder = make_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=tied)
    config = json.loads((folder / "config.json").read_text())
    held = sum(e.numel for e in checks.checkpoint_tensors(folder).values())
    # 384 x 96 embeddings (x2 untied) + 3 x (q 96x96, k 48x96, v 48x96, o 96x96, 3 x 128x96, two norms) + final norm
    assert checks.implied_parameters(config) == held == 384 * 96 * (1 if tied else 2) + 3 * (
        (96 + 48 + 48 + 96) * 96 + 3 * 128 * 96 + 2 * 96) + 96


def test_billion_layers_refused_before_anything_is_built(tiny_llama, tmp_path, monkeypatch):
    def build(*_args, **_kwargs):
        raise AssertionError("a model was built from the config before its sizes were checked")

    monkeypatch.setattr(checks, "expected_tensors", build)  # builds the model on the meta device
    folder = tmp_path / "huge"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config\.json: sizes \(num_hidden_layers=1000000000.* imply at least "
                                         r"[\d,]+ parameters, but the checkpoint holds 231,072"):
        resolve_model(str(folder))


def _safetensors_refuses(path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001  (safetensors has its own error types; any refusal counts here)
        return True
    return False


@pytest.mark.parametrize("damage", [
    lambda b: b"", lambda b: b[:-100], lambda b: b + b"\x00" * 16, lambda b: (2**40).to_bytes(8, "little") + b[8:],
    header(_overlap), header(_beyond), header(lambda h: h["model.norm.weight"].update(shape=[95])),
    header(lambda h: h["model.norm.weight"].update(dtype="F17")),
], ids=["empty", "truncated", "trailing", "absurd-length", "overlap", "beyond", "byte-count", "dtype"])
def test_header_refusals_agree_with_safetensors(tiny_llama, tmp_path, damage):
    """Every file the header check refuses, safetensors refuses too (no false alarms); ours names the file."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage((tiny_llama / "model.safetensors").read_bytes()))
    assert _safetensors_refuses(path)
    with pytest.raises(InputError, match=r"model\.safetensors: "):
        checks.read_header(path)


def test_header_reader_matches_safetensors(tiny_llama):
    entries = checks.read_header(tiny_llama / "model.safetensors")
    with safe_open(tiny_llama / "model.safetensors", framework="pt") as f:
        theirs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == theirs
    assert len(entries) == 29


def test_duplicate_tensor_name_is_refused(tiny_llama, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_duplicate_key((tiny_llama / "model.safetensors").read_bytes()))
    with pytest.raises(InputError, match="duplicate key"):
        checks.read_header(path)


def test_finite_check_scans_every_chunk(monkeypatch):
    monkeypatch.setattr(checks, "CHUNK", 7)
    weight = torch.zeros(10, 10)
    checks.check_finite([("w", weight)], "m")
    weight[9, 9], weight[0, 3] = float("nan"), float("-inf")  # the last chunk and the first
    with pytest.raises(InputError, match="m: tensor w holds 1 NaN and 1 Inf values"):
        checks.check_finite([("ok", torch.ones(3)), ("w", weight), ("ints", torch.ones(3, dtype=torch.int64))], "m")
    checks.check_finite([("ints", torch.full((3,), 7))], "m")  # integer tensors are not floating: skipped


@pytest.mark.parametrize(("dtype", "value", "refused"), [
    ("float16", 65504.0, False), ("float16", -7e4, True), ("float16", 1e5, True), ("bfloat16", 1e5, False),
    ("bfloat16", 3.4e38, True), ("float32", 3.4e38, False), ("auto", 3.4e38, False),
])
def test_export_dtype_bounds(dtype, value, refused):
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[2, 1] = value
    if refused:
        with pytest.raises(InputError, match=f"export.dtype: {dtype} cannot hold tensor weight"):
            checks.check_export_dtype(model, dtype)
    else:
        checks.check_export_dtype(model, dtype)


def test_a_stock_pruned_artifact_can_be_compressed_again_a_quantized_one_cannot(tiny_llama, tmp_path):
    """Prune now, quantize in a later run: a uniform (stock-config) pruned artifact is dense weights; a quantized one
    is refused by name."""
    import yaml
    from click.testing import CliRunner

    from compress.cli import cli

    base = {"model": str(tiny_llama), "calibration": {"windows": 4, "seq_len": 32, "batch_size": 4},
            "evaluate": {"enabled": False, "extra": []}}
    made = {}
    for name, passes in (("pruned", [{"pass": "flap", "target": 0.3, "structure": "uniform"}]),
                         ("quantized", [{"pass": "rtn", "bits": 4, "group_size": 32}])):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({**base, "name": name, "passes": passes}))
        res = CliRunner().invoke(cli, ["run", "-r", str(recipe), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        made[name] = tmp_path / name
    assert resolve_model(str(made["pruned"])).path == made["pruned"].resolve()
    with pytest.raises(InputError, match="a compress artifact .*already compressed"):
        resolve_model(str(made["quantized"]))


@pytest.mark.parametrize("value, least, ok", [(0, 0, True), (7, 1, True), (0, 1, False), (-1, 0, False),
                                              (True, 0, False), (False, 0, False), (2.0, 1, False), ("2", 1, False),
                                              (None, 0, False), (2**70, 1, True)])
def test_one_json_integer_check_for_header_sizes_and_config_sizes(value, least, ok):
    """Header shapes and offsets (least 0) and config.json sizes (least 1) share this check: JSON true and 2.0 are
    not integers."""
    assert checks.is_json_int(value, least) is ok


def test_a_checkpoint_missing_many_tensors_lists_max_listed_and_counts_the_rest(tiny_llama, tmp_path):
    from export.format import MAX_LISTED

    folder = tmp_path / "holes"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    gone = sorted(k for k in state if k.startswith(("model.layers.1.", "model.layers.2.")))[:MAX_LISTED + 3]
    assert len(gone) == MAX_LISTED + 3
    save_file({k: v for k, v in state.items() if k not in gone}, folder / "model.safetensors")
    with pytest.raises(InputError) as err:
        resolve_model(str(folder))
    message = str(err.value)
    assert message.count("missing tensor model.layers.") == MAX_LISTED and message.endswith("; and 3 more")
