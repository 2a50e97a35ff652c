"""What a notebook user sees: recipes and verify results as tables (as the other results), and no tqdm warning on
importing the API in a notebook without ipywidgets."""

import subprocess
import sys
from pathlib import Path

import pytest

from compress import api

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_shows_as_tables_of_inputs_and_passes():
    recipe = api.validate({"name": "nb", "calibration": {"windows": 16, "seq_len": 128},
                           "passes": [{"pass": "flap", "target": 0.3, "structure": "uniform"},
                                      {"pass": "gptq", "bits": {"average": 3.0, "allocator": "knapsack"},
                                       "targets": ["q_proj|k_proj"]}]})
    html = recipe._repr_html_()
    assert html.startswith("<table><caption>recipe nb</caption>")
    assert ("<tr><td>smollm2-135m</td><td>pydoc: 16 x 128 tokens</td><td>pydoc held out, licenses</td><td>0</td></tr>"
            in html)
    assert "<tr><td>passes.0</td><td>flap</td><td>prune</td><td>target: 0.3, structure: uniform</td></tr>" in html
    assert ("<tr><td>passes.1</td><td>gptq</td><td>quantize</td><td>bits: {average: 3.0, allocator: knapsack}, "
            "targets: [q_proj|k_proj]</td></tr>") in html
    off = api.validate({"name": "d", "evaluate": {"enabled": False}, "passes": [{"pass": "rtn"}]})._repr_html_()
    assert "<td>off</td>" in off and "<td>rtn</td><td>quantize</td><td>defaults</td>" in off


def test_verify_result_shows_as_a_table_with_escaped_problems():
    bad = api.VerifyResult(Path("art"), ["model.safetensors: sha256 differs", "tensor <w> missing"])
    assert bad._repr_html_() == (
        "<table><caption>art: 2 problem(s)</caption><thead><tr><th>problem</th></tr></thead><tbody>"
        "<tr><td>model.safetensors: sha256 differs</td></tr><tr><td>tensor &lt;w&gt; missing</td></tr></tbody></table>")
    good = api.VerifyResult(Path("art"), [])._repr_html_()
    assert "<tr><td>art</td><td>True</td><td>every file and tensor</td></tr>" in good


# A notebook kernel as tqdm.autonotebook detects one (ipykernel's shell loaded), without ipywidgets.
NOTEBOOK = """
import sys, types, warnings
class ZMQInteractiveShell: pass
ipython = types.ModuleType("IPython")
ipython.get_ipython = lambda: ZMQInteractiveShell()
sys.modules.update({"IPython": ipython, "ipykernel.zmqshell": types.ModuleType("ipykernel.zmqshell"),
                    "ipywidgets": None})
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import %s
    import transformers
    from tqdm.auto import tqdm
print("|".join(str(w.message)[:40] for w in seen if "IProgress" in str(w.message)))
"""


@pytest.mark.parametrize(("first", "warned"), [("transformers", True), ("compress.api", False)])
def test_importing_the_api_in_a_notebook_without_ipywidgets_does_not_warn(first, warned):
    """transformers alone warns (the check sees the warning); the API imported first does not, and transformers
    imported after it then does not either."""
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK % first], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (proc.stdout.strip() == "IProgress not found. Please update jupyt") is warned, proc.stdout
