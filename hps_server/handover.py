"""Hands a model's requests over from one session to the next: counts the requests using each session, refuses
writes while a model changes, and retires a replaced session once the last request using it is done.

It knows nothing of levels, caches or gRPC: what retiring a session means is the callable it is given.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from hps_server.session import LookupSession


class ModelChangingError(RuntimeError):
    """A write came while its model is being loaded, reloaded or unloaded; it is safe to retry."""


class Handover:
    """A request takes its session at admission (`using`) and keeps it to the end, so every reply comes from
    one session (one table version); `swap` replaces sessions between two admissions, never inside one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[LookupSession, int] = {}
        self._retiring: dict[LookupSession, Callable[[], None]] = {}
        self._changing: set[str] = set()
        self._writes: dict[str, int] = {}
        self._writes_done = threading.Condition(self._lock)

    @contextlib.contextmanager
    def using(self, resolve: Callable[[], LookupSession]) -> Iterator[LookupSession]:
        """The session `resolve()` gives now (it may raise, e.g. KeyError for an unknown model), held until
        the block ends: a swap meanwhile does not retire it under the request."""
        with self._lock:
            session = resolve()
            self._users[session] = self._users.get(session, 0) + 1
        try:
            yield session
        finally:
            self._leave(session)

    @contextlib.contextmanager
    def writing(self, model: str, resolve: Callable[[], LookupSession]) -> Iterator[LookupSession]:
        """As `using`, for an Upsert or Delete: refused with ModelChangingError while `model` changes, and a
        change waits for the writes in flight, so a new session is built from levels that hold them."""
        with self._lock:
            if model in self._changing:
                raise ModelChangingError(f"model {model} is being reloaded; writes are refused until it is done, retry")
            session = resolve()
            self._users[session] = self._users.get(session, 0) + 1
            self._writes[model] = self._writes.get(model, 0) + 1
        try:
            yield session
        finally:
            with self._lock:
                self._writes[model] -= 1
                self._writes_done.notify_all()
            self._leave(session)

    @contextlib.contextmanager
    def changing(self, model: str) -> Iterator[None]:
        """Holds `model` against writes for the block, once the writes in flight are done."""
        with self._lock:
            self._changing.add(model)
            self._writes_done.wait_for(lambda: not self._writes.get(model))
        try:
            yield
        finally:
            with self._lock:
                self._changing.discard(model)

    def swap(self, change: Callable[[], None]) -> None:
        """Runs `change` (which replaces what `resolve` gives) between admissions."""
        with self._lock:
            change()

    def retire(self, session: LookupSession, done: Callable[[], None]) -> None:
        """Calls `done` once no request uses `session` (at once when none does; else in the last one's
        thread, so `done` should only hand work to another thread)."""
        with self._lock:
            if self._users.get(session):
                self._retiring[session] = done
                return
        done()

    def _leave(self, session: LookupSession) -> None:
        with self._lock:
            users = self._users[session] - 1
            if users:
                self._users[session] = users
                return
            del self._users[session]
            done = self._retiring.pop(session, None)
        if done is not None:
            done()
