"""Bounded queueing on a real server: over server.max_queued_requests waiting calls one more is refused at
once (counted), health checks and ModelService are answered while every RPC thread is taken, and calls
that time out while queued are counted out of the queue."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_client import Client, DeadlineExceededError, ResourceExhaustedError
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import TABLE_SPECS, sample_config, write_sample_tables

DIM = TABLE_SPECS["user"][1]


class _HeldPass:
    """Makes the server's next lookup pass wait until released, so the RPC threads stay taken."""

    def __init__(self, server: HpsServer) -> None:
        coalescer = server.lookups.coalescer
        self._pass = coalescer._run_pass
        self.entered = threading.Event()
        self.release = threading.Event()
        coalescer._run_pass = self._held  # type: ignore[method-assign]

    def _held(self, items: Sequence[Any]) -> Any:
        self.entered.set()
        assert self.release.wait(60)
        return self._pass(items)


@pytest.fixture
def small_server(tmp_path) -> Iterator[HpsServer]:  # type: ignore[no-untyped-def]
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    server_config = dataclasses.replace(config.server, workers=2, max_queued_requests=2)
    server = HpsServer(dataclasses.replace(config, server=server_config))
    server.start()
    assert server.wait_ready(60)
    try:
        yield server
    finally:
        server.stop(grace=1)


def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition never held")


def _saturate(
    server: HpsServer, client: Client, pool: ThreadPoolExecutor, timeout: float | None
) -> tuple[_HeldPass, list[Any]]:
    """Both RPC threads taken (one in the held pass, one queued for the next) and the queue full."""
    held = _HeldPass(server)
    calls = [pool.submit(client.lookup, "ctr", "user", [1])]
    assert held.entered.wait(30)
    calls.append(pool.submit(client.lookup, "ctr", "user", [2]))
    _until(lambda: len(server.lookups.coalescer._queued) == 1)
    calls += [pool.submit(client.lookup, "ctr", "user", [3], timeout=timeout) for _ in range(2)]
    _until(lambda: server.admission.waiting() == 2)
    return held, calls


def test_a_full_queue_refuses_at_once_and_health_is_still_answered(small_server: HpsServer) -> None:
    server, target = small_server, f"127.0.0.1:{small_server.port}"
    registry = server.metrics.registry
    with Client(target) as client, ThreadPoolExecutor(8) as pool:
        held, calls = _saturate(server, client, pool, timeout=None)
        assert registry.get_sample_value("hps_requests_waiting") == 2
        with pytest.raises(ResourceExhaustedError, match=r"server busy: .*server.max_queued_requests 2"):
            client.lookup("ctr", "user", [4], timeout=10)
        with pytest.raises(ResourceExhaustedError, match=r"server.max_queued_requests 2"):
            client.upsert("ctr", "user", [5], [[0.0] * DIM], timeout=10)
        assert registry.get_sample_value("hps_requests_refused_busy_total") == 2
        assert registry.get_sample_value(
            "hps_requests_total", {"model": "ctr", "method": "Lookup", "code": "RESOURCE_EXHAUSTED"}
        )
        # Every RPC thread is taken and the queue is full, yet health and ModelService answer.
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert client.describe("ctr", timeout=10).name == "ctr"
        held.release.set()
        for call in calls:
            assert call.result(30).shape == (1, DIM)
    assert server.admission.waiting() == 0


def test_calls_that_time_out_while_queued_leave_the_queue(small_server: HpsServer) -> None:
    server, target = small_server, f"127.0.0.1:{small_server.port}"
    with Client(target) as client, ThreadPoolExecutor(8) as pool:
        held, calls = _saturate(server, client, pool, timeout=0.5)
        for call in calls[2:]:
            with pytest.raises(DeadlineExceededError):
                call.result(30)
        held.release.set()
        for call in calls[:2]:
            assert call.result(30).shape == (1, DIM)
        _until(lambda: server.admission.waiting() == 0)
        # The queue has its whole room again: a second saturation queues two calls, and refuses a third.
        held, calls = _saturate(server, client, pool, timeout=None)
        with pytest.raises(ResourceExhaustedError):
            client.lookup("ctr", "user", [4], timeout=10)
        held.release.set()
        for call in calls:
            assert call.result(30).shape == (1, DIM)


def test_a_burst_past_grpcs_own_pending_limit_is_refused_busy_not_cancelled(small_server: HpsServer) -> None:
    """3,000 calls at once while every RPC thread is taken and the queue is full: each is answered
    RESOURCE_EXHAUSTED by the admission pool (gRPC's default limit of calls it holds unseen, 1,000, had it
    cancel those past it before the pool saw them)."""
    server, target = small_server, f"127.0.0.1:{small_server.port}"
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=b"\0" * 8)])
    with Client(target) as client, ThreadPoolExecutor(8) as pool:
        held, calls = _saturate(server, client, pool, timeout=None)
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(target, options=options) for _ in range(8)]
        try:
            stubs = [hps_pb2_grpc.LookupServiceStub(channel) for channel in channels]
            burst = [stubs[i % 8].Lookup.future(request, timeout=60) for i in range(3000)]
            codes = Counter(call.exception().code() for call in burst)  # type: ignore[union-attr]
        finally:
            held.release.set()
            for channel in channels:
                channel.close()
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: 3000}
        for call in calls:
            assert call.result(30).shape == (1, DIM)
