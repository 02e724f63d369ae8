"""Cross-replica updates: two hps servers, each with its own RocksDB and L1, sharing a real Redis Cluster and
its update stream; an Upsert or Delete on one reaches the other's L1 and RocksDB, also across a paused
stream node and after a gap (messages trimmed away before a slow replica read them).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import yaml

from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_bench.servers import free_port
from hps_client import Client
from hps_client.feed import UpdatePublisher
from hps_server import config as config_module
from hps_server import storage, tables, transfer
from hps_server import updates as updates_module
from hps_server.server import HpsServer
from hps_server.updates import single_connection
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import ServedModel, sample_raw_config, serve_command, write_sample_tables

MAX_KEYS = 256  # per request: max_batch_size 64 x max_keys_per_sample 4 in sample_raw_config


def serve_replica(
    directory: Path,
    cluster: RedisClusterProcesses,
    stream: str,
    user_version: str = "",
    admin: bool = False,
    **updates: object,
) -> ServedModel:
    """A server with an L1 holding every row, over the shared cluster and its own RocksDB; `user_version`: the
    user table's version it serves (imported first, the unversioned rows + 100); `admin`: server.admin."""
    directory.mkdir(parents=True, exist_ok=True)
    truth = write_sample_tables(directory)
    raw = sample_raw_config(type="redis_cluster", address=cluster.seed, timeout_ms=300)
    raw["server"]["admin"] = admin
    raw["models"][0].update(gpucache=True, gpucacheper=1.0, hit_rate_threshold=1.0)
    raw["updates"] = {"stream": stream, "block_ms": 200, **updates}
    if user_version:
        keys, vectors = truth["user"]
        truth["user"] = (keys, vectors + 100)
        tables.write_table(directory / "user_new", [truth["user"]], vectors.shape[1])
        level = storage.open_persistent(config_module.parse(raw, directory).persistent_db)
        assert level is not None
        try:
            transfer.import_table(level, f"ctr.user@{user_version}", directory / "user_new", 16, progress=False)
        finally:
            level.close()
        (user,) = [t for t in raw["models"][0]["tables"] if t["name"] == "user"]
        user["version"] = user_version
        del user["source"]
    config = config_module.parse(raw, directory)
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    return ServedModel(server, f"127.0.0.1:{port}", config, truth)


def _connected(served: ServedModel) -> None:
    feed = served.server.models.updates
    assert feed is not None
    assert feed.connected.wait(10), "the update stream never answered"


@contextlib.contextmanager
def serving_replicas(
    directory: Path,
    cluster: RedisClusterProcesses,
    stream: str,
    a: Mapping[str, Any] | None = None,
    b: Mapping[str, Any] | None = None,
) -> Iterator[tuple[ServedModel, ServedModel]]:
    """Replicas A and B (serve_replica with `a` and `b` as their options) in folders a and b of `directory`,
    each connected to the stream; stopped at exit."""
    served: list[ServedModel] = []
    try:
        for name, options in (("a", a), ("b", b)):
            served.append(serve_replica(directory / name, cluster, stream, **(options or {})))
        for replica in served:
            _connected(replica)
        yield served[0], served[1]
    finally:
        for replica in served:
            replica.server.stop(grace=1)


@pytest.fixture
def stream() -> str:
    return f"hps_updates_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def replicas(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses, stream: str
) -> Iterator[list[ServedModel]]:
    redis_cluster_processes.flush()  # rows other tests wrote under the same table names
    with serving_replicas(tmp_path, redis_cluster_processes, stream) as served:
        yield list(served)


def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def _answers(client: Client, keys: np.ndarray, vectors: np.ndarray) -> bool:
    return bool(np.array_equal(client.lookup("ctr", "user", keys), vectors))


