"""The client libraries against a real server: asyncio twin, timeouts, dtype and argument errors, a server
restarted on the same address."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hps_client import AsyncClient, Client, DeadlineExceededError, NotFoundError, UnavailableError
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2
from tests.conftest import TABLE_SPECS, ServedModel, sample_config, write_sample_tables


def test_async_client_matches_sync_results(served: ServedModel) -> None:
    keys = served.truth["user"][0][:50]

    async def main() -> tuple[np.ndarray, dict, list[str], np.ndarray]:
        async with AsyncClient(served.target) as client:
            single, tables, models = await asyncio.gather(
                client.lookup("ctr", "user", keys),
                client.lookup_tables("ctr", {"user": keys, "item": served.truth["item"][0][:5]}),
                client.list_models(),
            )
            combined = await client.lookup_combined("ctr", "user", keys, [0, 25, 50], combiner="sum")
            with pytest.raises(NotFoundError, match="no model 'm'"):
                await client.lookup("m", "user", keys)
            return single, tables, models, combined

    single, tables, models, combined = asyncio.run(main())
    expected = served.expected("user", keys)
    np.testing.assert_array_equal(single, expected)
    np.testing.assert_array_equal(tables["user"].vectors, expected)
    assert models == ["ctr"]
    np.testing.assert_allclose(combined, [expected[:25].sum(0), expected[25:].sum(0)], rtol=1e-5)


def test_float16_replies(served: ServedModel) -> None:
    keys = served.truth["item"][0][:20]
    with Client(served.target) as client:
        got = client.lookup("ctr", "item", keys, dtype="float16")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, served.expected("item", keys).astype(np.float16))


def test_timeout_and_unreachable_server_raise_typed_errors() -> None:
    # A listener that accepts connections and never answers: the call can only end by its deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with Client(f"127.0.0.1:{silent.getsockname()[1]}") as client, pytest.raises(DeadlineExceededError):
            client.lookup("ctr", "user", np.arange(10), timeout=0.5)
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(UnavailableError):
        client.list_models()


def test_a_new_client_reaches_a_server_restarted_on_the_same_address_while_an_old_client_backs_off(
    tmp_path: Path,
) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    first = HpsServer(config)
    port = first.start()
    target = f"127.0.0.1:{port}"
    with Client(target) as old:
        try:
            assert first.wait_ready(30)
            old.lookup("ctr", "user", [1])
        finally:
            first.stop(grace=1)
        with pytest.raises(UnavailableError):
            old.lookup("ctr", "user", [1])  # its connection is now failing, and backing off
        address = dataclasses.replace(config.server, address=target)
        second = HpsServer(dataclasses.replace(config, server=address))
        second.start()
        try:
            assert second.wait_ready(30)
            with Client(target) as new:
                assert new.lookup("ctr", "user", [1]).shape == (1, TABLE_SPECS["user"][1])

            async def lookup() -> tuple[int, ...]:
                async with AsyncClient(target) as new:
                    return (await new.lookup("ctr", "user", [1])).shape

            assert asyncio.run(lookup()) == (1, TABLE_SPECS["user"][1])
        finally:
            second.stop(grace=1)


def test_bad_arguments_are_rejected_before_sending(served: ServedModel) -> None:
    with Client(served.target) as client:
        with pytest.raises(TypeError, match="keys: must be integers"):
            client.lookup("ctr", "user", np.ones(3))
        with pytest.raises(ValueError, match="dtype"):
            client.lookup("ctr", "user", [1], dtype="int8")  # type: ignore[arg-type]
        # Keys int64 cannot hold are refused, never wrapped onto other keys (2**64 - 1 would be key -1).
        for beyond in (np.array([2**64 - 1], np.uint64), [2**63], [2**64]):
            with pytest.raises(ValueError, match="fit int64"):
                client.lookup("ctr", "user", beyond)
            with pytest.raises(ValueError, match="fit int64"):
                client.upsert("ctr", "user", beyond, np.zeros((1, TABLE_SPECS["user"][1]), np.float32))
            with pytest.raises(ValueError, match="fit int64"):
                client.lookup_tables("ctr", {"user": beyond})
        assert client.lookup("ctr", "user", np.array([2**63 - 1], np.uint64)).shape == (1, TABLE_SPECS["user"][1])


def test_max_norm_clips_each_vector_before_the_combiner(served: ServedModel) -> None:
    keys = served.truth["user"][0][:12]
    weights = np.linspace(0.5, 2.0, 12, dtype=np.float32)
    expected = served.expected("user", keys)
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    clipped = expected * (1.5 / np.maximum(norms, 1.5))
    row_splits = [0, 5, 5, 12]
    with Client(served.target) as client:
        got = client.lookup_combined("ctr", "user", keys, row_splits, combiner="mean", weights=weights, max_norm=1.5)
        with pytest.raises(ValueError, match="max_norm: must be > 0"):
            client.lookup_combined("ctr", "user", keys, row_splits, max_norm=0.0)
    want = [
        (clipped[:5] * weights[:5, None]).sum(0) / weights[:5].sum(),
        np.zeros(16),
        (clipped[5:] * weights[5:, None]).sum(0) / weights[5:].sum(),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- retries (the channels' service config)


@pytest.fixture
def flaky() -> Iterator[tuple[str, Counter[str]]]:
    """A real gRPC server on loopback answering every hps method UNAVAILABLE on its first call, then properly;
    (target, calls seen per method)."""
    calls: Counter[str] = Counter()
    replies: dict[str, Callable[[Any], Any]] = {
        "Lookup": lambda request: hps_pb2.LookupResponse(
            model=request.model,
            results=[
                hps_pb2.TableResult(
                    table="t", vectors=np.ones((2, 4), "<f4").tobytes(), rows=2, dim=4, found=b"\x01\x01"
                )
            ],
        ),
        "Upsert": lambda request: hps_pb2.UpsertResponse(rows=1),
        "Delete": lambda request: hps_pb2.DeleteResponse(rows=1),
        "ListModels": lambda request: hps_pb2.ListModelsResponse(models=["m"]),
    }

    def handler(method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            calls[method] += 1
            if calls[method] == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            return replies[method](request)

        return handle

    def unary(method: str, request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            handler(method),
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    server = grpc.server(futures.ThreadPoolExecutor(4))
    lookups = {
        "Lookup": unary("Lookup", hps_pb2.LookupRequest),
        "Upsert": unary("Upsert", hps_pb2.UpsertRequest),
        "Delete": unary("Delete", hps_pb2.DeleteRequest),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("hps.v1.LookupService", lookups),
            grpc.method_handlers_generic_handler(
                "hps.v1.ModelService", {"ListModels": unary("ListModels", hps_pb2.ListModelsRequest)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", calls
    server.stop(None)


def test_reads_are_retried_on_unavailable_and_writes_are_not(flaky: tuple[str, Counter[str]]) -> None:
    target, calls = flaky
    with Client(target, timeout=10) as client:
        np.testing.assert_array_equal(client.lookup("m", "t", [1, 2]), np.ones((2, 4), np.float32))
        assert client.list_models() == ["m"]
        for write in (lambda: client.upsert("m", "t", [1], np.ones((1, 4))), lambda: client.delete("m", "t", [1])):
            with pytest.raises(UnavailableError, match="restarting"):
                write()
        assert client.upsert("m", "t", [1], np.ones((1, 4))) == 1  # the caller's own retry goes through
    assert calls == {"Lookup": 2, "ListModels": 2, "Upsert": 2, "Delete": 1}

    async def lookup_twice() -> np.ndarray:
        async with AsyncClient(target, timeout=10) as client:
            return await client.lookup("m", "t", [1, 2])

    calls.clear()  # the asyncio client's channel has the same service config
    asyncio.run(lookup_twice())
    assert calls == {"Lookup": 2}
