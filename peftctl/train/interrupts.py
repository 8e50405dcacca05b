"""Ctrl-C (SIGINT) and SIGTERM as requests to stop a training run at the next step boundary,
where it can be checkpointed, instead of wherever the signal happens to land."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequests:
    """SIGINT / SIGTERM ask the loop to stop after the current step; the same signal again aborts.

    Only a repeat of the same signal aborts: `accelerate launch` (torchrun) answers a Ctrl-C,
    which every process of the terminal's group also gets, by sending its workers SIGTERM, and
    that must not cut their checkpoint short. The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum in self._received:
            raise KeyboardInterrupt
        self.requested = True
        self._received.add(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
