"""ServerMetrics and readiness: a real gRPC server and /metrics endpoint; counts move by exactly the workload's."""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hps_client import AlreadyExistsError, Client, HpsError, NotFoundError, ResourceExhaustedError
from hps_server import config as config_module
from hps_server import healthcheck, tables
from hps_server.cache import CacheStats
from hps_server.metrics import UNKNOWN_MODEL, CacheOccupancy, PassShape, ServerMetrics, serve_metrics
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2
from tests.conftest import sample_config, sample_raw_config, write_sample_tables


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics() -> Iterator[tuple[ServerMetrics, int]]:
    m = ServerMetrics(models=["ads"])
    endpoint = serve_metrics("127.0.0.1:0", m)
    assert endpoint is not None
    yield m, endpoint.port
    endpoint.close()


def test_empty_address_disables_the_endpoint() -> None:
    assert serve_metrics("", ServerMetrics()) is None


def test_bad_address_names_the_field() -> None:
    with pytest.raises(ValueError, match="metrics_address"):
        serve_metrics("localhost", ServerMetrics())


def test_two_servers_in_one_process_keep_separate_counts() -> None:
    a, b = ServerMetrics(models=["m"]), ServerMetrics(models=["m"])
    tally = a.tally("m", ["t"], ["default"])
    tally.add(PassShape.of(np.zeros(1, np.int64), np.zeros(5, np.int64), np.array([5])), [], None)
    assert a.registry.get_sample_value("hps_lookup_keys_total", {"model": "m", "table": "t"}) == 5
    assert b.registry.get_sample_value("hps_lookup_keys_total", {"model": "m", "table": "t"}) is None


def test_lookup_and_level_counts(metrics: tuple[ServerMetrics, int]) -> None:
    m, port = metrics
    tally = m.tally("ads", ["user", "item"], ["l1_cache", "redis_cluster", "default"])
    # One pass over a 100-key query of user and a 3-key one of item (which L1 answered whole).
    columns = np.array([0, 1])
    table_of = np.repeat([0, 1], [100, 3])
    per_level = [
        (0, np.array([100, 3]), np.array([60, 3])),
        (1, np.array([40, 0]), np.array([37, 0])),
        (2, np.array([3, 0]), np.array([3, 0])),
    ]
    tally.add(PassShape.of(columns, table_of, np.array([100, 3])), per_level, np.zeros(2, np.int64))
    m.record_level_seconds("ads", "l1_cache", 0.0002)
    m.record_level_seconds("ads", "redis_cluster", 0.003)
    m.record_level_failure("redis_cluster", "fetch")
    s = scrape(port)
    assert value(s, "hps_lookup_keys_total", model="ads", table="user") == 100
    assert value(s, "hps_lookup_keys_total", model="ads", table="item") == 3
    assert value(s, "hps_lookup_batch_keys_count", model="ads") == 2
    assert value(s, "hps_lookup_batch_keys_sum", model="ads") == 103
    assert value(s, "hps_lookup_batch_keys_bucket", model="ads", le="4.0") == 1  # the 3-key query
    assert value(s, "hps_lookup_batch_keys_bucket", model="ads", le="256.0") == 2
    assert value(s, "hps_level_hits_total", model="ads", level="l1_cache") == 63
    assert value(s, "hps_level_queried_keys_total", model="ads", level="redis_cluster") == 40
    assert value(s, "hps_level_hits_total", model="ads", level="default") == 3
    assert value(s, "hps_level_duration_seconds_count", model="ads", level="redis_cluster") == 1
    assert value(s, "hps_level_duration_seconds_bucket", model="ads", level="redis_cluster", le="0.0025") == 0
    assert value(s, "hps_level_duration_seconds_bucket", model="ads", level="redis_cluster", le="0.005") == 1
    assert value(s, "hps_level_duration_seconds_count", model="ads", level="default") == 0
    assert value(s, "hps_level_failures_total", level="redis_cluster", operation="fetch") == 1


def test_cache_occupancy_is_read_at_scrape_time(metrics: tuple[ServerMetrics, int]) -> None:
    m, port = metrics
    state = {"rows": 10}
    m.watch_caches(
        lambda: [CacheOccupancy("ads", "user", "0", CacheStats(hits=3, misses=1, rows=state["rows"], capacity=64), 64)]
    )
    assert value(scrape(port), "hps_cache_rows", model="ads", table="user", device="0") == 10
    state["rows"] = 40
    s = scrape(port)
    assert value(s, "hps_cache_rows", model="ads", table="user", device="0") == 40
    assert value(s, "hps_cache_capacity_rows", model="ads", table="user", device="0") == 64
    assert value(s, "hps_cache_bytes", model="ads", table="user", device="0") == 40 * 64
    assert value(s, "hps_cache_hits_total", model="ads", table="user", device="0") == 3
    assert value(s, "hps_cache_misses_total", model="ads", table="user", device="0") == 1


