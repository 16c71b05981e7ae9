"""SIGTERM/SIGINT -> a flag the training loop polls, so it saves a checkpoint and exits cleanly."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Context manager: while active, the first SIGTERM or SIGINT only sets `.signal_name`.

    A second signal restores the default behaviour and re-raises it, so an impatient
    Ctrl-C-Ctrl-C still stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: nothing to install
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
