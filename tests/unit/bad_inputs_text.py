"""Bad-input cases for calibration and evaluation text; run by test_cli_bad_inputs.py (exit 2, message names the thing, nothing written).

Each case: (id, build(folders) -> CLI args, text the message must contain). `folders` has root, model, artifact."""

CASES: list = []