def test_model_events_and_readiness(metrics: tuple[ServerMetrics, int]) -> None:
    m, port = metrics
    m.record_model_event("ads", "loaded")
    m.record_model_event("other", "failed")
    m.set_ready(True)
    s = scrape(port)
    assert value(s, "hps_model_events_total", model="ads", event="loaded") == 1
    assert value(s, "hps_model_events_total", model="other", event="failed") == 1
    assert value(s, "hps_models_loaded") == 1
    assert value(s, "hps_ready") == 1
    m.set_ready(False)
    assert value(scrape(port), "hps_ready") == 0


# A generic service under /hps.v1.Echo: the interceptor must count it like the real ones.
def _echo_server(metrics: ServerMetrics) -> tuple[grpc.Server, int]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        if request == b"boom":
            raise RuntimeError("boom")
        if request == b"slow":
            time.sleep(0.5)  # past the caller's deadline: its reply is never seen
        return request

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def held(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield next(requests)
        while context.is_active():  # until the client cancels; then it ends as if nothing happened
            time.sleep(0.01)

    handlers = grpc.method_handlers_generic_handler(
        "hps.v1.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Held": grpc.stream_stream_rpc_method_handler(held),
        },
    )
    other = grpc.method_handlers_generic_handler("other.Probe", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[metrics.interceptor()])
    server.add_generic_rpc_handlers((handlers, other))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_interceptor_counts_rpcs_by_method_and_code() -> None:
    m = ServerMetrics(models=["ads"])
    server, port = _echo_server(m)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/hps.v1.Echo/Unary")
            for _ in range(3):
                assert unary(b"ok") == b"ok"
            for payload in (b"bad", b"boom"):
                with pytest.raises(grpc.RpcError):
                    unary(payload)
            assert list(channel.stream_stream("/hps.v1.Echo/Stream")(iter([b"a", b"b"]))) == [b"a", b"b"]
            assert channel.unary_unary("/other.Probe/Unary")(b"ok") == b"ok"
    finally:
        server.stop(None)
    get = m.registry.get_sample_value
    # Raw bytes carry no model field: they count under the bounded "unknown" label.
    labels = {"model": UNKNOWN_MODEL, "method": "Unary"}
    assert get("hps_requests_total", {**labels, "code": "OK"}) == 3
    assert get("hps_requests_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert get("hps_requests_total", {**labels, "code": "UNKNOWN"}) == 1
    assert get("hps_request_duration_seconds_count", labels) == 5
    assert get("hps_requests_total", {"model": UNKNOWN_MODEL, "method": "Stream", "code": "OK"}) == 1
    assert get("hps_requests_in_flight", {"method": "Unary"}) == 0
    assert get("hps_requests_in_flight", {"method": "Stream"}) == 0
    # Services outside hps (health, reflection, ...) are not counted.
    assert get("hps_requests_total", {**labels, "code": "OK"}) == 3
    assert m.model_label("ads") == "ads"
    assert m.model_label("nope") == UNKNOWN_MODEL


def test_calls_over_for_the_client_before_their_handler_returned_count_as_the_client_saw_them() -> None:
    m = ServerMetrics()
    server, port = _echo_server(m)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as late:
                channel.unary_unary("/hps.v1.Echo/Unary")(b"slow", timeout=0.1)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled = channel.stream_stream("/hps.v1.Echo/Held")(iter([b"a", b"b"]), timeout=10)
            assert next(cancelled) == b"a"
            cancelled.cancel()
            _finished(m, "Unary")
            _finished(m, "Held")
    finally:
        server.stop(None)
    get = m.registry.get_sample_value
    for method, code in (("Unary", "DEADLINE_EXCEEDED"), ("Held", "CANCELLED")):
        assert get("hps_requests_total", {"model": UNKNOWN_MODEL, "method": method, "code": code}) == 1
        assert get("hps_requests_total", {"model": UNKNOWN_MODEL, "method": method, "code": "OK"}) is None


def _finished(m: ServerMetrics, method: str, timeout: float = 10) -> None:
    """Waits until no `method` call is in flight: the server counts a call after its client has seen the end."""
    give_up = time.monotonic() + timeout
    while m.registry.get_sample_value("hps_requests_in_flight", {"method": method}) != 0:
        assert time.monotonic() < give_up, f"{method} calls still in flight"
        time.sleep(0.01)


# ---------------------------------------------------------------- a running server


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[HpsServer, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, metrics_address="127.0.0.1:0"))
    server = HpsServer(config)
    server.start()
    yield server, truth
    server.stop(grace=1)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_scrape_after_a_known_workload(metered: tuple[HpsServer, dict]) -> None:
    server, truth = metered
    assert server.metrics_port is not None
    user, item = truth["user"][0], truth["item"][0]
    absent = np.setdiff1d(np.arange(-(10**6) - 20, -(10**6)), user)[:20]
    before = scrape(server.metrics_port)
    with Client(f"127.0.0.1:{server.port}") as client:
        # 1: the volatile level is empty (initial_cache_rate 0): every present key comes from RocksDB.
        client.lookup_tables("ctr", {"user": np.concatenate([user[:100], absent]), "item": item[:50]})
        # 2: the same user keys were written back into the hash map, which now answers all of them.
        client.lookup("ctr", "user", user[:100])
        with pytest.raises(NotFoundError):
            client.lookup("nope", "user", [1])
        with pytest.raises(ResourceExhaustedError):
            client.lookup("ctr", "user", np.arange(300))
    after = scrape(server.metrics_port)

    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    assert d("hps_requests_total", model="ctr", method="Lookup", code="OK") == 2
    assert d("hps_requests_total", model="ctr", method="Lookup", code="RESOURCE_EXHAUSTED") == 1
    assert d("hps_requests_total", model=UNKNOWN_MODEL, method="Lookup", code="NOT_FOUND") == 1
    assert d("hps_request_duration_seconds_count", model="ctr", method="Lookup") == 3
    assert d("hps_request_duration_seconds_bucket", model="ctr", method="Lookup", le="+Inf") == 3
    assert d("hps_requests_in_flight", method="Lookup") == 0

    assert d("hps_lookup_keys_total", model="ctr", table="user") == 220
    assert d("hps_lookup_keys_total", model="ctr", table="item") == 50
    assert d("hps_lookup_batch_keys_count", model="ctr") == 3  # table queries that reached a lookup
    assert d("hps_lookup_batch_keys_sum", model="ctr") == 270
    assert d("hps_lookup_batch_keys_bucket", model="ctr", le="64.0") == 1  # the 50 item keys

    assert d("hps_level_queried_keys_total", model="ctr", level="hash_map") == 120 + 50 + 100
    assert d("hps_level_hits_total", model="ctr", level="hash_map") == 100
    assert d("hps_level_queried_keys_total", model="ctr", level="rocksdb") == 120 + 50
    assert d("hps_level_hits_total", model="ctr", level="rocksdb") == 100 + 50
    assert d("hps_level_hits_total", model="ctr", level="default") == 20
    assert d("hps_level_duration_seconds_count", model="ctr", level="hash_map") == 3
    assert d("hps_level_duration_seconds_count", model="ctr", level="rocksdb") == 2
    assert d("hps_level_duration_seconds_count", model="ctr", level="default") == 0

    # The metrics agree with the session's own per-level counts.
    counts = server.models.session("ctr").counts()
    assert counts["user"].by_level == {"rocksdb": 100, "default": 20, "hash_map": 100}
    assert value(after, "hps_model_events_total", model="ctr", event="loaded") == 1
    assert value(after, "hps_models_loaded") == 1
    assert value(after, "hps_ready") == 1


