"""Property: whatever recipe or manifest a user or an attacker hands in, `compress validate`, `verify` and `inspect`
end with exit 0 or 2 and the project's own message, never an uncaught exception.

Inputs are generated (hypothesis, derandomized so that CI sees the same examples each run): mutations of the
shipped recipes and of a real artifact's manifest (a value replaced by a nasty one, a key deleted or added, the
text cut or a byte flipped), and random nested data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compress.cli import cli

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values that have broken parsers before: huge and negative numbers, non-finite floats, long and odd strings, regexes
# that backtrack or unroll, paths that leave a folder, and every JSON/YAML type where another is expected
_ODD_TEXT = st.sampled_from(["", " ", "-1", "1e999", "nan", ".inf", "../../etc/passwd", "/etc/hostname", "a" * 5000,
                             "(a|aa)+$", r"^([\w.]+\.?)*\d$", "(?:a{65535}){65535}", "[", "\x00", "é∂\u202e",
                             "model.safetensors", "compress-artifact", "flap", "gptq", "-1"])
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**200),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), _ODD_TEXT,
)
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["name", "model", "seed", "passes", "pass", "target", "bits", "targets", "overrides", "pattern", "calibration",
     "windows", "seq_len", "export", "shard_size_mb", "evaluate", "format", "format_version", "files", "tensors",
     "file", "shape", "dtype", "sha256", "bytes", "architecture", "layers", "quantization", "source", "recipe"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def _paths(node, here=()) -> list[tuple]:
    """Every place in nested dicts/lists, as key paths."""
    found = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*here, i))
    return found


@st.composite
def mutated(draw, base: object, mutations: int = 3):
    """`base` with a few places replaced by generated values, deleted, or given an extra key."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, mutations))):
        path = draw(st.sampled_from(_paths(data)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            data = draw(VALUES) if action == "replace" else data
            continue
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return data


def _ok(res, refusal: str) -> None:
    """Exit 0 or 2, no exception but the SystemExit of our own error handler, and a refusal says `refusal`."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.output, res.exc_info)
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    assert res.exit_code == 0 or refusal in res.output, res.output
    event(f"exit {res.exit_code}")


def _recipe_data(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


RECIPE_INPUTS = st.one_of(
    st.sampled_from(RECIPES).flatmap(lambda p: mutated(_recipe_data(p))),
    VALUES,
    st.dictionaries(KEYS, VALUES, max_size=6),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props")


@SETTINGS
@given(data=RECIPE_INPUTS, override=st.one_of(st.none(), st.tuples(KEYS, st.text(max_size=20))))
def test_validate_never_crashes(workdir, data, override):
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    args = ["validate", str(path)] + (["--set", f"{override[0]}={override[1]}"] if override else [])
    _ok(CliRunner().invoke(cli, args), "error: ")


@SETTINGS
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(RECIPES).map(lambda p: p.read_text()).flatmap(
                          lambda t: st.integers(0, len(t)).map(lambda n: t[:n]))))
def test_validate_never_crashes_on_text(workdir, text):
    path = workdir / "recipe-text.yaml"
    path.write_text(text, encoding="utf-8")
    _ok(CliRunner().invoke(cli, ["validate", str(path)]), "error: ")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama) -> list[tuple[Path, dict]]:
    """Two real artifacts (pruned; quantized, so that the manifest has quantization entries): (folder, manifest)."""
    root = tmp_path_factory.mktemp("prop-artifacts")
    found = []
    for name, passes in (("pruned", [{"pass": "flap", "target": 0.3}]),
                         ("quantized", [{"pass": "rtn", "bits": 4, "group_size": 32}])):
        recipe = {"name": name, "model": str(tiny_llama), "calibration": {"windows": 4, "seq_len": 32},
                  "evaluate": {"enabled": False, "extra": []}, "passes": passes}
        res = CliRunner().invoke(cli, ["run", "-r", str(_write(root / f"{name}.yaml", recipe)),
                                       "--out", str(root / name)])
        assert res.exit_code == 0, res.output
        found.append((root / name, json.loads((root / name / "manifest.json").read_bytes())))
    return found


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@SETTINGS
@given(which=st.sampled_from([0, 1]), how=st.sampled_from(["mutated", "mutated", "random", "text"]), data=st.data())
def test_verify_and_inspect_never_crash(artifacts, which, how, data):
    folder, manifest = artifacts[which]
    if how == "mutated":
        raw = json.dumps(data.draw(mutated(manifest, mutations=4)))
    elif how == "random":
        raw = json.dumps(data.draw(VALUES))
    else:  # the real text cut short, or with one byte changed
        text = json.dumps(manifest, indent=2)
        cut = data.draw(st.integers(0, len(text)))
        raw = text[:cut] if data.draw(st.booleans()) else text[:cut] + data.draw(st.characters()) + text[cut + 1:]
    (folder / "manifest.json").write_text(raw, encoding="utf-8", errors="surrogatepass")
    try:
        for command, refusal in ((["verify"], "problem(s)\n  - "), (["verify", "--json"], '"ok": false'),
                                 (["inspect"], "error: "), (["inspect", "--json"], "error: ")):
            _ok(CliRunner().invoke(cli, [*command, str(folder)]), refusal)
    finally:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # as the writer writes it


def test_the_generators_reach_both_outcomes(artifacts, workdir):
    """The property is not vacuous: an unmutated manifest verifies (exit 0), a mutated one is refused (exit 2)."""
    folder, manifest = artifacts[1]
    assert CliRunner().invoke(cli, ["verify", str(folder)]).exit_code == 0
    broken = {**manifest, "files": {**manifest["files"], "config.json": "abc"}}
    (folder / "manifest.json").write_text(json.dumps(broken))
    try:
        res = CliRunner().invoke(cli, ["inspect", str(folder)])
        assert res.exit_code == 2 and "files.config.json" in res.output
    finally:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # as the writer writes it
    assert CliRunner().invoke(cli, ["validate", str(RECIPES[0])]).exit_code == 0
