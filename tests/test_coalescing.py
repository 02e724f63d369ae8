"""The Coalescer: concurrent submissions share passes, each gets its own result, the queue is bounded."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from hps_server.coalescing import Coalescer, QueueFullError


class _HeldPass:
    """A pass that doubles its items and, while `hold` is clear, waits once `entered` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.hold.wait(10)
        if -1 in items:
            raise ValueError("a bad batch")
        return [2 * item for item in items]


def test_calls_arriving_during_a_pass_share_the_next_one() -> None:
    held = _HeldPass()
    coalescer: Coalescer[int, int] = Coalescer(held)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(coalescer.submit, 0)
        assert held.entered.wait(10)  # the first caller runs a pass and is held in it
        rest = [pool.submit(coalescer.submit, i) for i in range(1, 8)]
        while len(coalescer._queued) < 7:  # all of them queue behind the running pass
            threading.Event().wait(0.01)
        held.hold.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in rest] == [2 * i for i in range(1, 8)]
    assert held.batches == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert coalescer.passes == 2 and coalescer.items == 8


def test_a_failed_pass_fails_its_callers_and_the_next_pass_still_runs() -> None:
    held = _HeldPass()
    coalescer: Coalescer[int, int] = Coalescer(held)
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(coalescer.submit, -1)
        assert held.entered.wait(10)
        good = pool.submit(coalescer.submit, 5)
        while not coalescer._queued:
            threading.Event().wait(0.01)
        held.hold.set()
        with pytest.raises(ValueError, match="a bad batch"):
            bad.result(10)
        assert good.result(10) == 10


def test_the_queue_is_bounded_and_says_which_limit() -> None:
    held = _HeldPass()
    coalescer: Coalescer[int, int] = Coalescer(held, max_queued=2, limit_name="server.max_queued_requests")
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(coalescer.submit, 1)
        assert held.entered.wait(10)
        queued = [pool.submit(coalescer.submit, i) for i in (2, 3)]
        while len(coalescer._queued) < 2:
            threading.Event().wait(0.01)
        with pytest.raises(QueueFullError, match=r"server.max_queued_requests 2"):
            coalescer.submit(4)
        held.hold.set()
        assert running.result(10) == 2
        assert [f.result(10) for f in queued] == [4, 6]
    assert coalescer.submit(7) == 14  # room again once the queue drained