def _stream_request(truth: dict) -> hps_pb2.LookupRequest:
    keys = truth["user"][0][:3].astype("<i8").tobytes()
    return hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys)])


def test_stream_lookups_that_end_by_their_deadline_count_as_deadline_exceeded(
    metered: tuple[HpsServer, dict],
) -> None:
    server, truth = metered
    keys = truth["user"][0][:3].astype("<i8").tobytes()
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys)])
    codes = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN")

    def counted(code: str) -> float:
        labels = {"model": "ctr", "method": "StreamLookup", "code": code}
        return server.metrics.registry.get_sample_value("hps_requests_total", labels) or 0

    before = {code: counted(code) for code in codes}
    released = threading.Event()

    def one_then_wait() -> Iterator[hps_pb2.LookupRequest]:
        yield request
        released.wait(10)  # the stream stays open, the server waiting for a next request

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = channel.stream_stream("/hps.v1.LookupService/StreamLookup", hps_pb2.LookupRequest.SerializeToString)
        expired = stream(one_then_wait(), timeout=0.5)
        next(expired)  # answered; then the deadline passes while the server waits for the next request
        with pytest.raises(grpc.RpcError) as late:
            next(expired)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The outside client's repro: deadlines of 1 ms, which pass at any point of a call (or not at all).
        for _ in range(50):
            try:
                list(stream(iter([request]), timeout=0.001))
            except grpc.RpcError as short:
                assert short.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _finished(server.metrics, "StreamLookup")
        released.set()
    moved = {code: counted(code) - before[code] for code in codes}
    # None is counted as cancelled (a 1 ms call may also end before the server starts it: not counted at all).
    assert moved["CANCELLED"] == moved["UNKNOWN"] == 0, moved
    assert moved["DEADLINE_EXCEEDED"] >= 1, moved
    assert sum(moved.values()) <= 51, moved


