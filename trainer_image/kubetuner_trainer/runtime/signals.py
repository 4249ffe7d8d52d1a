"""Graceful stop: SIGTERM/SIGINT ask the loop to checkpoint and exit; a second signal exits at once.

The first signal only sets a flag (:meth:`StopSignal.requested`); the training loop polls it
after every step, writes a checkpoint and leaves with ``ExitCode.INTERRUPTED`` (75). A second
signal means "do not wait": the process exits immediately with ``128 + signal number``
(143 for SIGTERM, 130 for SIGINT), which the operator treats as a crash. The latest
complete checkpoint written before stays usable for ``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


def _hard_exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


class StopSignal:
    """Records stop requests from signals (or from code) and, optionally, installs the handlers."""

    def __init__(
        self,
        *,
        grace_seconds: float | None = None,
        exit_now: Callable[[int], Any] = _hard_exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_seconds = grace_seconds
        self.exit_now = exit_now
        self._clock = clock
        self._event = threading.Event()
        self._signals_seen = 0
        self._requested_at: float | None = None
        self.reason = ""
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self._event.is_set()

    def seconds_left(self) -> float | None:
        """Time left of the grace budget since the stop was requested (``None``: no stop or no budget)."""
        if self._requested_at is None or self.grace_seconds is None:
            return None
        return max(0.0, self.grace_seconds - (self._clock() - self._requested_at))

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def request(self, reason: str) -> None:
        """Ask the loop to stop (what a signal does; also usable from code)."""
        if not self._event.is_set():
            self._requested_at = self._clock()
            self.reason = reason
            self._event.set()

    def handle(self, signum: int, _frame: FrameType | None = None) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            budget = f" within {self.grace_seconds:g}s" if self.grace_seconds is not None else ""
            log.warning("%s received: finishing the current step, then checkpointing%s and exiting "
                        "(send it again to exit at once)", name, budget)
            self.request(f"{name} received")
        else:
            log.error("second %s received: exiting immediately without a checkpoint", name)
            self.exit_now(128 + signum)

    def install(self) -> bool:
        """Install the handlers; only possible from the main thread (returns False otherwise)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGINT handlers not installed")
            return False
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self.handle)
        return True

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
