"""Bounded queueing of RPCs: a thread pool that refuses a call at once (RESOURCE_EXHAUSTED) when too many
already wait for a thread, and keeps health checks off that queue.

gRPC's sync server puts every call on its executor's queue before any of our code runs, unbounded; this
pool counts what waits there (increment on submit, decrement when a thread takes it, so a call cancelled
before it ran is counted out too) and sends a call over the bound to a small pool of its own, where the
handler, seeing it was refused, answers RESOURCE_EXHAUSTED without doing its work. Nothing here answers
lookups.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc

# Threads answering refused calls: each waits for its call's request message, then refuses it at once.
REFUSING_THREADS = 4

_refusing = threading.local()


class AdmissionPool(futures.ThreadPoolExecutor):
    """The RPC threads of the hps services: at most `max_waiting` calls wait for one of `workers` threads;
    one more is refused at once. Give it to a handler with `bounded` (gRPC's per-method thread pool)."""

    def __init__(self, workers: int, max_waiting: int, on_refused: Callable[[], None] = lambda: None) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="hps-rpc")
        self.workers = workers
        self.max_waiting = max_waiting
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._waiting = 0
        self._refusals = futures.ThreadPoolExecutor(REFUSING_THREADS, thread_name_prefix="hps-refuse")

    def waiting(self) -> int:
        """Calls waiting for a thread now."""
        return self._waiting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._lock:
            full = self._waiting >= self.max_waiting
            if not full:
                self._waiting += 1
        if full:
            self._on_refused()
            return self._refusals.submit(_refused, fn, args, kwargs)
        try:
            return super().submit(self._taken, fn, args, kwargs)
        except BaseException:
            self._taken_off()
            raise

    def _taken(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._taken_off()
        return fn(*args, **kwargs)

    def _taken_off(self) -> None:
        with self._lock:
            self._waiting -= 1

    def refusal(self) -> str:
        return (
            f"server busy: {self.max_waiting} calls already waiting for one of {self.workers} threads "
            f"(server.max_queued_requests {self.max_waiting}); retry later"
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures)
        self._refusals.shutdown(wait, cancel_futures=cancel_futures)


def _refused(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs gRPC's call function marked as refused: the handler `bounded` made answers RESOURCE_EXHAUSTED."""
    _refusing.active = True
    try:
        return fn(*args, **kwargs)
    finally:
        _refusing.active = False


def bounded(pool: AdmissionPool, behavior: Callable[..., Any], streaming: bool = False) -> Callable[..., Any]:
    """`behavior` run on `pool`'s threads, answering RESOURCE_EXHAUSTED instead when the pool refused it."""

    def refuse(context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, pool.refusal())
        raise AssertionError("unreachable: context.abort raises")

    handler: Callable[..., Any]
    if streaming:

        @functools.wraps(behavior)
        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            if getattr(_refusing, "active", False):
                refuse(context)
            yield from behavior(requests, context)

        handler = stream
    else:

        @functools.wraps(behavior)
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if getattr(_refusing, "active", False):
                refuse(context)
            return behavior(request, context)

        handler = unary
    handler.experimental_thread_pool = pool  # type: ignore[union-attr]  # read by grpc's sync server
    return handler
