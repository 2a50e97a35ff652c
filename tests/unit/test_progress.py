"""No silent phases: a run says when each phase starts and reports its time; evaluation shows a bar per text; a
one-time download or conversion prints a heartbeat. (How long the longest silence of the default run is, is measured
by benchmarks/progress_gaps.py, not asserted here.)"""

from __future__ import annotations

import io
import threading
import time

import torch

from compress import api
from compress import evaluate as ev
from compress.models.default import heartbeat
from compress.progress import tqdm

SMALL = ["calibration.windows=8", "calibration.seq_len=64", "evaluate.seq_len=64", "evaluate.max_windows=4"]
PHASES = ["checking the output folder and the model files", "loading the model",
          "reading the calibration and evaluation texts", "hashing the model files", "evaluating the dense model",
          "passes.0 flap", "passes.1 rtn", "evaluating the compressed model", "writing the artifact",
          "reloading the artifact and comparing logits"]


def test_run_announces_and_times_every_phase(tiny_llama, tmp_path):
    lines: list[str] = []
    recipe = {"name": "tiny", "model": str(tiny_llama),
              "passes": [{"pass": "flap", "target": 0.2, "round_to": 32}, {"pass": "rtn", "bits": 4, "group_size": 32}]}
    res = api.run(recipe, out=tmp_path / "art", overrides=SMALL, log=lines.append)
    started = [line.removesuffix(" ...") for line in lines if line.endswith(" ...")]
    assert started == PHASES
    # the reload check runs inside the write, so its start line comes after the write's
    phases = res.report["phases"]
    assert list(phases) == PHASES
    assert all(isinstance(s, float) and s >= 0 for s in phases.values())
    top = sum(s for name, s in phases.items() if name != "reloading the artifact and comparing logits")
    assert top <= res.report["seconds"] + 0.5  # the write is still running when the report is made
    assert phases["reloading the artifact and comparing logits"] <= phases["writing the artifact"]
    text = str(res)
    assert "phase" in text and "passes.0 flap" in text and "writing the artifact" in text


def test_perplexity_bar_names_the_text_and_changes_nothing(tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))
    quiet = ev.perplexity(model, windows, 2)
    assert "window" not in capsys.readouterr().err
    shown = ev.perplexity(model, windows, 2, desc="dense: pydoc-heldout")
    err = capsys.readouterr().err
    assert "dense: pydoc-heldout" in err and "/5 " in err  # a bar over the 5 windows
    assert shown == quiet


def test_heartbeat_beats_while_running_and_stops_after(capsys):
    with heartbeat("fetching a wheel", every=0.05):
        time.sleep(0.32)
    beats = capsys.readouterr().err.splitlines()
    assert 3 <= len(beats) <= 7
    assert all(b.startswith("[compress] still fetching a wheel (") and b.endswith(" s)") for b in beats)
    time.sleep(0.15)
    assert capsys.readouterr().err == ""  # stopped with the block


def _heartbeats() -> int:
    return sum(t.name == "progress-heartbeat" for t in threading.enumerate())


def test_an_open_bar_redraws_without_updates_and_stops_when_closed():
    out = io.StringIO()
    before = _heartbeats()
    with tqdm(total=2, desc="step", file=out, heartbeat=0.05, mininterval=0, disable=False) as bar:
        time.sleep(0.5)  # one "step" ten heartbeats long, no update
        drawn_while_silent = out.getvalue().count("\r")
        bar.update(1)
    assert drawn_while_silent >= 4  # the start, then a redraw every 0.05 s (at least a few, on a loaded machine)
    assert _heartbeats() == before  # the thread ended with the bar
    quiet = out.getvalue()
    time.sleep(0.2)
    assert out.getvalue() == quiet  # nothing written after close


def test_a_disabled_bar_starts_no_thread():
    before = _heartbeats()
    bar = tqdm(range(3), disable=True, heartbeat=0.01)
    assert _heartbeats() == before and list(bar) == [0, 1, 2]


def test_a_phase_without_a_bar_speaks_every_few_seconds_and_only_the_innermost():
    from compress.progress import status_lines

    lines: list[str] = []
    with status_lines("writing", lines.append, every=0.05):
        with status_lines("reloading", lines.append, every=0.05):
            time.sleep(0.4)
        inner = list(lines)
        with tqdm(total=1, disable=False, file=io.StringIO(), heartbeat=0):  # an open bar speaks for itself
            time.sleep(0.3)
        during_bar = lines[len(inner):]
    assert len(inner) >= 3 and all(line.startswith("reloading: ") and line.endswith(" s") for line in inner)
    assert during_bar == []
    assert lines[-1].startswith("writing: ") or lines == inner  # the outer one may speak once the bar is closed
    quiet = len(lines)
    time.sleep(0.2)
    assert len(lines) == quiet  # nothing after the block
