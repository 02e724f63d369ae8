"""SIGTERM, SIGINT and SIGHUP over the whole life of `hps serve`, its start included.

Until the process serves, a stop signal raises StartInterrupted in the main thread, so the start unwinds
through its cleanups (levels closed, shared memory unlinked, workers not started) instead of dying at
once, and a SIGHUP is held until the process serves. Once serving, the server's own handlers take over;
once stopped, later stop signals are ignored.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartInterrupted(BaseException):
    """A stop signal came while the process was starting; what the start opened has been closed. A
    BaseException, as KeyboardInterrupt is: the start's `except Exception` handlers let it through."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"received {self.signal_name} while starting; stopped before serving")


class StartSignals:
    """The handlers while starting (installed by the constructor); `hangup_pending` tells whether a SIGHUP
    came meanwhile, for the serving code to act on once it has installed its own handlers."""

    def __init__(self) -> None:
        self.hangup_pending = False
        self._stopping = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGHUP, self._hangup)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            return  # the start is unwinding already: a second raise would cut its cleanup short
        self._stopping = True
        raise StartInterrupted(signum)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        self.hangup_pending = True


def ignore_stop_signals() -> None:
    """For the rest of a process that has stopped: later stop signals are ignored, where Python's exit would
    restore their default action and a late one would kill it on its way out (exit code -15, not 0)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