def test_upsert_and_delete_on_one_replica_reach_the_others_l1_and_rocksdb(replicas: list[ServedModel]) -> None:
    a, b = replicas
    keys = a.truth["user"][0][:MAX_KEYS]
    new = np.random.default_rng(1).standard_normal((len(keys), 16), dtype=np.float32)
    with Client(a.target) as client_a, Client(b.target) as client_b:
        assert _answers(client_b, keys, b.expected("user", keys))  # B's L1 now holds the old rows
        assert _answers(client_b, keys, b.expected("user", keys))
        session_b = b.server.models.sessions["ctr"]
        assert session_b.cache_stats()["user"].rows >= len(keys)

        client_a.upsert("ctr", "user", keys, new)
        _until(lambda: _answers(client_b, keys, new))
        hits = session_b.cache_stats()["user"].hits
        assert _answers(client_b, keys, new)
        assert session_b.cache_stats()["user"].hits == hits + len(keys)  # refreshed in B's L1, not dropped
        persistent = b.server.models.persistent
        assert persistent is not None
        # B's own RocksDB gets the rows too (after its L1, which B's readers see first).
        _until(lambda: np.array_equal(persistent.fetch("ctr.user", keys)[0], new))

        client_a.delete("ctr", "user", keys[:10])
        _until(lambda: not client_b.lookup_tables("ctr", {"user": keys[:10]})["user"].found.any())
        _until(lambda: not persistent.fetch("ctr.user", keys[:10])[1].any())
        assert _answers(client_b, keys[10:], new[10:])
    registry = b.server.metrics.registry
    assert registry.get_sample_value("hps_update_rows_total", {"source": "replica"}) == len(keys) + 10
    assert registry.get_sample_value("hps_update_lag_seconds_count") >= 2
    assert registry.get_sample_value("hps_update_gaps_total") == 0


def test_a_replica_paused_with_the_stream_node_catches_up_and_serves_no_stale_row(
    tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses, stream: str
) -> None:
    cluster = disposable_redis_cluster
    with serving_replicas(tmp_path, cluster, stream) as (a, b):
        keys = a.truth["user"][0][:MAX_KEYS]
        new = np.full((len(keys), 16), 7.0, np.float32)
        owner = int(redis.RedisCluster("127.0.0.1", cluster.ports[0]).get_node_from_key(stream).port)
        with Client(a.target) as client_a, Client(b.target) as client_b:
            assert _answers(client_b, keys, b.expected("user", keys))
            cluster.pause_node(owner)  # both replicas lose the stream; A's Upsert is acknowledged anyway
            try:
                t0 = time.monotonic()
                client_a.upsert("ctr", "user", keys, new)
                assert _answers(client_a, keys, new)
                print("T upsert", time.monotonic() - t0)
            finally:
                cluster.resume_node(owner)
            _until(lambda: _answers(client_b, keys, new), timeout=20)
            print("T caught", time.monotonic() - t0)
            for _ in range(5):  # and it stays so
                assert _answers(client_b, keys, new)


@pytest.fixture
def short_stream(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses, stream: str
) -> Iterator[list[ServedModel]]:
    """Replicas A and B over a stream trimmed to 8 messages, B reading 2 at a time: held up, B falls behind
    the trimmed stream (a gap)."""
    redis_cluster_processes.flush()
    with serving_replicas(
        tmp_path, redis_cluster_processes, stream, a={"max_len": 8}, b={"max_len": 8, "read_count": 2}
    ) as served:
        yield list(served)


def test_a_replica_that_fell_behind_the_trimmed_stream_drops_its_copies(short_stream: list[ServedModel]) -> None:
    a, b = short_stream
    keys = a.truth["user"][0][:MAX_KEYS]
    session_b = b.server.models.sessions["ctr"]
    feed_b = b.server.models.updates
    assert feed_b is not None
    with Client(a.target) as client_a, Client(b.target) as client_b:
        assert _answers(client_b, keys, b.expected("user", keys))
        table_b = session_b.table("user")
        with table_b.lock:  # B is slow: it cannot apply anything while A writes
            for i in range(200):
                client_a.upsert("ctr", "user", keys[i % 4 : i % 4 + 1], np.full((1, 16), i, np.float32))
            client_a.upsert("ctr", "user", keys, np.full((len(keys), 16), 9.0, np.float32))
        _until(lambda: feed_b.gaps > 0, timeout=5)
        _until(lambda: _answers(client_b, keys, np.full((len(keys), 16), 9.0, np.float32)))


