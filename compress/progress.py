"""Progress bars that never go quiet: tqdm (tqdm.auto, so notebooks get their widget) whose line is redrawn every
few seconds while it is open, so a step that takes longer than that (a training step on a loaded machine, a block's
statistics) still shows its elapsed time moving instead of a frozen screen (issue 13: no silence over 10 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm as _tqdm

HEARTBEAT_S = 4.0  # seconds between redraws of an open bar with no update of its own


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.auto.tqdm, named as it is)
    """tqdm.auto.tqdm plus a daemon thread that redraws the bar every `heartbeat` seconds until it is closed
    (refresh() takes tqdm's own lock, so it never interleaves with an update); disabled bars start no thread."""

    def __init__(self, *args, heartbeat: float = HEARTBEAT_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stopped = threading.Event()
        self._beat: threading.Thread | None = None
        if not self.disable and heartbeat > 0:
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat,), daemon=True,
                                          name="progress-heartbeat")
            self._beat.start()

    def _heartbeat(self, every: float) -> None:
        while not self._stopped.wait(every):
            if self.disable:  # closed meanwhile
                return
            self.refresh()

    def close(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
            if self._beat is not None and self._beat is not threading.current_thread():
                self._beat.join()
        super().close()


STATUS_S = 8.0  # seconds between status lines of a phase that shows no bar
_active: list[str] = []  # the phases running now, innermost last
_active_lock = threading.Lock()


@contextmanager
def status_lines(name: str, log, every: float = STATUS_S) -> Iterator[None]:
    """While the block runs, log "`name`: N s" every `every` seconds, but only when no progress bar is open (open
    bars redraw themselves) and only for the innermost such block (phases nest: the reload check runs inside the
    write); so a phase with no bar of its own (reading a checkpoint's headers, writing shards) still speaks."""
    start, stopped = time.perf_counter(), threading.Event()

    def speak() -> None:
        while not stopped.wait(every):
            with _active_lock:
                innermost = bool(_active) and _active[-1] == name
            if innermost and not _tqdm._instances:  # tqdm's set of open (not disabled) bars
                log(f"{name}: {time.perf_counter() - start:.0f} s")

    with _active_lock:
        _active.append(name)
    thread = threading.Thread(target=speak, daemon=True, name="progress-status")
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
        with _active_lock:
            _active.remove(name)
