"""Shared fixtures: tiny seeded models of each supported architecture, with a byte-level tokenizer trained in code."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TQDM_DISABLE", "1")
# gptqmodel's default CPU worker pool asks for more workers than a 2-core machine has and refuses to start
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny_any(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session", autouse=True)
def fresh_run_state(tmp_path_factory):
    """Run state (variant databases, search states, run journals) goes to a fresh folder, never the user's, so a
    test never passes on what an earlier session computed; tests that need their own set COMPRESS_RUNS again."""
    before = os.environ.get("COMPRESS_RUNS")
    os.environ["COMPRESS_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    yield
    if before is None:
        os.environ.pop("COMPRESS_RUNS", None)
    else:
        os.environ["COMPRESS_RUNS"] = before


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The integration tier (the packaged default model, minutes) runs last, whatever folders hold the tests, so a
    failure in the fast tiers shows before it starts, and the docs tier (every README and docs/ code block, the main
    job included) after it; the order within each tier is kept (the sort is stable)."""
    items.sort(key=lambda item: (item.get_closest_marker("integration") is not None,
                                 item.get_closest_marker("docs") is not None))
