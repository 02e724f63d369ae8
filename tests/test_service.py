"""The gRPC service on loopback: correct vectors, every bad-input status, and serving on afterwards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hps_client import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from hps_server import config as config_module
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import TABLE_SPECS, ServedModel, sample_config, write_sample_tables


@pytest.fixture(scope="module")
def stub(served: ServedModel) -> hps_pb2_grpc.LookupServiceStub:
    channel = grpc.insecure_channel(served.target)
    yield hps_pb2_grpc.LookupServiceStub(channel)
    channel.close()


def _mixed_keys(served: ServedModel, table: str, n: int, seed: int) -> np.ndarray:
    """Stored keys mixed with keys no level holds."""
    rng = np.random.default_rng(seed)
    stored = served.truth[table][0]
    return np.concatenate([rng.choice(stored, n - n // 4), rng.integers(10**7, 10**8, n // 4)])


def _assert_serving_truth(served: ServedModel) -> None:
    """A normal lookup still returns exactly the stored vectors, and no table lost or gained rows."""
    with Client(served.target) as client:
        for table, (keys, _) in served.truth.items():
            got = client.lookup("ctr", table, keys[:200])
            np.testing.assert_array_equal(got, served.expected(table, keys[:200]))
        info = client.describe("ctr")
        assert {t.name: t.rows for t in info.tables} == {t: len(k) for t, (k, _) in served.truth.items()}


def test_lookup_returns_stored_vectors_defaults_and_found_mask(served: ServedModel) -> None:
    with Client(served.target) as client:
        keys = _mixed_keys(served, "item", 200, seed=1)
        results = client.lookup_tables("ctr", {"item": keys, "user": _mixed_keys(served, "user", 100, seed=2)})
    np.testing.assert_array_equal(results["item"].vectors, served.expected("item", keys))
    np.testing.assert_array_equal(results["item"].found, np.isin(keys, served.truth["item"][0]))
    assert np.all(results["item"].vectors[~results["item"].found] == TABLE_SPECS["item"][2])
    assert results["user"].vectors.shape == (100, 16)


def test_lookup_keeps_the_shape_of_the_keys(served: ServedModel) -> None:
    keys = served.truth["user"][0][:24].reshape(2, 3, 4)
    with Client(served.target) as client:
        got = client.lookup("ctr", "user", keys)
    assert got.shape == (2, 3, 4, 16)
    np.testing.assert_array_equal(got.reshape(24, 16), served.expected("user", keys.reshape(-1)))


def test_key_list_alternative_and_float16_replies(served: ServedModel, stub: hps_pb2_grpc.LookupServiceStub) -> None:
    keys = served.truth["user"][0][:10]
    request = hps_pb2.LookupRequest(
        model="ctr",
        queries=[hps_pb2.TableQuery(table="user", key_list=keys.tolist())],
        dtype=hps_pb2.VECTOR_DTYPE_FLOAT16,
    )
    result = stub.Lookup(request).results[0]
    got = np.frombuffer(result.vectors, "<f2").reshape(result.rows, result.dim)
    np.testing.assert_array_equal(got, served.expected("user", keys).astype(np.float16))


def test_stream_lookup_answers_in_order_with_request_ids(served: ServedModel, stub) -> None:
    keys = [served.truth["item"][0][i : i + 5] for i in range(0, 50, 5)]
    requests = (
        hps_pb2.LookupRequest(
            model="ctr", queries=[hps_pb2.TableQuery(table="item", keys=k.tobytes())], request_id=str(i)
        )
        for i, k in enumerate(keys)
    )
    replies = list(stub.StreamLookup(requests))
    assert [r.request_id for r in replies] == [str(i) for i in range(len(keys))]
    for reply, k in zip(replies, keys, strict=True):
        got = np.frombuffer(reply.results[0].vectors, "<f4").reshape(len(k), -1)
        np.testing.assert_array_equal(got, served.expected("item", k))


def _query(table: str = "user", **fields: object) -> hps_pb2.LookupRequest:
    return hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table=table, **fields)])


BAD_LOOKUPS = {
    "unknown model": (hps_pb2.LookupRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
    "unknown table": (_query("nope", keys=b"\0" * 8), grpc.StatusCode.NOT_FOUND, "no table 'nope'"),
    "key bytes not a multiple of 8": (
        _query(keys=b"\0" * 12),
        grpc.StatusCode.INVALID_ARGUMENT,
        "queries[0].keys: byte length 12 is not a multiple of 8",
    ),
    "keys and key_list": (_query(keys=b"\0" * 8, key_list=[1]), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    "unknown dtype": (hps_pb2.LookupRequest(model="ctr", dtype=9), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    "too many keys": (
        _query(keys=b"\0" * 8 * 257),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "257 keys for table user exceed the limit of 256",
    ),
    "combiner without row_splits": (
        _query(keys=b"\0" * 8, combiner=hps_pb2.COMBINER_SUM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "combiner: needs row_splits",
    ),
    "row_splits without combiner": (
        _query(keys=b"\0" * 8, row_splits=np.array([0, 1]).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs a combiner (SUM, MEAN or SQRTN), got none",
    ),
    "unknown combiner": (
        _query(keys=b"\0" * 8, row_splits=np.array([0, 1]).tobytes(), combiner=77),
        grpc.StatusCode.INVALID_ARGUMENT,
        "queries[0].combiner: row_splits needs a combiner (SUM, MEAN or SQRTN), got unknown Combiner value 77",
    ),
    "row_splits not ending at the key count": (
        _query(keys=b"\0" * 16, row_splits=np.array([0, 1]).tobytes(), combiner=hps_pb2.COMBINER_SUM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "row_splits: must start at 0 and end at the key count 2",
    ),
    "decreasing row_splits": (
        _query(keys=b"\0" * 16, row_splits=np.array([0, 2, 1, 2]).tobytes(), combiner=hps_pb2.COMBINER_MEAN),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must not decrease",
    ),
    "weights of the wrong length": (
        _query(
            keys=b"\0" * 16,
            row_splits=np.array([0, 2]).tobytes(),
            combiner=hps_pb2.COMBINER_SUM,
            weights=np.ones(3, "<f4").tobytes(),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "3 weights for 2 keys",
    ),
    "negative max_norm": (
        _query(keys=b"\0" * 8, max_norm=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "queries[0].max_norm: must be finite and >= 0",
    ),
    "infinite max_norm": (
        _query(keys=b"\0" * 8, max_norm=float("inf")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "queries[0].max_norm: must be finite and >= 0",
    ),
    "NaN max_norm": (_query(keys=b"\0" * 8, max_norm=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "max_norm"),
    "too many samples": (
        _query(keys=b"", row_splits=np.zeros(66, "<i8").tobytes(), combiner=hps_pb2.COMBINER_SUM),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "65 samples exceed max_batch_size 64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LOOKUPS))
def test_bad_lookup_gets_status_and_server_keeps_serving(served: ServedModel, stub, case: str) -> None:
    request, code, message = BAD_LOOKUPS[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Lookup(request)
    assert raised.value.code() == code
    assert message in raised.value.details()
    _assert_serving_truth(served)


def test_bad_request_mid_stream_ends_the_stream_with_its_status(served: ServedModel, stub) -> None:
    good = _query(keys=served.truth["user"][0][:3].tobytes())
    replies = stub.StreamLookup(iter([good, _query(keys=b"\0" * 5), good]))
    assert len(next(replies).results[0].vectors) == 3 * 16 * 4
    with pytest.raises(grpc.RpcError) as raised:
        next(replies)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_serving_truth(served)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.ones(15, "<f4").tobytes(), "15 floats for 1 keys of dim 16"),
        (np.full(16, np.nan, "<f4").tobytes(), "NaN"),
        (b"\0" * 7, "vectors: byte length 7 is not a multiple of 4"),
    ],
)
def test_bad_upsert_is_refused_and_stores_nothing(served: ServedModel, stub, vectors: bytes, message: str) -> None:
    key = np.array([served.truth["user"][0][0]], "<i8")
    request = hps_pb2.UpsertRequest(model="ctr", table="user", keys=key.tobytes(), vectors=vectors)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Upsert(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    _assert_serving_truth(served)


def test_client_errors_carry_the_servers_message(served: ServedModel) -> None:
    with Client(served.target) as client:
        with pytest.raises(NotFoundError, match="no table 'nope'"):
            client.lookup("ctr", "nope", [1])
        with pytest.raises(ResourceExhaustedError, match="exceed the limit of 256"):
            client.lookup("ctr", "user", np.arange(300))
        with pytest.raises(InvalidArgumentError, match="15 floats"):
            client.upsert("ctr", "user", [1], np.ones(15))


def test_upsert_then_delete_reach_every_level(served: ServedModel) -> None:
    keys = np.array([10**9 + 1, 10**9 + 2], np.int64)
    vectors = np.arange(32, dtype=np.float32).reshape(2, 16)
    with Client(served.target) as client:
        # Rows written: a key repeated counts once, and keeps its last row.
        assert client.upsert("ctr", "user", keys[[0, 1, 1]], vectors[[0, 0, 1]]) == 2
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), vectors)
        session = served.server.models.session("ctr")
        for level in session.levels:
            assert level.contains("ctr.user", keys).all(), level.kind
        assert client.delete("ctr", "user", np.concatenate([keys, keys, [7]])) == 2
        result = client.lookup_tables("ctr", {"user": keys})["user"]
    assert not result.found.any()
    _assert_serving_truth(served)


def test_eight_concurrent_clients_get_exactly_the_stored_vectors(served: ServedModel) -> None:
    failures: list[str] = []

    def worker(seed: int) -> int:
        with Client(served.target) as client:
            for i in range(40):
                table = ("user", "item")[i % 2]
                keys = _mixed_keys(served, table, 64 + seed, seed * 100 + i)
                got = client.lookup("ctr", table, keys)
                if not np.array_equal(got, served.expected(table, keys)):
                    failures.append(f"thread {seed} request {i}")
        return 40

    with ThreadPoolExecutor(max_workers=8) as pool:
        answered = [future.result() for future in [pool.submit(worker, seed) for seed in range(8)]]
    assert answered == [40] * 8  # .result() re-raises any error a thread hit
    assert failures == []


def test_model_introspection(served: ServedModel) -> None:
    with Client(served.target) as client:
        assert client.list_models() == ["ctr"]
        info = client.describe("ctr")
        with pytest.raises(NotFoundError, match="no model 'x'"):
            client.describe("x")
    assert info.levels == ("hash_map", "rocksdb")
    user = next(t for t in info.tables if t.name == "user")
    assert (user.dim, user.rows, user.max_keys_per_request) == (16, 5_000, 256)


def test_health_and_reflection(served: ServedModel) -> None:
    with grpc.insecure_channel(served.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hps.v1.LookupService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"hps.v1.LookupService", "hps.v1.ModelService", "grpc.health.v1.Health"} <= names


def test_message_size_limit_is_resource_exhausted(tmp_path) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = config_module.Config(
        server=config_module.ServerConfig(address="127.0.0.1:0", max_message_mb=1),
        volatile_db=config.volatile_db,
        persistent_db=config.persistent_db,
        models=config.models,
    )
    server = HpsServer(config)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = hps_pb2_grpc.LookupServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Lookup(_query(keys=b"\0" * (2 * 1024 * 1024)))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            keys = np.arange(3, dtype="<i8")
            assert len(stub.Lookup(_query(keys=keys.tobytes())).results[0].vectors) == 3 * 16 * 4
    finally:
        server.stop(grace=1)
