"""Bounded work per request: limits checked before any level work, malformed messages and odd names refused
with INVALID_ARGUMENT or NOT_FOUND and short messages, and the server serving on after each."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from hps_client import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from hps_server import config as config_module
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2
from tests.conftest import ServedModel, sample_config, write_sample_tables


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    directory = tmp_path_factory.mktemp("limited")
    truth = write_sample_tables(directory)
    config = sample_config(directory)
    server_limits = dataclasses.replace(
        config.server, max_queries_per_request=8, max_keys_per_request=300, max_keys_per_write=50, max_message_mb=1
    )
    config = dataclasses.replace(config, server=server_limits)
    server = HpsServer(config)
    port = server.start()
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth)
    server.stop(grace=1)


def _still_serving(served: ServedModel) -> None:
    keys = served.truth["user"][0][:10]
    with Client(served.target) as client:
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))


def _raw(served: ServedModel, method: str, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            call(data, timeout=10)
    return raised.value  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("request_of", "limit"),
    [
        (lambda keys: {f"user{i}": keys[:1] for i in range(9)}, "server.max_queries_per_request 8"),
        (lambda keys: {"user": keys[:200], "item": keys[:101]}, "server.max_keys_per_request 300"),
    ],
    ids=["queries", "keys"],
)
def test_a_lookup_over_a_request_limit_is_refused_naming_it(limited: ServedModel, request_of, limit: str) -> None:  # type: ignore[no-untyped-def]
    keys = limited.truth["user"][0]
    request = hps_pb2.LookupRequest(
        model="ctr",
        queries=[hps_pb2.TableQuery(table=t, keys=k.astype("<i8").tobytes()) for t, k in request_of(keys).items()],
    )
    error = _raw(limited, "/hps.v1.LookupService/Lookup", request.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limit in (error.details() or "")
    _still_serving(limited)


def _queries(keys: np.ndarray, pooled: bool = False) -> hps_pb2.TableQuery:
    if not pooled:
        return hps_pb2.TableQuery(table="user", keys=keys.astype("<i8").tobytes())
    splits = np.arange(len(keys) + 1, dtype="<i8").tobytes()
    return hps_pb2.TableQuery(
        table="user", keys=keys.astype("<i8").tobytes(), row_splits=splits, combiner=hps_pb2.COMBINER_SUM
    )


@pytest.mark.parametrize("shape", ["queries", "packed", "pooled"])
def test_a_table_named_twice_is_held_to_its_limits_in_total(limited: ServedModel, shape: str) -> None:
    # user takes 256 keys (max_batch_size 64 x max_keys_per_sample 4) and 64 pooled samples a request; each
    # half below is within them, and the whole within server.max_keys_per_request 300.
    keys = limited.truth["user"][0]
    if shape == "queries":
        request = hps_pb2.LookupRequest(model="ctr", queries=[_queries(keys[:150]), _queries(keys[150:300])])
    elif shape == "packed":
        packed = hps_pb2.PackedQuery(
            tables=["user", "user"],
            keys=keys[:300].astype("<i8").tobytes(),
            counts=np.array([150, 150], "<i8").tobytes(),
        )
        request = hps_pb2.LookupRequest(model="ctr", packed=packed)
    else:
        request = hps_pb2.LookupRequest(model="ctr", queries=[_queries(keys[:40], True), _queries(keys[40:80], True)])
    error = _raw(limited, "/hps.v1.LookupService/Lookup", request.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details() or ""
    assert "table user named 2 times" in details
    assert ("80 pooled samples exceed max_batch_size 64" if shape == "pooled" else "300 keys") in details
    _still_serving(limited)


def test_packed_counts_past_the_keys_are_invalid_even_where_their_sum_wraps_around(limited: ServedModel) -> None:
    huge = 2**63 - 1
    packed = hps_pb2.PackedQuery(tables=["user", "item", "user"], counts=np.array([huge, huge, 2], "<i8").tobytes())
    request = hps_pb2.LookupRequest(model="ctr", packed=packed)
    error = _raw(limited, "/hps.v1.LookupService/Lookup", request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"packed.counts[0]: {huge} keys, but packed.keys holds 0" in (error.details() or "")
    _still_serving(limited)


def test_a_reply_larger_than_max_message_mb_is_refused_naming_it(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    model = dataclasses.replace(config.models[0], max_batch_size=100_000)
    config = dataclasses.replace(config, models=(model,), server=dataclasses.replace(config.server, max_message_mb=1))
    server = HpsServer(config)
    port = server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            keys = np.arange(20_000)  # 20,000 x 16 floats x 4 bytes = 1.2 MiB of vectors
            with pytest.raises(ResourceExhaustedError, match=r"over server.max_message_mb 1"):
                client.lookup("ctr", "user", keys)
            assert client.lookup("ctr", "user", keys, dtype="float16").shape == (20_000, 16)  # 0.6 MiB
            # 16,320 keys: 0.996 MiB of vectors, but with a found byte per key the reply is over 1 MiB.
            with pytest.raises(ResourceExhaustedError, match=r"over server.max_message_mb 1"):
                client.lookup("ctr", "user", keys[:16_320])
            assert client.lookup("ctr", "user", keys[:16_000]).shape == (16_000, 16)  # 0.99 MiB in all: sent
    finally:
        server.stop(grace=1)


def test_writes_over_max_keys_per_write_are_refused_and_store_nothing(limited: ServedModel) -> None:
    with Client(limited.target) as client:
        keys = np.arange(10**7, 10**7 + 51)
        with pytest.raises(ResourceExhaustedError, match=r"server\.max_keys_per_write 50"):
            client.upsert("ctr", "user", keys, np.ones((51, 16), np.float32))
        with pytest.raises(ResourceExhaustedError, match=r"server\.max_keys_per_write 50"):
            client.delete("ctr", "user", keys)
        assert not client.lookup_tables("ctr", {"user": keys[:50]})["user"].found.any()
    _still_serving(limited)


def test_a_request_over_max_message_mb_is_refused_by_grpc(limited: ServedModel) -> None:
    size = limited.config.server.max_message_mb * 1024 * 1024
    error = _raw(limited, "/hps.v1.LookupService/Lookup", bytes(size + 1024))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(limited)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/hps.v1.LookupService/Lookup", "hps.v1.LookupRequest"),
        ("/hps.v1.LookupService/Upsert", "hps.v1.UpsertRequest"),
        ("/hps.v1.LookupService/Delete", "hps.v1.DeleteRequest"),
        ("/hps.v1.ModelService/DescribeModel", "hps.v1.DescribeModelRequest"),
    ],
)
def test_malformed_protobuf_is_invalid_argument_and_logged_once(
    limited: ServedModel, method: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hps_server.malformed")
    garbage = bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) + b"\x01" * 10  # a length running past the end
    for _ in range(20):
        error = _raw(limited, method, garbage)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"request: not a valid {message} message" in (error.details() or "")
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1
    _still_serving(limited)


def test_a_malformed_message_in_a_stream_ends_it_with_invalid_argument(limited: ServedModel) -> None:
    good = hps_pb2.LookupRequest(
        model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=np.arange(3, dtype="<i8").tobytes())]
    )
    with grpc.insecure_channel(limited.target) as channel:
        stream = channel.stream_stream(
            "/hps.v1.LookupService/StreamLookup", request_serializer=None, response_deserializer=None
        )
        replies = stream(iter([good.SerializeToString(), b"\x0a\xff\xff\xff\xff\x0f"]), timeout=10)
        assert next(replies)
        with pytest.raises(grpc.RpcError) as raised:
            next(replies)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_a_huge_model_name_is_not_found_with_a_short_message(limited: ServedModel) -> None:
    with Client(limited.target) as client, pytest.raises(NotFoundError) as raised:
        client.lookup("m" * 200_000, "user", [1])
    assert len(str(raised.value)) < 400 and "200000 chars" in str(raised.value)
    with Client(limited.target) as client, pytest.raises(NotFoundError, match=r"no table 'x{64}'\.\.\."):
        client.lookup("ctr", "x" * 5000, [1])


def test_non_finite_combiner_weights_are_invalid(limited: ServedModel) -> None:
    keys = limited.truth["user"][0][:4]
    with Client(limited.target) as client:
        for bad in (np.nan, np.inf):
            with pytest.raises(InvalidArgumentError, match="weights: contains NaN or infinity"):
                client.lookup_combined("ctr", "user", keys, [0, 4], combiner="sum", weights=[1.0, bad, 1.0, 1.0])


@pytest.mark.parametrize("name", ["b.c", "a b", "", "x" * 121, "ünï"])
def test_names_outside_hps_pattern_are_refused_in_config(name: str) -> None:
    raw = {"models": [{"name": "m", "tables": [{"name": name, "dim": 4}]}]}
    with pytest.raises(config_module.ConfigError, match=r"models\[0\].tables\[0\].name: must be 1 to 120 of"):
        config_module.parse(raw, Path("."))
    raw = {"models": [{"name": name, "tables": [{"name": "t", "dim": 4}]}]}
    with pytest.raises(config_module.ConfigError, match=r"models\[0\].name: must be 1 to 120 of"):
        config_module.parse(raw, Path("."))


def test_streams_are_capped_idle_ones_cancelled_and_lookups_and_health_still_answered(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    server_config = dataclasses.replace(config.server, workers=4, max_streams=2, stream_idle_seconds=1.0)
    config = dataclasses.replace(config, server=server_config)
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    target = f"127.0.0.1:{port}"
    served = ServedModel(server, target, config, truth)
    finished = threading.Event()

    def idle() -> Iterator[bytes]:
        finished.wait(30)  # sends nothing until the test is over
        yield from ()

    try:
        with grpc.insecure_channel(target) as channel:
            stream = channel.stream_stream(
                "/hps.v1.LookupService/StreamLookup", request_serializer=None, response_deserializer=None
            )
            held = [stream(idle()) for _ in range(2)]  # open, idle
            guard = server.lookups.streams
            for _ in range(500):
                if guard.open_count() == 2:
                    break
                threading.Event().wait(0.01)
            assert guard.open_count() == 2
            third = stream(iter([b""]))
            with pytest.raises(grpc.RpcError) as refused:
                next(third)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "server.max_streams 2" in (refused.value.details() or "")  # type: ignore[attr-defined]
            # Two threads of four are held by the streams: Lookups and health checks still get through.
            _still_serving(served)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # Idle for over a second, both are cancelled and their places freed.
            for call in held:
                with pytest.raises(grpc.RpcError) as ended:
                    next(call)
                assert ended.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
            for _ in range(500):
                if guard.open_count() == 0:
                    break
                threading.Event().wait(0.01)
            assert guard.open_count() == 0
    finally:
        finished.set()
        server.stop(grace=1)
