"""Ctrl-C and SIGTERM (or a dead launcher) during training: finish the step, save, stop
(resumable)."""

from __future__ import annotations

import signal
import threading
from typing import Any

# Set by a Ctrl-C during start-up (catch_early_interrupts): some library imports swallow the
# KeyboardInterrupt (a bare `except:`), and the request must not be lost with it.
_interrupted_early = threading.Event()


def catch_early_interrupts() -> None:
    """From now until the loop takes over the signals: Ctrl-C raises KeyboardInterrupt as
    usual, and is remembered, so that if something swallows it the loop stops (and saves) at
    its first step instead of training on."""

    def handle(signum: int, frame: Any) -> None:
        _interrupted_early.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handle)


def interrupted_early() -> bool:
    """Whether a Ctrl-C came during start-up (catch_early_interrupts), even one swallowed."""
    return _interrupted_early.is_set()


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that stopped training at once rather than at a step boundary: the second one
    (see StopRequested), or one after the loop gave the signals back. Its message says at which
    step, and which checkpoint a resume continues from."""


# What a process of `truthgpt train --nproc` gets when its launcher dies (the kernel sends it,
# launcher.stop_with_launcher). The kernel sends it again for each of the launcher's threads
# as they go, so unlike a second Ctrl-C, a repeat never means "stop at once".
LAUNCHER_GONE = signal.SIGHUP


class StopRequested:
    """SIGINT/SIGTERM (and LAUNCHER_GONE) set a flag; the loop saves a checkpoint at the next
    step boundary.

    A second SIGINT or SIGTERM falls through to the default behaviour (immediate stop), so a
    stuck run can still be killed.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        self.requested = _interrupted_early.is_set()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, LAUNCHER_GONE):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if signum != LAUNCHER_GONE:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