def test_model_admin_calls_count_under_the_model_they_load_unload_or_find_served(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config()
    raw["server"]["admin"] = True
    server = HpsServer(config_module.parse(raw, tmp_path))
    server.start()
    get = server.metrics.registry.get_sample_value

    def counted(model: str, method: str, code: str) -> float:
        return get("hps_requests_total", {"model": model, "method": method, "code": code}) or 0

    entry = {"name": "m4", "max_batch_size": 8, "tables": [{"name": "t", "dim": 8, "source": str(tmp_path / "item")}]}
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.load_model(entry).name == "m4"
            with pytest.raises(AlreadyExistsError):
                client.load_model(entry)
            client.reload_model("m4")
            client.unload_model("m4")
            with pytest.raises(NotFoundError):
                client.unload_model("m4")
            with pytest.raises(NotFoundError):
                client.unload_model("never-served")
            with pytest.raises(HpsError):  # no such table files: it loads nothing
                client.load_model({**entry, "name": "m5", "tables": [{**entry["tables"][0], "source": "nowhere"}]})
            np.testing.assert_array_equal(client.lookup("ctr", "item", truth["item"][0][:2]), truth["item"][1][:2])
    finally:
        server.stop(grace=1)
    # The call that loaded m4, the one refused for it being served, the one that unloaded it: under m4.
    assert counted("m4", "LoadModel", "OK") == 1
    assert counted("m4", "LoadModel", "ALREADY_EXISTS") == 1
    assert counted("m4", "ReloadModel", "OK") == 1
    assert counted("m4", "UnloadModel", "OK") == 1
    assert get("hps_request_duration_seconds_count", {"model": "m4", "method": "UnloadModel"}) == 1
    # m4 was no longer served, and the others never were: unknown names stay bounded.
    assert counted(UNKNOWN_MODEL, "UnloadModel", "NOT_FOUND") == 2
    assert not [labels for labels in _request_labels(server) if labels["model"] not in ("ctr", "m4", UNKNOWN_MODEL)]
    assert counted(UNKNOWN_MODEL, "LoadModel", "OK") == counted(UNKNOWN_MODEL, "UnloadModel", "OK") == 0


def _request_labels(server: HpsServer) -> list[dict[str, str]]:
    """The labels of every hps_requests_total series of `server`."""
    (family,) = [f for f in server.metrics.registry.collect() if f.name == "hps_requests"]
    return [sample.labels for sample in family.samples if sample.name == "hps_requests_total"]


def test_process_metrics_failures_at_zero_and_what_each_level_holds(metered: tuple[HpsServer, dict]) -> None:
    server, truth = metered
    assert server.metrics_port is not None
    before = scrape(server.metrics_port)
    assert value(before, "process_resident_memory_bytes") > 10 * 2**20
    assert value(before, "process_open_fds") > 0
    assert ("process_cpu_seconds_total", ()) in before
    assert any(name == "python_info" for name, _ in before)
    # Every failure counter of the configured levels is there before anything failed.
    for level in ("hash_map", "rocksdb"):
        for operation in ("fetch", "insert", "evict"):
            assert ("hps_level_failures_total", (("level", level), ("operation", operation))) in before
            assert value(before, "hps_level_failures_total", level=level, operation=operation) == 0
    for table, (keys, _) in truth.items():
        assert value(before, "hps_level_rows", model="ctr", table=table, level="rocksdb") == len(keys)
        assert value(before, "hps_level_bytes", model="ctr", table=table, level="rocksdb") > 0
        assert value(before, "hps_level_rows", model="ctr", table=table, level="hash_map") == 0
    user_keys, user_vectors = truth["user"]
    with Client(f"127.0.0.1:{server.port}") as client:
        client.lookup("ctr", "user", user_keys[:100])  # misses in the hash map are written back into it
    after = scrape(server.metrics_port)
    assert value(after, "hps_level_rows", model="ctr", table="user", level="hash_map") == 100
    assert value(after, "hps_level_bytes", model="ctr", table="user", level="hash_map") >= 100 * user_vectors[0].nbytes


def test_what_redis_holds_is_scraped(redis_cluster: str, tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster, initial_cache_rate=1.0, timeout_ms=2000)
    raw["models"][0]["name"] = "scraped_redis"  # tables of its own in the shared cluster
    raw["server"]["metrics_address"] = "127.0.0.1:0"
    server = HpsServer(config_module.parse(raw, tmp_path))
    server.start()
    try:
        assert server.wait_ready(60)  # warm-up copied every row into Redis
        assert server.metrics_port is not None
        s = scrape(server.metrics_port)
    finally:
        server.stop(grace=1)
    for operation in ("fetch", "insert", "evict"):
        assert ("hps_level_failures_total", (("level", "redis_cluster"), ("operation", operation))) in s
    for table, (keys, vectors) in truth.items():
        labels = {"model": "scraped_redis", "table": table, "level": "redis_cluster"}
        assert value(s, "hps_level_rows", **labels) == len(keys)
        assert value(s, "hps_level_bytes", **labels) >= keys.nbytes + vectors.nbytes


def test_health_serving_only_when_started_and_not_serving_while_draining(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, metrics_address="127.0.0.1:0"))
    server = HpsServer(config)  # models loaded, nothing bound yet
    assert server.metrics.registry.get_sample_value("hps_ready") == 0
    assert server.metrics.registry.get_sample_value("hps_models_loaded") == 1
    port = server.start()
    target = f"127.0.0.1:{port}"
    try:
        assert healthcheck.check(target) == "SERVING"
        assert healthcheck.main([target]) == 0
        assert healthcheck.check(target, "hps.v1.Nope") == "NOT_FOUND: the server has no service 'hps.v1.Nope'"
        with pytest.raises(SystemExit):  # argparse: the option's error, exit code 2
            healthcheck.main([target, "--timeout", "-1"])
        assert value(scrape(server.metrics_port or 0), "hps_ready") == 1
        with grpc.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopping = threading.Thread(target=server.stop, kwargs={"grace": 2})
            stopping.start()
            # Watchers are told before the server stops taking calls.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopping.join(10)
        assert server.metrics.registry.get_sample_value("hps_ready") == 0
        assert healthcheck.check(target, timeout=1).startswith("UNAVAILABLE")
        assert healthcheck.main([target, "--timeout", "1"]) == 1
    finally:
        server.stop(grace=0)