def test_a_replica_that_missed_a_delete_copies_none_of_its_rocksdb_rows_into_the_shared_redis(
    short_stream: list[ServedModel],
) -> None:
    a, b = short_stream
    keys = a.truth["user"][0]
    deleted, filler = keys[:64], keys[-4:]
    feed_b = b.server.models.updates
    assert feed_b is not None
    with Client(a.target) as client_a, Client(b.target) as client_b:
        with b.server.models.sessions["ctr"].table("user").lock:  # B is slow: the delete is trimmed away
            for i in range(300):
                if i == 100:
                    client_a.delete("ctr", "user", deleted)
                client_a.upsert("ctr", "user", filler[i % 4 : i % 4 + 1], np.full((1, 16), i, np.float32))
        _until(lambda: feed_b.gaps > 0, timeout=5)
        # B's own RocksDB never saw the delete (the documented limit of a gap) ...
        assert _answers(client_b, deleted, b.expected("user", deleted))
        time.sleep(0.3)  # any write-back of B's has landed
        # ... but it wrote none of those rows into the Redis A reads: A still answers the delete.
        absent = client_a.lookup("ctr", "user", np.array([2**62 + 5]))
        assert _answers(client_a, deleted, np.repeat(absent, len(deleted), axis=0))


def test_a_failover_of_the_stream_master_drops_copies_and_updates_flow_again(
    tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    cluster = disposable_redis_cluster
    seed = redis.RedisCluster("127.0.0.1", cluster.ports[0])
    # A stream on the seed node the servers are configured with: they must find the cluster without it.
    stream = next(
        name
        for name in (f"hps_updates_{i}" for i in range(1000))
        if seed.get_node_from_key(name).port == cluster.ports[0]
    )
    with serving_replicas(tmp_path, cluster, stream) as (a, b):
        keys = a.truth["user"][0][:MAX_KEYS]
        feed_b = b.server.models.updates
        assert feed_b is not None
        with Client(a.target) as client_a, Client(b.target) as client_b:
            assert _answers(client_b, keys, b.expected("user", keys))
            cluster.kill_node(cluster.ports[0])
            _until(lambda: feed_b.gaps > 0, timeout=30)  # B found the stream on the promoted replica
            new = np.full((len(keys), 16), 3.0, np.float32)
            client_a.upsert("ctr", "user", keys, new)
            _until(lambda: _answers(client_b, keys, new), timeout=30)


def test_a_restarted_stream_master_is_a_gap_but_no_trimmed_stream_and_write_backs_go_on(
    tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole cluster restarts empty and A publishes into the new stream before B reconnects: B drops its
    copies for the change of master, but does not take the new stream's missing old entry for a trimmed
    stream, so its RocksDB is not taken as having missed updates and it still copies its rows into Redis;
    A's write reaches B's RocksDB."""
    cluster = disposable_redis_cluster
    with serving_replicas(tmp_path, cluster, stream) as (a, b):
        keys = a.truth["user"][0][:MAX_KEYS]
        feed_b = b.server.models.updates
        assert feed_b is not None
        with Client(a.target) as client_a, Client(b.target) as client_b:
            client_a.upsert("ctr", "user", keys[:1], np.full((1, 16), 1.0, np.float32))
            _until(lambda: _answers(client_b, keys[:1], np.full((1, 16), 1.0, np.float32)))
            # B reads up to A's message; while the cluster is down, it cannot reconnect until A published again.
            connect, reconnect = feed_b._connect_master, threading.Event()
            feed_b._connect_master = lambda timeout: reconnect.wait() and connect(timeout)  # type: ignore[method-assign]
            cluster.stop_all()
            cluster.start_all()
            new = np.full((len(keys), 16), 5.0, np.float32)
            client_a.upsert("ctr", "user", keys, new)
            seed = redis.RedisCluster("127.0.0.1", cluster.ports[0])
            _until(lambda: seed.xlen(stream) > 0, timeout=30)
            reconnect.set()
            persistent_b = b.server.models.persistent
            assert persistent_b is not None
            _until(lambda: np.array_equal(persistent_b.fetch("ctr.user", keys)[0], new), timeout=30)
        assert feed_b.gaps >= 1
        assert not any("trimmed" in record.getMessage() for record in caplog.records)
        assert not b.server.models.sessions["ctr"].levels[-1].missed_updates


def test_replicas_serving_other_versions_of_a_table_do_not_take_each_others_writes(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses, stream: str
) -> None:
    """A serves version v2 of user, B the unversioned rows (a rolling version change half done): a write on
    either reaches the other's copies of its own version only; a trainer's batch naming no version reaches
    both; item, unversioned on both, takes both replicas' writes."""
    redis_cluster_processes.flush()
    with serving_replicas(tmp_path, redis_cluster_processes, stream, a={"user_version": "v2"}) as (a, b):
        keys = a.truth["user"][0][:4]
        with Client(a.target) as client_a, Client(b.target) as client_b:
            assert _answers(client_a, keys, a.expected("user", keys))  # v2: the rows + 100
            assert _answers(client_b, keys, b.expected("user", keys))
            client_a.upsert("ctr", "user", keys[:2], np.full((2, 16), 42.0, np.float32))
            client_b.upsert("ctr", "user", keys[2:], np.full((2, 16), 43.0, np.float32))
            item = a.truth["item"][0][:2]
            client_a.upsert("ctr", "item", item, np.full((2, 8), 7.0, np.float32))
            seven = np.full((2, 8), 7.0, np.float32)
            _until(lambda: np.array_equal(client_b.lookup("ctr", "item", item), seven))  # B read A's messages
            time.sleep(0.3)  # and B's by A
            assert _answers(client_b, keys[:2], b.expected("user", keys[:2]))
            assert _answers(client_a, keys[2:], a.expected("user", keys[2:]))
            publisher = UpdatePublisher(redis_cluster_processes.seed, stream=stream)
            publisher.upsert("ctr", "user", keys, np.full((4, 16), 9.0, np.float32))
            publisher.close()
            for client in (client_a, client_b):
                _until(lambda client=client: _answers(client, keys, np.full((4, 16), 9.0, np.float32)))


def test_a_model_loaded_after_others_wrote_it_copies_none_of_its_older_rows_into_the_shared_redis(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses, stream: str
) -> None:
    """A unloads the model; B deletes rows of it meanwhile; A loads it again from its RocksDB, which never saw
    the delete. A serves its own older rows (the documented limit), but copies none into the Redis B reads:
    the deleted rows do not come back for B."""
    redis_cluster_processes.flush()
    with serving_replicas(tmp_path, redis_cluster_processes, stream, a={"admin": True}) as (a, b):
        feed_a = a.server.models.updates
        assert feed_a is not None
        deleted = a.truth["user"][0][:8]
        entry = sample_raw_config()["models"][0]  # A's model as served, its rows already in A's RocksDB
        entry.update(gpucache=True, gpucacheper=1.0, hit_rate_threshold=1.0)
        for table in entry["tables"]:
            del table["source"]
        with Client(a.target) as client_a, Client(b.target) as client_b:
            client_a.unload_model("ctr")
            assert client_b.delete("ctr", "user", deleted) == len(deleted)
            _until(lambda: "ctr" in feed_a.missed_models)
            client_a.load_model(entry)
            client_a.lookup("ctr", "user", deleted)  # A's own rows: its RocksDB never saw the delete
            time.sleep(0.3)  # any write-back of A's has landed
            assert not client_b.lookup_tables("ctr", {"user": deleted})["user"].found.any()


def test_a_worker_group_applies_other_replicas_writes_and_publishes_its_own(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses, stream: str
) -> None:
    """`hps serve --processes 2` beside a one-process replica: the group's writer reads the stream for its
    workers (each worker's L1 refreshed), and publishes what its workers take."""
    redis_cluster_processes.flush()
    single = serve_replica(tmp_path / "single", redis_cluster_processes, stream)
    _connected(single)
    folder = tmp_path / "group"
    folder.mkdir()
    write_sample_tables(folder)
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster_processes.seed, timeout_ms=300)
    raw["models"][0].update(gpucache=True, gpucacheper=1.0, hit_rate_threshold=1.0)
    raw["updates"] = {"stream": stream, "block_ms": 200}
    port = free_port()
    raw["server"].update(address=f"127.0.0.1:{port}", shutdown_grace_seconds=2)
    config = folder / "hps.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = folder / "group.log"
    group = subprocess.Popen(serve_command(config, "--processes", "2"), stderr=log.open("w"))
    try:
        _until(lambda: "serving 2 workers" in log.read_text() or group.poll() is not None, timeout=120)
        assert group.poll() is None, log.read_text()
        target = f"127.0.0.1:{port}"
        keys = single.truth["user"][0][:MAX_KEYS]
        new = np.random.default_rng(7).standard_normal((len(keys), 16), dtype=np.float32)

        request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])

        def every_worker_answers(vectors: np.ndarray) -> bool:
            # Fresh connections, each with a subchannel of its own: the kernel spreads them over both workers.
            for _ in range(8):
                with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    reply = hps_pb2_grpc.LookupServiceStub(channel).Lookup(request, timeout=30)
                if not np.array_equal(np.frombuffer(reply.results[0].vectors, "<f4").reshape(vectors.shape), vectors):
                    return False
            return True

        assert every_worker_answers(single.expected("user", keys))  # the workers' L1 hold the old rows
        with Client(single.target) as client:
            client.upsert("ctr", "user", keys, new)
        _until(lambda: every_worker_answers(new))
        back = new + 1
        with Client(target) as client:
            client.upsert("ctr", "user", keys, back)
        with Client(single.target) as client:
            _until(lambda: _answers(client, keys, back))
    finally:
        group.terminate()
        group.wait(60)
        single.server.stop(grace=1)


