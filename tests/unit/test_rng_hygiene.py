"""Notebook hygiene: a run leaves the caller's random streams (torch, Python's random, numpy) where they were."""

import random

import numpy as np
import pytest
import torch

from compress import api

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]
PASSES = {"flap": [{"pass": "flap", "target": 0.3, "structure": "adaptive"}],
          "gptq": [{"pass": "gptq", "bits": 4, "group_size": 32}],
          "random-mixed": [{"pass": "gptq", "group_size": 32,
                            "bits": {"average": 3.5, "choices": [3, 4], "importance": "random"}}]}


def _draws() -> tuple:
    """The next values of every global stream a caller might use."""
    return torch.rand(3), random.random(), np.random.rand()


def _seed(value: int) -> None:
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


@pytest.mark.parametrize("name", sorted(PASSES))
def test_run_leaves_the_callers_random_streams_alone(tiny_llama, tmp_path, name):
    _seed(123)
    expected = _draws()
    _seed(123)
    api.run({"name": name, "model": str(tiny_llama), "passes": PASSES[name], "seed": 7}, out=tmp_path / "art",
            overrides=SMALL, log=lambda *_: None)
    got = _draws()
    assert torch.equal(got[0], expected[0]), "torch's global generator moved during api.run"
    assert got[1:] == expected[1:], "Python's or numpy's global generator moved during api.run"


GLOBAL_TORCH = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
                "multinomial", "poisson", "dropout", "manual_seed", "seed", "set_rng_state"}
GLOBAL_INPLACE = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
                  "log_normal_"}
LOCAL_ONLY = {"random": {"Random"}, "np.random": {"default_rng", "Generator"}, "numpy.random": {"default_rng", "Generator"}}


def global_rng_calls(source: str) -> list[str]:
    """Calls in `source` that draw from or reseed a global generator: torch's functions and in-place fills without
    `generator=`, the `random` module's functions, numpy's legacy global functions, dropout layers; except inside a
    `with torch.random.fork_rng(...)` block, which restores torch's streams when it ends (what transformers' sampling,
    which takes no generator, needs)."""
    import ast

    tree = ast.parse(source)
    forked = [(w.lineno, w.end_lineno or w.lineno) for w in ast.walk(tree) if isinstance(w, ast.With)
              and any(isinstance(i.context_expr, ast.Call) and ast.unparse(i.context_expr.func).endswith("fork_rng")
                      for i in w.items)]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if any(a < node.lineno <= b for a, b in forked):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        has_generator = any(k.arg == "generator" for k in node.keywords)
        if owner in ("torch", "torch.random", "F", "torch.nn.functional") and name in GLOBAL_TORCH and not has_generator:
            found.append(f"line {node.lineno}: {owner}.{name}")
        elif name in GLOBAL_INPLACE and not has_generator:
            found.append(f"line {node.lineno}: .{name}")
        elif owner in LOCAL_ONLY and name not in LOCAL_ONLY[owner]:
            found.append(f"line {node.lineno}: {owner}.{name}")
        elif name == "Dropout":
            found.append(f"line {node.lineno}: {owner}.Dropout")
    return found


def test_the_checker_finds_global_draws():
    bad = ("torch.manual_seed(0)\nx = torch.randn(3)\nw.normal_(0, 1)\nrandom.shuffle(v)\nnp.random.rand()\n"
           "nn.Dropout(0.1)\n")
    good = ("g = torch.Generator().manual_seed(0)\nx = torch.randn(3, generator=g)\nw.normal_(0, 1, generator=g)\n"
            "rng = random.Random(0)\nrng.shuffle(v)\nnp.random.default_rng(0).random()\n"
            "with torch.random.fork_rng(devices=[]):\n    torch.manual_seed(0)\n    y = torch.rand(2)\n")
    assert global_rng_calls(bad) == ["line 1: torch.manual_seed", "line 2: torch.randn", "line 3: .normal_",
                                     "line 4: random.shuffle", "line 5: np.random.rand", "line 6: nn.Dropout"]
    assert global_rng_calls(good) == []


def test_no_library_code_draws_from_a_global_generator():
    """Every pass, search, sampler and exporter uses a generator of its own (seeded from the recipe), so a run is
    reproducible without touching the caller's streams; this covers the passes the runs above do not exercise."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted(p for d in ("compress", "calibration", "export") for p in (root / d).rglob("*.py"))
    assert len(files) > 20
    offenders = {str(p.relative_to(root)): calls for p in files if (calls := global_rng_calls(p.read_text()))}
    assert offenders == {}
