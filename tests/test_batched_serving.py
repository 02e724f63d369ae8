"""Dynamic batching through a real server: concurrent Lookups of different models, tables, dtypes and
combiners share one pass and each gets exactly its own answer; bad requests fail alone; the queue is
bounded; an acknowledged upsert is never followed by an older row."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from hps_client import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from hps_server.server import HpsServer
from tests.conftest import TABLE_SPECS, ServedModel, sample_config, write_sample_tables


class _Hold:
    """Wraps the server's pass so the next one waits until released: calls made meanwhile must queue,
    and the pass after it shows how they were coalesced. Only our own dispatch is wrapped; the levels
    and the session underneath are the real ones."""

    def __init__(self, server: HpsServer) -> None:
        self.coalescer = server.lookups.coalescer
        self._pass = self.coalescer._run_pass
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []
        self.coalescer._run_pass = self._held  # type: ignore[method-assign]

    def _held(self, items: Sequence[Any]) -> Any:
        self.batches.append(len(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self._pass(items)

    def wait_entered(self, first: Future[Any]) -> None:
        """Until `first`'s pass is held; a first call that ended instead (it failed) fails the test with its error."""
        for _ in range(6000):
            if self.entered.wait(0.01):
                return
            if first.done():
                raise AssertionError(f"the first call ended before its pass was held: {first.exception()!r}")
        raise AssertionError("the first call's pass never started")

    def wait_queued(self, n: int) -> None:
        for _ in range(3000):
            if len(self.coalescer._queued) >= n:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"{n} calls never queued")


@pytest.fixture
def two_models(tmp_path) -> Iterator[tuple[ServedModel, HpsServer]]:  # type: ignore[no-untyped-def]
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    ctr = config.models[0]
    # A second model over the same table files, with the NumPy L1 in front of it.
    ads = dataclasses.replace(ctr, name="ads", gpucache=True, deployed_device_list=(0,))
    config = dataclasses.replace(config, models=(ctr, ads))
    server = HpsServer(config, cache_factory=_reference_l1)
    port = server.start()
    assert server.wait_ready(30)
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth), server
    server.stop(grace=1)


def _reference_l1(model, levels):  # type: ignore[no-untyped-def]
    """placement.build_caches, forced onto the NumPy reference even where a GPU is present."""
    from hps_server.cache import placement

    return placement.build_caches(dataclasses.replace(model, deployed_device_list=(10**6,)), levels)


def test_concurrent_requests_of_models_tables_dtypes_and_combiners_share_one_pass(two_models) -> None:  # type: ignore[no-untyped-def]
    served, server = two_models
    rng = np.random.default_rng(5)
    user_keys, user_vectors = served.truth["user"]
    item_keys, _ = served.truth["item"]

    def plain(model: str, table: str, dtype: str) -> Callable[[Client], None]:
        keys = np.concatenate([rng.choice(served.truth[table][0], 30), [10**9]])

        def call(client: Client) -> None:
            got = client.lookup(model, table, keys, dtype=dtype)  # type: ignore[arg-type]
            np.testing.assert_array_equal(got, served.expected(table, keys).astype(dtype))

        return call

    def many_tables(model: str) -> Callable[[Client], None]:
        keys = {"user": rng.choice(user_keys, 20), "item": rng.choice(item_keys, 7)}

        def call(client: Client) -> None:
            got = client.lookup_tables(model, keys)
            for table, asked in keys.items():
                np.testing.assert_array_equal(got[table].vectors, served.expected(table, asked))
                assert got[table].found.all()

        return call

    def combined(combiner: str) -> Callable[[Client], None]:
        pick = rng.integers(0, len(user_keys), 12)
        splits = np.array([0, 5, 5, 12])

        def call(client: Client) -> None:
            got = client.lookup_combined("ctr", "user", user_keys[pick], splits, combiner=combiner)  # type: ignore[arg-type]
            rows = user_vectors[pick]
            sums = np.stack([rows[0:5].sum(0), np.zeros(16, np.float32), rows[5:12].sum(0)])
            expected = sums if combiner == "sum" else sums / np.array([5, 1, 7], np.float32)[:, None]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        return call

    calls = [
        plain("ctr", "user", "float32"),
        plain("ads", "user", "float16"),
        plain("ctr", "item", "float16"),
        plain("ads", "item", "float32"),
        many_tables("ctr"),
        many_tables("ads"),
        combined("sum"),
        combined("mean"),
    ]
    hold = _Hold(server)
    with Client(served.target) as client, ThreadPoolExecutor(len(calls) + 1) as pool:
        first = pool.submit(plain("ctr", "user", "float32"), client)
        hold.wait_entered(first)  # the first call's pass is held: the others queue behind it
        rest = [pool.submit(call, client) for call in calls]
        hold.wait_queued(len(calls))
        hold.release.set()
        first.result(30)
        for future in rest:
            future.result(30)  # each asserts its own answer
    assert hold.batches == [1, len(calls)]  # all eight answered by the one pass after the held one


