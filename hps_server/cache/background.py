"""Runs L1 fills off the request path: one worker thread per session, a bounded backlog.

Above hit_rate_threshold the session hands its L1 inserts here so they never delay a reply. A full
backlog drops the work (the rows are fetched again on a later miss); nothing here knows of levels.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundFill:
    """A single worker thread running submitted callables in order; `dropped` counts work refused."""

    def __init__(self, name: str, max_pending: int = 64) -> None:
        self._queue: queue.Queue[object] = queue.Queue(max_pending)
        self._idle = threading.Condition()
        self._pending = 0
        self.dropped = 0
        self.failed = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, work: Callable[[], None]) -> bool:
        """Queues `work`; False (and counted in `dropped`) when the backlog is full."""
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            with self._idle:
                self._pending -= 1
                self.dropped += 1
                self._idle.notify_all()
            return False
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until every queued fill has run; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Runs what is queued, then stops the worker."""
        self._queue.put(_STOP)
        self._worker.join()

    def _run(self) -> None:
        while (work := self._queue.get()) is not _STOP:
            try:
                work()  # type: ignore[operator]
            except Exception:
                # A failed fill only costs hit rate; the reply it belonged to has already gone out.
                self.failed += 1
                log.exception("background L1 fill failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
