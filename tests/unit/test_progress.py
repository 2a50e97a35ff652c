"""Progress bars redraw while a long step runs (issue 13: no silence over 10 s), and stop when closed."""

from __future__ import annotations

import io
import threading
import time

from compress.progress import tqdm


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
