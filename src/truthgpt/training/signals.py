"""Ctrl-C and SIGTERM during training: finish the step, save, stop (resumable)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary.

    A second signal falls through to the default behaviour (immediate stop), so a stuck run
    can still be killed.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