def test_a_bad_request_fails_alone_while_the_others_are_answered(two_models) -> None:  # type: ignore[no-untyped-def]
    served, server = two_models
    keys = served.truth["user"][0][:50]
    hold = _Hold(server)
    with Client(served.target) as client, ThreadPoolExecutor(8) as pool:
        first = pool.submit(client.lookup, "ctr", "user", keys)
        hold.wait_entered(first)
        good = [pool.submit(client.lookup, model, "user", keys) for model in ("ctr", "ads", "ctr")]
        hold.wait_queued(3)
        bad_table = pool.submit(client.lookup, "ctr", "nope", keys)
        too_many = pool.submit(client.lookup, "ads", "user", np.arange(10_000))
        bad_splits = pool.submit(client.lookup_combined, "ctr", "user", keys, [0, 60])
        hold.release.set()
        for future in (first, *good):
            np.testing.assert_array_equal(future.result(30), served.expected("user", keys))
        with pytest.raises(NotFoundError, match="no table 'nope'"):
            bad_table.result(30)
        with pytest.raises(ResourceExhaustedError, match="exceed the limit"):
            too_many.result(30)
        with pytest.raises(InvalidArgumentError, match="row_splits"):
            bad_splits.result(30)


def test_over_the_queue_limit_a_lookup_is_refused_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_queued_requests=2))
    server = HpsServer(config)
    port = server.start()
    try:
        hold = _Hold(server)
        with Client(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(4) as pool:
            running = pool.submit(client.lookup, "ctr", "user", [1])
            hold.wait_entered(running)
            queued = [pool.submit(client.lookup, "ctr", "user", [2]) for _ in range(2)]
            hold.wait_queued(2)
            with pytest.raises(ResourceExhaustedError, match=r"server.max_queued_requests 2"):
                client.lookup("ctr", "user", [3])
            hold.release.set()
            for future in (running, *queued):
                assert future.result(30).shape == (1, TABLE_SPECS["user"][1])
            assert client.lookup("ctr", "user", [4]).shape == (1, TABLE_SPECS["user"][1])
    finally:
        server.stop(grace=1)


def test_an_acknowledged_upsert_is_never_followed_by_an_older_row(two_models) -> None:  # type: ignore[no-untyped-def]
    served, _ = two_models
    keys = served.truth["user"][0][:64]
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(model: str) -> None:
        # Batched lookups of the same keys keep L1 fills and hash-map write-backs racing the upserts.
        try:
            with Client(served.target) as client:
                while not stop.is_set():
                    client.lookup_tables(model, {"user": keys, "item": served.truth["item"][0][:8]})
        except (grpc.RpcError, Exception) as e:  # surfaced below
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(m,)) for m in ("ctr", "ads", "ads")]
    for thread in readers:
        thread.start()
    try:
        with Client(served.target) as client:
            for version in range(1, 41):
                model = ("ctr", "ads")[version % 2]
                rows = np.full((len(keys), 16), float(version), np.float32)
                client.upsert(model, "user", keys, rows)
                # Every lookup after the upsert returned sees this version (only this writer writes).
                np.testing.assert_array_equal(client.lookup_tables(model, {"user": keys})["user"].vectors, rows)
                np.testing.assert_array_equal(client.lookup(model, "user", keys), rows)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not errors
