"""`compress --help` answers without importing torch or transformers (seconds on a loaded machine): compress.cli
imports compress.api only when a command runs."""

from __future__ import annotations

import subprocess
import sys


def test_the_command_line_module_and_its_help_import_neither_torch_nor_transformers():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from compress.cli import cli\n"
            "for args in (['--help'], ['run', '--help'], ['generate', '--help']):\n"
            "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'compress.api') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
