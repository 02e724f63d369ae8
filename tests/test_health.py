"""The standard health service on a real server: Watch streams end once it drains (so watchers never hold up
a stop)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_server.server import WRITES_HEALTH_NAME, HpsServer
from tests.conftest import sample_config, write_sample_tables

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_drain_ends_health_watches_at_once_after_not_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = replace(config, server=replace(config.server, shutdown_grace_seconds=20))
    server = HpsServer(config)
    port = server.start()
    try:
        assert server.wait_ready(30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [
                stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
                for name in ("", WRITES_HEALTH_NAME, "not-a-service")
            ]
            first = [next(watch).status for watch in watches]
            assert first == [SERVING, SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
            started = time.monotonic()
            stopping = threading.Thread(target=server.stop)  # the configured 20 s grace
            stopping.start()
            # Each stream ends cleanly (OK, no RpcError); watchers of a known name are told NOT_SERVING first.
            rest = [[reply.status for reply in watch] for watch in watches]
            stopping.join(20)
            stopped = time.monotonic() - started
    finally:
        server.stop(grace=0)
    assert rest == [[NOT_SERVING], [NOT_SERVING], []]
    assert all(watch.code() == grpc.StatusCode.OK for watch in watches)  # type: ignore[attr-defined]
    assert not stopping.is_alive() and stopped < 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
