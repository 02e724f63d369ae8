"""Dynamic batching of concurrent calls: requests that arrive together are answered by one pass.

Flat combining instead of a dispatcher thread: the caller that finds no pass running runs one itself,
over every request queued by then (its own included), so a lone request pays no hand-off between
threads; callers arriving meanwhile queue, and the first of them runs the next pass. The queue is
bounded. It knows nothing of lookups: the pass is a callable given the queued items.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue holds; the message names the limit."""


class _Waiter(Generic[Item, Result]):
    __slots__ = ("done", "error", "item", "lead", "result")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.done = threading.Event()
        self.lead = False  # woken to run the next pass rather than with a result
        self.result: Result | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[Item, Result]):
    """Runs `run_pass(items) -> results` (one result per item, in order) over the items submitted
    concurrently; submit() returns the item's result or raises what the pass raised."""

    def __init__(
        self,
        run_pass: Callable[[Sequence[Item]], Sequence[Result]],
        window_seconds: float = 0.0,
        max_queued: int = 256,
        limit_name: str = "max_queued",
    ) -> None:
        self._run_pass = run_pass
        self._window = window_seconds
        self._max_queued = max_queued
        self._limit_name = limit_name
        self._lock = threading.Lock()
        self._queued: list[_Waiter[Item, Result]] = []
        self._running = False
        self.passes = 0  # passes run so far; with `items`, what a test needs to see coalescing
        self.items = 0

    def submit(self, item: Item) -> Result:
        waiter: _Waiter[Item, Result] = _Waiter(item)
        with self._lock:
            if len(self._queued) >= self._max_queued:
                raise QueueFullError(
                    f"server busy: {len(self._queued)} lookups already waiting ({self._limit_name} {self._max_queued})"
                )
            self._queued.append(waiter)
            lead = not self._running
            self._running = True
        if not lead:
            waiter.done.wait()
            if not waiter.lead:
                return self._outcome(waiter)
        self._lead(waiter)
        return self._outcome(waiter)

    def _lead(self, own: _Waiter[Item, Result]) -> None:
        """Runs one pass over what is queued, then hands the next pass to the first caller still queued."""
        if self._window:
            time.sleep(self._window)
        with self._lock:
            batch, self._queued = self._queued, []
            self.passes += 1
            self.items += len(batch)
        try:
            results = self._run_pass([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a pass gave {len(results)} results for {len(batch)} items")
            for waiter, result in zip(batch, results, strict=True):
                waiter.result = result
        except BaseException as e:  # the whole pass failed: every caller in it sees why
            for waiter in batch:
                waiter.error = e
        with self._lock:
            following = self._queued[0] if self._queued else None
            if following is None:
                self._running = False
            else:
                following.lead = True
        for waiter in batch:
            if waiter is not own:
                waiter.done.set()
        if following is not None:
            following.done.set()

    @staticmethod
    def _outcome(waiter: _Waiter[Item, Result]) -> Result:
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]  # set by the pass
