"""Warnings that a request can trigger, logged at most once per interval per subject with a count.

An outage or a flood of bad requests must not flood the log; nothing here decides what to warn about.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedWarning:
    """logger.warning(), at most once per `interval` seconds for each subject; the line says how many
    were silenced since the last one."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._log = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._silenced: dict[str, int] = {}

    def warn(self, message: str, subject: str, *args: object) -> None:
        """Logs `message % (subject, *args)` unless `subject` was logged within the interval."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(subject, -self._interval) < self._interval:
                self._silenced[subject] = self._silenced.get(subject, 0) + 1
                return
            self._last[subject] = now
            silenced = self._silenced.pop(subject, 0)
        self._log.warning(
            message + " (%d more silenced before; repeats silenced for %d s)",
            subject,
            *args,
            silenced,
            self._interval,
        )
