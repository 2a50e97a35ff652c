"""Bad input, table-driven: exit code 2, a message that names the field, file or tensor, and nothing written."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from compress.cli import cli

GOOD = {"name": "t", "calibration": {"windows": 8, "seq_len": 64},
        "evaluate": {"seq_len": 64, "max_windows": 2, "extra": []},
        "passes": [{"pass": "flap", "target": 0.3}]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("bad")
    pickle_only = root / "pickle-only"
    pickle_only.mkdir()
    shutil.copy(tiny_llama / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    gpt2 = root / "gpt2"
    shutil.copytree(tiny_llama, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    no_config = root / "no-config"
    no_config.mkdir()
    (root / "empty.txt").write_text("\n \n")
    (root / "small.txt").write_text("\n\n".join(f"tiny paragraph {i}" for i in range(10)))
    (root / "rows.jsonl").write_text('{"text": "a"}\n')
    art = root / "artifact"
    runner = CliRunner()
    recipe = root / "good.yaml"
    recipe.write_text(yaml.safe_dump({**GOOD, "model": str(tiny_llama)}))
    res = runner.invoke(cli, ["run", "--recipe", str(recipe), "--out", str(art)])
    assert res.exit_code == 0, res.output
    return {"root": root, "model": tiny_llama, "artifact": art}


def _recipe_file(root: Path, data: dict | str, name="r.yaml") -> Path:
    p = root / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _with(model, **changes):
    d = json.loads(json.dumps({**GOOD, "model": str(model)}))
    for k, v in changes.items():
        node, *path = k.split("__")
        target = d
        parts = [node, *path]
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        target[parts[-1]] = v
    return d


def _damaged_copy(art: Path, root: Path, how: str) -> Path:
    dst = root / f"art-{how}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(art, dst)
    w = dst / "model.safetensors"
    if how == "truncated":
        w.write_bytes(w.read_bytes()[:-100])
    elif how == "altered":
        data = bytearray(w.read_bytes())
        data[-10] ^= 0xFF
        w.write_bytes(bytes(data))
    elif how == "missing-tensor":  # a writer bug: file consistent with itself, one tensor short of the manifest
        from export.writer import sha256_file

        state = load_file(w)
        state.pop("model.layers.1.mlp.up_proj.weight")
        save_file(state, w)
        m = json.loads((dst / "manifest.json").read_text())
        m["files"]["model.safetensors"] = {"sha256": sha256_file(w), "bytes": w.stat().st_size}
        (dst / "manifest.json").write_text(json.dumps(m))
    elif how == "missing-file":
        (dst / "tokenizer.json").unlink()
    return dst


CASES = [
    # (id, how to build the command, expected text in the message)
    ("unknown-key", lambda f: ["run", "-r", _recipe_file(f["root"], {**_with(f["model"]), "colour": "red"})], "colour: unknown key"),
    ("wrong-type", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], calibration__windows="many"))], "calibration.windows"),
    ("target-above-1", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], passes__0__target=1.5))], "passes.0.target"),
    ("target-zero", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], passes__0__target=0))], "passes.0.target"),
    ("unknown-pass", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], passes__0__pass="magic"))], "passes.0"),
    ("duplicate-key", lambda f: ["run", "-r", _recipe_file(f["root"], "name: a\nname: b\npasses: [{pass: flap, target: 0.3}]\n")], "duplicate key 'name'"),
    ("recipe-missing", lambda f: ["run", "-r", str(f["root"] / "nope.yaml")], "nope.yaml"),
    ("set-unknown", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"])), "--set", "passes.0.strength=2"], "passes.0.strength: unknown key"),
    ("model-missing", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["root"] / "no-model"))], "no-model"),
    ("model-no-config", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["root"] / "no-config"))], "config.json is missing"),
    ("pickle-only", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["root"] / "pickle-only"))], "pytorch_model.bin"),
    ("unsupported-arch", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["root"] / "gpt2"))], "GPT2LMHeadModel is not supported"),
    ("empty-corpus", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], calibration__source=str(f["root"] / "empty.txt")))], "empty.txt' is empty"),
    ("too-small-corpus", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], calibration__source=str(f["root"] / "small.txt")))], "windows of 64; the recipe asks for 8"),
    ("jsonl-no-field", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], calibration__source=str(f["root"] / "rows.jsonl")))], "calibration.field"),
    ("prune-after-quantize", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], passes=[{"pass": "gptq", "bits": 4, "group_size": 32}, {"pass": "flap", "target": 0.3}]))], "passes.1: flap prunes weights that passes.0 already quantized"),
    ("two-quantizations", lambda f: ["validate", _recipe_file(f["root"], _with(f["model"], passes=[{"pass": "rtn", "group_size": 32}, {"pass": "gptq", "group_size": 32}]))], "passes.1: the model is already quantized by passes.0; one quantization pass per recipe"),
    ("stage-windows-zero", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"], passes=[{"pass": "tyr", "target": 0.3, "evolution": {"stage_windows": [0, 4]}}]))], "passes.0.evolution.stage_windows.0: Input should be greater than or equal to 1"),
    ("output-exists", lambda f: ["run", "-r", _recipe_file(f["root"], _with(f["model"])), "--out", str(f["artifact"])], "exists; pass --overwrite"),
    ("verify-truncated", lambda f: ["verify", str(_damaged_copy(f["artifact"], f["root"], "truncated"))], "model.safetensors: "),
    ("verify-altered", lambda f: ["verify", str(_damaged_copy(f["artifact"], f["root"], "altered"))], "model.safetensors: sha256 differs"),
    ("verify-missing-tensor", lambda f: ["verify", str(_damaged_copy(f["artifact"], f["root"], "missing-tensor"))], "tensor model.layers.1.mlp.up_proj.weight missing"),
    ("verify-missing-file", lambda f: ["verify", str(_damaged_copy(f["artifact"], f["root"], "missing-file"))], "tokenizer.json: missing"),
    ("eval-not-artifact", lambda f: ["eval", str(f["root"])], "manifest.json: missing"),
    ("inspect-no-folder", lambda f: ["inspect", str(f["root"] / "nothing")], "no such artifact folder"),
]


from tests.unit import bad_inputs_artifact, bad_inputs_output, bad_inputs_recipe, bad_inputs_source, bad_inputs_text  # noqa: E402

# each area keeps its cases in its own table (tests/unit/bad_inputs_<area>.py: CASES = [(id, build, expected), ...])
ALL_CASES = CASES + [c for m in (bad_inputs_output, bad_inputs_source, bad_inputs_text, bad_inputs_recipe,
                                 bad_inputs_artifact) for c in m.CASES]


def test_cases_are_distinct_and_many():
    ids = [c[0] for c in ALL_CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(ids) >= 80, len(ids)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input(folders, case):
    _id, build, expected = case
    out = folders["root"] / f"out-{_id}"
    args = [str(a) for a in build(folders)]
    if args[0] == "run" and "--out" not in args:
        args += ["--out", str(out)]
    before = _tree(folders["root"])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert expected in res.output, res.output
    assert not out.exists()  # nothing written
    # nothing written, overwritten or left behind (no temporary folder) anywhere under root, --out targets included
    assert _tree(folders["root"]) == before


def _tree(root: Path) -> dict[str, tuple]:
    """Every file and link under root (links not followed) with its size, mode and modification time, and every
    folder by name (a refused run may probe a folder for writing, which touches the folder's own time)."""
    found: dict[str, tuple] = {}
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(here) / name
            st = p.lstat()
            found[str(p.relative_to(root))] = ("dir",) if name in dirs and not p.is_symlink() else (
                st.st_size, st.st_mode, st.st_mtime_ns)
    return found


def test_good_artifact_verifies_and_overwrite_replaces(folders, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(folders["artifact"]), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True
    art = tmp_path / "a"
    recipe = _recipe_file(tmp_path, _with(folders["model"]))
    assert runner.invoke(cli, ["run", "-r", str(recipe), "--out", str(art)]).exit_code == 0
    first = (art / "manifest.json").read_text()
    res = runner.invoke(cli, ["run", "-r", str(recipe), "--out", str(art), "--overwrite", "--set", "passes.0.target=0.2"])
    assert res.exit_code == 0, res.output
    assert (art / "manifest.json").read_text() != first and runner.invoke(cli, ["verify", str(art)]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
