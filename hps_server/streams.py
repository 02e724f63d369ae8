"""Open StreamLookup calls: a cap on how many, and an idle timeout that cancels a quiet one.

In the synchronous gRPC server every open stream holds one of the RPC threads, idle or not; without a
cap, enough open streams leave no thread for Lookups or health checks. Nothing here answers lookups.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import grpc

log = logging.getLogger(__name__)


class StreamsFullError(RuntimeError):
    """As many streams are open as the server allows; the message names the limit."""


class _Open:
    __slots__ = ("context", "last")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.last = time.monotonic()


class StreamGuard:
    """Admits at most `max_streams` open streams; cancels one that has received nothing for
    `idle_seconds`, so its thread returns to the pool (the client sees CANCELLED)."""

    def __init__(self, max_streams: int, idle_seconds: float) -> None:
        self.max_streams = max_streams
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._open: set[_Open] = set()
        self._watchdog: threading.Thread | None = None

    @contextlib.contextmanager
    def opened(self, context: grpc.ServicerContext) -> Iterator[_Open]:
        """Holds a stream's place while it is open; StreamsFullError when none is free."""
        stream = _Open(context)
        with self._lock:
            if len(self._open) >= self.max_streams:
                raise StreamsFullError(
                    f"server busy: {len(self._open)} streams open (server.max_streams {self.max_streams})"
                )
            self._open.add(stream)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="hps-streams", daemon=True)
                self._watchdog.start()
        try:
            yield stream
        finally:
            with self._lock:
                self._open.discard(stream)

    @staticmethod
    def touch(stream: _Open) -> None:
        """A message arrived on the stream: it is not idle."""
        stream.last = time.monotonic()

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def _watch(self) -> None:
        """Runs while some stream is open (opened() starts it again after)."""
        period = max(0.05, min(1.0, self.idle_seconds / 4))
        while True:
            time.sleep(period)
            deadline = time.monotonic() - self.idle_seconds
            with self._lock:
                if not self._open:
                    self._watchdog = None
                    return
                idle = [stream for stream in self._open if stream.last < deadline]
            for stream in idle:
                log.info("cancelling a StreamLookup idle for over %g s (server.stream_idle_seconds)", self.idle_seconds)
                stream.last = time.monotonic()  # cancel once, not on every round
                stream.context.cancel()
