"""Bad-input cases for recipe schema bounds; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing written).

Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model, artifact.
Every numeric field is bounded (finite, generous), strings and lists have a length, the file a size, and patterns
compile, are short and are matched under a time limit."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from compress.recipe import MAX_RECIPE_BYTES

_GOOD = {"name": "t", "calibration": {"windows": 8, "seq_len": 64},
         "evaluate": {"seq_len": 64, "max_windows": 2, "extra": []},
         "passes": [{"pass": "flap", "target": 0.3}]}
_RTN = [{"pass": "rtn", "bits": 4, "group_size": 32}]
_TYR = [{"pass": "tyr", "target": 0.3}]


def _write(f: dict, case: str, data: dict | str | bytes) -> Path:
    """A recipe file under the shared root, named after the case."""
    p = f["root"] / f"recipe-{case}.yaml"
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _recipe(f: dict, case: str, **changes) -> Path:
    """The good recipe on the tiny model with `a__b__0__c=value` changes (double underscores walk the path)."""
    d = json.loads(json.dumps({**_GOOD, "model": str(f["model"])}))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = d
        for part in path:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(last) if last.isdigit() else last] = value
    return _write(f, case, d)


def _validate(case: str, expected: str, **changes):
    return (f"recipe-{case}", lambda f: ["validate", _recipe(f, case, **changes)], expected)


def _run(case: str, expected: str, **changes):
    return (f"recipe-{case}", lambda f: ["run", "-r", _recipe(f, case, **changes)], expected)


_LE = "Input should be less than or equal to"
_FINITE = "Input should be a finite number"
_BACKTRACKS = r"^([\w.]+\.?)*\d$"  # with Python's re: minutes on one module name; with regex: microseconds

CASES = [
    # numbers beyond what the code can take: torch seeds, shard sizes, window counts, search sizes
    _validate("seed-2-70", f"seed: {_LE} 9223372036854775807", seed=2**70),
    _validate("seed-negative", "seed: Input should be greater than or equal to 0", seed=-1),
    # the device: a form the policy does not know, and a GPU index past the last one (or no GPU: CPU-only torch)
    _validate("device-unknown", "device: String should match pattern", device="gpu"),
    _validate("device-tpu-index", "device: String should match pattern", device="cuda:x"),
    _run("device-missing-gpu", "device: 'cuda:99' asked for, but", device="cuda:99"),
    _run("seed-2-64", f"seed: {_LE} 9223372036854775807", seed=2**64),
    _validate("shard-inf", f"export.shard_size_mb: {_FINITE}", export={"shard_size_mb": float("inf")}),
    _validate("shard-nan", f"export.shard_size_mb: {_FINITE}", export={"shard_size_mb": float("nan")}),
    _run("shard-inf-run", f"export.shard_size_mb: {_FINITE}", export={"shard_size_mb": float("inf")}),
    _validate("shard-1e12", f"export.shard_size_mb: {_LE} 1048576", export={"shard_size_mb": 1e12}),
    _validate("windows-1e9", f"calibration.windows: {_LE} 65536", calibration__windows=10**9),
    _validate("seq-len-1e9", f"calibration.seq_len: {_LE} 1048576", calibration__seq_len=10**9),
    _validate("batch-1e9", f"calibration.batch_size: {_LE} 65536", calibration__batch_size=10**9),
    _validate("eval-windows-1e9", f"evaluate.max_windows: {_LE} 65536", evaluate__max_windows=10**9),
    _validate("eval-seq-len-1e9", f"evaluate.seq_len: {_LE} 1048576", evaluate__seq_len=10**9),
    _validate("levels-1e6", f"passes.0.levels: {_LE} 64", passes=[{**_TYR[0], "levels": 10**6}]),
    _validate("generations-1e9", f"passes.0.evolution.generations: {_LE} 100000",
              passes=[{**_TYR[0], "evolution": {"generations": 10**9}}]),
    _validate("stage-windows-1e6", f"passes.0.evolution.stage_windows.1: {_LE} 65536",
              passes=[{**_TYR[0], "evolution": {"stage_windows": [2, 10**6]}}]),
    _validate("temperature-inf", f"passes.0.temperature: {_FINITE}",
              passes=[{"pass": "cfsp", "target": 0.3, "temperature": float("inf")}]),
    _validate("target-nan", f"passes.0.target: {_FINITE}", passes=[{"pass": "flap", "target": float("nan")}]),
    _validate("group-size-2-40", f"passes.0.group_size: {_LE} 65536", passes=[{**_RTN[0], "group_size": 2**40}]),
    _validate("average-inf", f"passes.0.bits.average: {_FINITE}", passes=[{**_RTN[0], "bits": {"average": float("inf")}}]),
    # strings, lists and the file itself have a size
    _validate("name-200", "name: String should have at most 100 characters", name="a" * 200),
    _validate("model-5000", "model: String should have at most 4096 characters", model="m" * 5000),
    _validate("extra-300", "evaluate.extra: List should have at most 256 items", evaluate__extra=["licenses"] * 300),
    ("recipe-file-2mb", lambda f: ["validate", _write(f, "file-2mb", "name: t\n#" + "x" * 2 * MAX_RECIPE_BYTES)],
     f"recipe-file-2mb.yaml: {2 * MAX_RECIPE_BYTES + 9} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes"),
    ("recipe-deep-nesting", lambda f: ["validate", _write(f, "deep", "name: t\npasses: " + "[" * 3000 + "]" * 3000)],
     "recipe-deep.yaml: nested too deeply"),
    ("recipe-int-5000-digits", lambda f: ["validate", _write(f, "digits", "name: t\nseed: 1" + "0" * 5000)],
     "recipe-digits.yaml: Exceeds the limit (4300 digits)"),
    ("recipe-list-as-key", lambda f: ["validate", _write(f, "list-key", "name: t\n? [a, b]\n: c\n")],
     "recipe-list-key.yaml: a list used as a key at line 2"),
    ("recipe-set-not-yaml", lambda f: ["validate", _recipe(f, "set-yaml"), "--set", "name=["],
     "--set name: '[' is not a YAML value"),
    # patterns: compiled at validation, bounded in length, matched under a time limit
    _validate("pattern-300", "passes.0.targets.0: a pattern of 300 characters; at most 256",
              passes=[{**_RTN[0], "targets": ["a" * 300]}]),
    _validate("ignore-invalid", "passes.0.ignore.0: '(' is not a valid regex", passes=[{**_RTN[0], "ignore": ["("]}]),
    _validate("override-invalid", "passes.0.overrides.0.pattern: '[' is not a valid regex",
              passes=[{**_RTN[0], "overrides": [{"pattern": "[", "bits": 8}]}]),
    _validate("pattern-repeats", "passes.0.overrides.0.pattern: '(?:a{65535}){65535}': its counted repeats multiply to "
              "4294836225; at most 1024", passes=[{**_RTN[0], "overrides": [{"pattern": "(?:a{65535}){65535}"}]}]),
    _run("targets-backtrack", f"passes.0.targets [{_BACKTRACKS!r}] (ignore []) matched no module",
         passes=[{**_RTN[0], "targets": [_BACKTRACKS]}]),
]
