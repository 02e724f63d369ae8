"""The standard health service on a real server: Watch streams end once it drains (so watchers never hold up
a stop), List reports every name, and malformed requests are INVALID_ARGUMENT; none of it needs a token."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_client import TLS
from hps_server.server import SERVICE_NAMES, WRITES_HEALTH_NAME, HpsServer
from hps_wire import security as client_security
from tests.conftest import SecuredModel, ServedModel, sample_config, write_sample_tables

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
GARBAGE = b"\xff\xff"  # not a valid protobuf message of any type


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


@pytest.fixture(params=["plaintext", "mtls"])
def health_channel(request: pytest.FixtureRequest) -> Iterator[grpc.Channel]:
    """A channel with no token to a serving server: `served`, or `secured` over TLS with its client certificate."""
    if request.param == "plaintext":
        served: ServedModel = request.getfixturevalue("served")
        channel = grpc.insecure_channel(served.target)
    else:
        secured: SecuredModel = request.getfixturevalue("secured")
        tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
        served, channel = secured, client_security.channel(secured.target, tls)
    assert served.server.wait_ready(30)
    with channel:
        yield channel


def test_list_reports_every_name_without_a_token(
    health_channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    listed = health_pb2_grpc.HealthStub(health_channel).List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: reply.status for name, reply in listed.statuses.items()}
    assert statuses == dict.fromkeys(("", *SERVICE_NAMES, WRITES_HEALTH_NAME), SERVING)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("method", "message", "call"),
    [
        ("Check", "grpc.health.v1.HealthCheckRequest", "unary_unary"),
        ("List", "grpc.health.v1.HealthListRequest", "unary_unary"),
        ("Watch", "grpc.health.v1.HealthCheckRequest", "unary_stream"),
    ],
)
def test_a_malformed_health_request_is_invalid_argument_and_logged_once(
    health_channel: grpc.Channel, method: str, message: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    raw = getattr(health_channel, call)(f"/grpc.health.v1.Health/{method}")
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as raised:
            reply = raw(GARBAGE, timeout=10)
            if call == "unary_stream":
                next(reply)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert f"request: not a valid {message} message" in (raised.value.details() or "")  # type: ignore[attr-defined]
    check = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == SERVING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1
