"""BackgroundFill: L1 fills run in order on one worker, a full backlog drops work, close drains."""

from __future__ import annotations

import threading

from hps_server.cache.background import BackgroundFill


def test_work_runs_in_order_and_close_drains_the_backlog() -> None:
    fill = BackgroundFill("test-fill")
    done: list[int] = []
    for i in range(20):
        assert fill.submit(lambda i=i: done.append(i))
    fill.close()
    assert done == list(range(20))


def test_a_full_backlog_drops_work_and_counts_it() -> None:
    fill = BackgroundFill("test-fill", max_pending=2)
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    fill.submit(hold)
    assert started.wait(10)  # the worker holds the first item, so the queue has room for 2
    ran: list[int] = []
    accepted = [fill.submit(lambda i=i: ran.append(i)) for i in range(4)]
    assert accepted == [True, True, False, False] and fill.dropped == 2
    assert not fill.wait_idle(0.05)
    release.set()
    assert fill.wait_idle(10)
    assert ran == [0, 1]
    fill.close()


def test_a_failing_fill_is_counted_and_the_worker_goes_on() -> None:
    fill = BackgroundFill("test-fill")
    ran: list[str] = []
    fill.submit(lambda: 1 / 0 and None)
    fill.submit(lambda: ran.append("after"))
    assert fill.wait_idle(10)
    assert fill.failed == 1 and ran == ["after"]
    fill.close()