def test_the_occupancy_of_tables_sharing_one_l1_is_each_tables_own(tmp_path: Path) -> None:
    """Two tables of one dim share the model's L1: each one's series counts its own rows and hits, and
    together they are the whole cache's."""
    rng = np.random.default_rng(3)
    for name, rows in (("a", 300), ("b", 120)):
        keys = rng.choice(10**6, size=rows, replace=False).astype(np.int64)
        tables.write_table(tmp_path / name, [(keys, rng.standard_normal((rows, 8), dtype=np.float32))], 8)
    raw = {
        "server": {"address": "127.0.0.1:0", "shutdown_grace_seconds": 2},
        "volatile_db": {"type": "hash_map"},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": "m",
                "gpucache": True,
                "gpucacheper": 1.0,
                "tables": [{"name": n, "dim": 8, "source": n} for n in ("a", "b")],
            }
        ],
    }
    server = HpsServer(config_module.parse(raw, tmp_path))
    server.start()
    try:
        assert server.wait_ready(30)
        session = server.models.sessions["m"]
        l1a, l1b = session.tables["a"].l1, session.tables["b"].l1
        assert l1a is not None and l1b is not None and l1a.caches == l1b.caches  # one cache, two tables
        occupancy = {o.table: o.stats for o in server.models.cache_occupancy()}
        assert occupancy == {"a": l1a.stats(), "b": l1b.stats()}
        assert occupancy["a"].rows > occupancy["b"].rows > 0
        assert occupancy["a"].rows + occupancy["b"].rows == l1a.caches[0].stats().rows
    finally:
        server.stop()
