"""Progress bars that never go quiet: tqdm (tqdm.auto, so notebooks get their widget) whose line is redrawn every
few seconds while it is open, so a step that takes longer than that (a training step on a loaded machine, a block's
statistics) still shows its elapsed time moving instead of a frozen screen (issue 13: no silence over 10 s)."""

from __future__ import annotations

import threading

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
