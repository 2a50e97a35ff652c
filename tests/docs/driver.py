"""Run one page's blocks in order, as written, in the current folder: `python -m tests.docs.driver BLOCKS.json`.

bash blocks run with `bash -e -o pipefail`, one process per block; python blocks share one namespace per page (the
page is one session). Setting up the environment is the one thing not run as written: in a bash block, the parts of
an `&&` chain that make and enter a venv or pip-install (`python3 -m venv ...`, `. .venv/bin/activate`,
`pip install ...`) are the environment this driver already runs in (the test tier's venv, installed from the same
constraints), so they are dropped and said so; the rest of the line runs. Prints `== page:line` before each block
and `FAILED page:line` and exits 1 at the first block that fails."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

SETUP = re.compile(r"^(python3? -m venv\b.*|(\.|source) \S*bin/activate|pip3? install\b.*)$")


def without_setup(script: str) -> tuple[str, list[str]]:
    """The bash script minus its venv / pip-install steps (whole lines or parts of an `&&` chain), and those steps."""
    kept, dropped = [], []
    for line in script.splitlines():
        parts = [p.strip() for p in line.split(" && ")]
        dropped += [p for p in parts if SETUP.match(p)]
        rest = [p for p in parts if not SETUP.match(p)]
        if rest:
            kept.append(" && ".join(rest))
    return "\n".join(kept) + "\n", dropped


def main(blocks_json: str) -> int:
    namespace: dict = {"__name__": "__main__"}
    for block in json.loads(Path(blocks_json).read_text("utf-8")):
        where = f"{block['page']}:{block['line']}"
        print(f"== {where} ({block['lang']})", flush=True)
        if block["lang"] == "bash":
            script, dropped = without_setup(block["text"])
            for step in dropped:
                print(f"   (the environment this test runs in stands for: {step})", flush=True)
            ok = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script]).returncode == 0
        else:
            try:
                exec(compile(block["text"], where, "exec"), namespace)
                ok = True
            except BaseException:  # SystemExit included: a block that exits has failed
                traceback.print_exc()
                ok = False
        sys.stdout.flush()
        if not ok:
            print(f"FAILED {where}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
