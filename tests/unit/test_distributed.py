"""Several processes (issue 16 item 3): `torchrun --nproc-per-node 2 compress run` on a GPTQ 4-bit recipe writes
weight files byte-identical to one process, rank 0 alone writes (the report says 2 processes); a rank that dies
mid-run stops the others with a message and exit 1, no artifact, and `--resume` then writes the same bytes.

Every run is a subprocess at one thread (as one rank of the benchmark computes), on a tiny model whose calibration
(9 windows in batches of 2: 5 batches, the last one short) is shared unevenly between the ranks. Run as a module
(`python -m tests.unit.test_distributed ARGS`) this file is `compress` with a hook for the kill test."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DIE_ENV = "TEST_DISTRIBUTED_DIE"  # "RANK:BLOCK": that rank exits (code 3, as a crash) when the engine reaches BLOCK
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(root / "model", "llama", hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                            head_dim=16, intermediate_size=256, num_hidden_layers=4)
    recipe = root / "w4.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "w4", "model": str(model), "seed": 0,
        "calibration": {"windows": 9, "seq_len": 32, "batch_size": 2},
        "passes": [{"pass": "gptq", "bits": 4, "group_size": 32, "sym": True, "act_order": True,
                    "static_groups": True, "damp": 0.1, "scale_search": "mse"}],
        "evaluate": {"seq_len": 32, "max_windows": 2, "extra": []}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
           "COMPRESS_RUNS": str(root / "runs")}
    one = _compress(["run", "--recipe", str(recipe), "--out", str(root / "one")], env, root)
    assert one.returncode == 0, one.stderr[-3000:]
    return root, recipe, env


def _compress(args: list[str], env: dict, cwd: Path, procs: int = 1, entry: str = "compress.cli"
              ) -> subprocess.CompletedProcess:
    """`compress ARGS` in one process, or under torchrun (`python -m torch.distributed.run`) in `procs`."""
    launch = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    return subprocess.run([sys.executable, *launch, "-m", entry, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def _weights_sha(artifact: Path) -> dict[str, str]:
    files = sorted(artifact.glob("*.safetensors"))
    assert files, f"no weight files in {artifact}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_processes_write_the_bytes_of_one(setup):
    root, recipe, env = setup
    two = _compress(["run", "--recipe", str(recipe), "--out", str(root / "two")], env, root, procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _weights_sha(root / "two") == _weights_sha(root / "one")
    report = json.loads((root / "two" / "report.json").read_text())
    assert report["world_size"] == 2
    assert "world_size" not in json.loads((root / "one" / "report.json").read_text())  # one process: as before
    assert two.stdout.count("artifact: ") == 1  # rank 0 alone prints the result
    assert [p.name for p in root.iterdir() if p.name.startswith(".two")] == []  # and writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_by_hand(args: list[str], env: dict, cwd: Path, procs: int) -> list[subprocess.CompletedProcess]:
    """`procs` ranks started with the environment torchrun gives them but without its agent (which stops the other
    ranks itself when one fails), so that what a surviving rank does on its own shows."""
    group = {"WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.unit.test_distributed", *args], cwd=cwd,
                              env={**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(procs)]
    done = []
    for rank in ranks:
        out, err = rank.communicate(timeout=TIMEOUT_S)
        done.append(subprocess.CompletedProcess(rank.args, rank.returncode, out, err))
    return done


def test_a_dead_rank_stops_the_run_and_resume_writes_the_same_bytes(setup):
    root, recipe, env = setup
    out = root / "killed"
    args = ["run", "--recipe", str(recipe), "--out", str(out)]
    # without torchrun's agent: rank 0 finds rank 1 gone in the block's gather and stops with exit code 1
    rank0, rank1 = _ranks_by_hand(args, {**env, DIE_ENV: "1:2"}, root, procs=2)
    assert rank1.returncode == 3
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    assert "failed: rank 0 of 2: block 2: model.layers.2." in rank0.stderr, rank0.stderr[-3000:]
    assert "another rank stopped or did not answer" in rank0.stderr
    assert "continue it with --resume" in rank0.stderr
    assert not out.exists()
    # under torchrun: its agent stops rank 0 as soon as rank 1 fails and names rank 1 as the root cause
    died = _compress(args, {**env, DIE_ENV: "1:2"}, root, procs=2, entry="tests.unit.test_distributed")
    assert died.returncode == 1
    root_cause = died.stderr[died.stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 3" in root_cause, died.stderr[-3000:]
    assert not out.exists()
    resumed = _compress([*args, "--resume"], env, root, procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _weights_sha(out) == _weights_sha(root / "one")


def test_resume_without_an_interrupted_run_is_refused_on_every_rank(setup):
    root, recipe, env = setup
    res = _compress(["run", "--recipe", str(recipe), "--out", str(root / "never"), "--resume"], env, root, procs=2)
    assert res.returncode != 0
    # rank 0 checks the journal; the error reaches rank 1 too, so both say it and none waits for the other
    assert res.stderr.count("error: --resume: no unfinished run of") == 2, res.stderr[-3000:]


def test_evolution_search_in_two_processes_writes_the_bytes_of_one(setup):
    """llama-w3-evo's search, small: variants calibrated data-parallel, candidates scored on both ranks."""
    root, recipe, env = setup
    evo = yaml.safe_load(recipe.read_text())
    evo["name"] = "evo"
    evo["passes"][0]["bits"] = {"average": 3.0, "choices": [2, 3, 4], "allocator": "evolution", "error_windows": 2,
                                "evolution": {"generations": 3, "offspring": 3, "survivors": [2],
                                              "stage_windows": [1, 2]}}
    (path := root / "evo.yaml").write_text(yaml.safe_dump(evo))
    reports = {}
    for procs in (1, 2):  # each with its own run state, so neither reuses the other's variants or search state
        out = root / f"evo{procs}"
        res = _compress(["run", "--recipe", str(path), "--out", str(out)],
                        {**env, "COMPRESS_RUNS": str(root / f"runs-evo{procs}")}, root, procs=procs)
        assert res.returncode == 0, res.stderr[-3000:]
        reports[procs] = json.loads((out / "report.json").read_text())["passes"][0]["summary"]
    assert _weights_sha(root / "evo2") == _weights_sha(root / "evo1")
    assert reports[2]["variants_reused"] is False
    one, two = reports[1]["evolution"], reports[2]["evolution"]
    assert two["kl_by_generation"] == one["kl_by_generation"] and len(one["kl_by_generation"]) == 4
    assert two["evaluations"] == one["evaluations"] and reports[2]["unit_bits"] == reports[1]["unit_bits"]


def _die_at_block() -> None:
    """The kill test's hook: rank RANK leaves with exit code 3 when the block engine reaches block BLOCK."""
    import calibration.capture as capture

    die_rank, die_block = (int(v) for v in os.environ[DIE_ENV].split(":"))
    visit_block = capture._visit_block

    def dying(i, *args, **kwargs):
        if i == die_block and int(os.environ.get("RANK", "0")) == die_rank:
            os._exit(3)
        return visit_block(i, *args, **kwargs)

    capture._visit_block = dying


if __name__ == "__main__":
    if DIE_ENV in os.environ:
        _die_at_block()
    from compress.cli import main

    main()