def test_a_stream_connection_whose_socket_was_lost_fails_instead_of_reconnecting(
    redis_cluster_processes: RedisClusterProcesses,
) -> None:
    port = redis_cluster_processes.ports[0]
    connection = single_connection("127.0.0.1", port, 2.0)
    assert connection.ping()
    redis_cluster_processes.client(port).client_kill_filter(_id=connection.client_id())
    with pytest.raises(redis.ConnectionError):  # it may be a restarted, empty server: the reader re-checks
        connection.ping()
    with pytest.raises(redis.ConnectionError):
        connection.ping()
    connection.close()


def test_writes_never_published_by_shutdown_fail_the_servers_close(
    tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = disposable_redis_cluster
    monkeypatch.setattr(updates_module, "FINAL_PUBLISH_SECONDS", 1.0)
    served = serve_replica(tmp_path, cluster, stream)
    _connected(served)
    keys = served.truth["user"][0][:8]
    for port in cluster.ports:  # the stream answers no one; the Upsert is acknowledged anyway
        cluster.pause_node(port)
    try:
        with Client(served.target) as client:
            client.upsert("ctr", "user", keys, np.full((len(keys), 16), 5.0, np.float32))
        served.server.stop(grace=1)
    finally:
        for port in cluster.ports:
            cluster.resume_node(port)
    assert served.server.close_failure is not None
    assert "1 messages of this server's acknowledged writes were never published" in served.server.close_failure


def test_a_publishing_failure_is_logged_without_the_rows_raw_bytes() -> None:
    quoted = redis.ConnectionError(
        "Command # 1 (XADD s * keys \x00\x07)\xff\n origin o) of pipeline caused error: Timeout"
    )
    assert updates_module._printable(quoted) == "Command # 1 (XADD ...) of pipeline caused error: Timeout"


def test_a_replica_started_later_from_older_files_does_not_overwrite_newer_rows_in_the_shared_redis(
    tmp_path: Path, replicas: list[ServedModel], redis_cluster_processes: RedisClusterProcesses, stream: str
) -> None:
    a, _ = replicas
    keys = a.truth["user"][0][:MAX_KEYS]
    new = np.full((len(keys), 16), 9.0, np.float32)
    with Client(a.target) as client_a:
        client_a.upsert("ctr", "user", keys, new)  # into A's RocksDB and the shared Redis
    # A new replica: its own RocksDB ingested from the same (now older) files, warming all of Redis.
    directory = tmp_path / "late"
    directory.mkdir()
    write_sample_tables(directory)
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster_processes.seed, timeout_ms=300)
    raw["volatile_db"]["initial_cache_rate"] = 1.0
    raw["updates"] = {"stream": stream, "block_ms": 200}
    late = HpsServer(config_module.parse(raw, directory))
    late.start()
    try:
        assert late.wait_ready(30)
        volatile = late.models.volatile
        assert volatile is not None
        rows, found = volatile.fetch("ctr.user", keys)
        assert found.all()
        np.testing.assert_array_equal(rows, new)  # the warm-up copied only the keys Redis did not hold
        others = a.truth["user"][0][MAX_KEYS : 2 * MAX_KEYS]
        rows, found = volatile.fetch("ctr.user", others)
        assert found.all()
        np.testing.assert_array_equal(rows, a.truth["user"][1][MAX_KEYS : 2 * MAX_KEYS])
    finally:
        late.stop(grace=1)
