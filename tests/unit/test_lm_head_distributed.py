"""The lm_head quantized under torch.distributed: the final norm's X^T X is summed over the ranks' batches in one
process's order, so 2 ranks write the weight bytes of one process (tests/unit/test_distributed.py's setting: 9
windows in batches of 2, shared unevenly)."""

from __future__ import annotations

import json
import os

import yaml

from tests.unit.test_distributed import REPO, _compress, _weights_sha


def test_two_processes_quantize_the_head_as_one(tmp_path):
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", "llama", hidden_size=128, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=16, intermediate_size=256, num_hidden_layers=2)
    recipe = tmp_path / "w4h.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "w4h", "model": str(model), "seed": 0,
        "calibration": {"windows": 9, "seq_len": 32, "batch_size": 2},
        "passes": [{"pass": "gptq", "bits": 4, "group_size": 32, "act_order": True, "damp": 0.1,
                    "lm_head": {"bits": 4, "group_size": 32}}],
        "evaluate": {"seq_len": 32, "max_windows": 2, "extra": []}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO),
           "COMPRESS_RUNS": str(tmp_path / "runs")}
    one = _compress(["run", "--recipe", str(recipe), "--out", str(tmp_path / "one")], env, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _compress(["run", "--recipe", str(recipe), "--out", str(tmp_path / "two")], env, tmp_path, procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _weights_sha(tmp_path / "two") == _weights_sha(tmp_path / "one")
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["passes"][0]["summary"]["lm_head"]["method"] == "gptq"
