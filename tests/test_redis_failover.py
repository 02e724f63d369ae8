"""hps servers over a real Redis Cluster and RocksDB, end to end over gRPC, while Redis nodes fail.

Redis failing must never fail an RPC or change an answer: lookups fall through to RocksDB and Redis is
used again once it is back, without restarting hps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_client import Client, UnavailableError
from hps_server import config as config_module
from hps_server.server import HpsServer
from hps_server.storage.redis_cluster import RedisClusterLevel, hash_name, partition_of
from tests.conftest import ServedModel, sample_config, write_sample_tables

REDIS = "redis_cluster"
MAX_KEYS = 256  # per request: max_batch_size 64 x max_keys_per_sample 4 in sample_config


def _serve(directory: Path, cluster: RedisClusterProcesses) -> ServedModel:
    directory.mkdir(parents=True, exist_ok=True)
    truth = write_sample_tables(directory)
    config = sample_config(directory, type=REDIS, address=cluster.seed, timeout_ms=300, num_partitions=8)
    server = HpsServer(config)
    port = server.start()
    return ServedModel(server, f"127.0.0.1:{port}", config, truth)


@pytest.fixture
def served_over_redis(tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses) -> Iterator[ServedModel]:
    served = _serve(tmp_path / "server", disposable_redis_cluster)
    yield served
    served.server.stop(grace=1)


def _redis_hits(served: ServedModel, table: str = "user") -> int:
    return served.server.models.sessions["ctr"].counts()[table].by_level.get(REDIS, 0)


def _wait_for_redis_hits(served: ServedModel, client: Client, keys: np.ndarray, timeout: float = 30) -> None:
    """Looks up until the Redis level answers again (hit counter moves), checking every reply."""
    deadline = time.monotonic() + timeout
    while True:
        before = _redis_hits(served)
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        if _redis_hits(served) > before:
            return
        assert time.monotonic() < deadline, "the Redis level was not used again"
        time.sleep(0.1)


def test_master_killed_while_clients_look_up(
    served_over_redis: ServedModel, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    served, cluster = served_over_redis, disposable_redis_cluster
    keys = served.truth["user"][0]
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys[:MAX_KEYS])
    errors: list[BaseException] = []
    replies = [0]
    stop = threading.Event()

    def keep_looking_up(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(served.target, timeout=10) as client:
            while not stop.is_set():
                query = rng.choice(keys[:1000], 200)
                try:
                    got = client.lookup("ctr", "user", query)
                    np.testing.assert_array_equal(got, served.expected("user", query))
                except BaseException as e:  # any failed RPC or wrong row fails the test
                    errors.append(e)
                    return
                replies[0] += 1

    threads = [threading.Thread(target=keep_looking_up, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        cluster.kill_node(cluster.masters_ports()[0])
        deadline = time.monotonic() + 30
        level = served.server.models.volatile
        while time.monotonic() < deadline and not errors:
            time.sleep(0.1)
            if getattr(level, "failures", 0) and getattr(level, "available", False):
                break
        during = replies[0]
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert getattr(served.server.models.volatile, "failures", 0) > 0
    assert replies[0] > during > 0
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys[:MAX_KEYS])


def test_whole_cluster_down_then_back(
    served_over_redis: ServedModel, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    served, cluster = served_over_redis, disposable_redis_cluster
    keys = served.truth["user"][0][:MAX_KEYS]
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys)
        cluster.stop_all()
        level = served.server.models.volatile
        assert level is not None
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        failures = level.failures
        for _ in range(5):  # answered from RocksDB, correctly, without asking Redis again each time
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        assert level.failures == failures
        counts = served.server.models.sessions["ctr"].counts()["user"]
        assert counts.unavailable > 0
        cluster.start_all()
        _wait_for_redis_hits(served, client, keys)  # same server process, never restarted


def test_two_servers_share_rows_through_the_cluster(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    first = _serve(tmp_path / "first", redis_cluster_processes)
    second = _serve(tmp_path / "second", redis_cluster_processes)
    try:
        keys = first.truth["user"][0][:MAX_KEYS]
        with Client(first.target, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), first.expected("user", keys))
        assert _redis_hits(first) == 0  # the first server found them in RocksDB and wrote them back
        with Client(second.target, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), second.expected("user", keys))
        assert _redis_hits(second) == len(keys)  # ... so they are hits for the second
    finally:
        first.server.stop(grace=1)
        second.server.stop(grace=1)


def test_server_starts_while_redis_is_down(tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses) -> None:
    """Redis down at start (with warm-up asked for) is no reason not to serve: RocksDB answers until it is back."""
    cluster = disposable_redis_cluster
    cluster.stop_all()
    directory = tmp_path / "server"
    directory.mkdir()
    truth = write_sample_tables(directory)
    config = sample_config(directory, type=REDIS, address=cluster.addresses, timeout_ms=300, initial_cache_rate=1.0)
    server = HpsServer(config)
    served = ServedModel(server, f"127.0.0.1:{server.start()}", config, truth)
    try:
        keys = truth["user"][0][:MAX_KEYS]
        with Client(served.target, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
            cluster.start_all()
            _wait_for_redis_hits(served, client, keys)
    finally:
        server.stop(grace=1)


def test_read_only_replica_reads_what_another_server_wrote(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    writer = _serve(tmp_path / "writer", redis_cluster_processes)
    directory = tmp_path / "reader"
    directory.mkdir()
    truth = write_sample_tables(directory)
    config = sample_config(directory, type=REDIS, address=redis_cluster_processes.seed, timeout_ms=300, read_only=True)
    server = HpsServer(config)
    reader = ServedModel(server, f"127.0.0.1:{server.start()}", config, truth)
    try:
        keys = truth["user"][0][:MAX_KEYS]
        with Client(reader.target, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), reader.expected("user", keys))
        assert _redis_hits(reader) == 0  # found in RocksDB; a read-only replica writes nothing back
        with Client(writer.target, timeout=10) as client:
            client.lookup("ctr", "user", keys)  # the writer fills Redis
        with Client(reader.target, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), reader.expected("user", keys))
        assert _redis_hits(reader) == len(keys)
    finally:
        writer.server.stop(grace=1)
        server.stop(grace=1)


def test_without_a_persistent_level_a_redis_outage_is_unavailable(
    tmp_path: Path, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    """Redis as the only level: while it is down no level can say a key is absent, so no default is made up."""
    cluster = disposable_redis_cluster
    raw = {
        "server": {"address": "127.0.0.1:0"},
        "volatile_db": {"type": REDIS, "address": cluster.seed, "timeout_ms": 300, "num_partitions": 8},
        "persistent_db": {"type": "disabled"},
        "models": [{"name": "ctr", "gpucache": False, "tables": [{"name": "user", "dim": 4}]}],
    }
    server = HpsServer(config_module.parse(raw, tmp_path))
    port = server.start()
    keys = np.arange(10, dtype=np.int64)
    vectors = np.repeat(keys[:, None], 4, axis=1).astype(np.float32)
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            client.upsert("ctr", "user", keys, vectors)
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), vectors)
            cluster.stop_all()
            with pytest.raises(UnavailableError, match="table user: 10 keys missed every reachable level"):
                client.lookup("ctr", "user", keys)
            with pytest.raises(UnavailableError):
                client.upsert("ctr", "user", keys, vectors)
            cluster.start_all()
            deadline = time.monotonic() + 30
            while True:  # the same server answers again once Redis is back (restarted empty: no persistence)
                try:
                    client.upsert("ctr", "user", keys, vectors)
                    break
                except UnavailableError:
                    assert time.monotonic() < deadline, "Redis was not used again"
                    time.sleep(0.2)
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), vectors)
    finally:
        server.stop(grace=1)


def _written(served: ServedModel, keys: np.ndarray, vectors: np.ndarray, deleted: np.ndarray) -> None:
    """Updates the served model's truth with an acknowledged upsert of `keys` and delete of `deleted`."""
    stored, rows = served.truth["user"]
    rows = rows.copy()
    order = np.argsort(stored)
    rows[order[np.searchsorted(stored, keys, sorter=order)]] = vectors
    kept = ~np.isin(stored, deleted)
    served.truth["user"] = (stored[kept], rows[kept])


def _assert_redis_agrees(served: ServedModel, cluster: RedisClusterProcesses, keys: np.ndarray) -> None:
    """No `}v` hash of the table holds a row other than the acknowledged one, nor a deleted key."""
    level = served.server.models.volatile
    assert isinstance(level, RedisClusterLevel)
    name = served.config.model("ctr").storage_name(served.config.model("ctr").table("user"))
    parts = partition_of(keys, level.num_partitions)
    expected = served.expected("user", keys)
    present = np.isin(keys, served.truth["user"][0])
    host, port = cluster.seed.split(":")
    with redis.RedisCluster(host=host, port=int(port)) as client:
        for p in range(level.num_partitions):
            mine = np.flatnonzero(parts == p)
            values = client.hmget(hash_name(name, p, "v"), keys[mine].astype("<i8").view("V8").tolist())
            held = np.array([value is not None for value in values], bool)
            assert present[mine[held]].all(), "a deleted key is back in Redis"
            rows = np.frombuffer(b"".join(v for v in values if v is not None), "<f4").reshape(-1, expected.shape[1])
            np.testing.assert_array_equal(rows, expected[mine[held]])


def test_writes_while_redis_is_frozen_succeed_and_are_never_contradicted(
    served_over_redis: ServedModel, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    """Upserts and Deletes with every Redis node frozen are acknowledged (RocksDB has them); once Redis
    answers again (holding the old rows), it serves neither an old row nor a deleted one."""
    served, cluster = served_over_redis, disposable_redis_cluster
    keys = served.truth["user"][0][:MAX_KEYS]
    new = np.full((100, 16), 7.5, np.float32)
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys)  # Redis holds the first rows
        for port in cluster.ports:
            cluster.pause_node(port)
        try:
            client.upsert("ctr", "user", keys[:100], new)
            client.delete("ctr", "user", keys[100:150])
            _written(served, keys[:100], new, keys[100:150])
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        finally:
            for port in cluster.ports:
                cluster.resume_node(port)
        _wait_for_redis_hits(served, client, keys)
        _assert_redis_agrees(served, cluster, keys)


def test_cluster_restarted_from_an_old_snapshot_serves_no_older_row(
    served_over_redis: ServedModel, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    """Every node killed and restarted from a snapshot taken before an Upsert and a Delete: the new run
    ids make hps flush the table's partitions, so neither the old rows nor the deleted ones are served."""
    served, cluster = served_over_redis, disposable_redis_cluster
    keys = served.truth["user"][0][:MAX_KEYS]
    new = np.full((100, 16), -3.25, np.float32)
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys)
        for port in cluster.masters_ports():
            with cluster.client(port) as node:
                node.save()  # the snapshot holds the first rows
        client.upsert("ctr", "user", keys[:100], new)
        client.delete("ctr", "user", keys[100:150])
        _written(served, keys[:100], new, keys[100:150])
        cluster.stop_all()
        cluster.start_all()  # the masters load the old snapshot
        for _ in range(3):
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), served.expected("user", keys))
        _wait_for_redis_hits(served, client, keys)
        _assert_redis_agrees(served, cluster, keys)


def test_a_live_redis_cli_reshard_under_load_fails_no_lookup(
    served_over_redis: ServedModel, disposable_redis_cluster: RedisClusterProcesses
) -> None:
    """`redis-cli --cluster reshard` moves a slot holding a partition of the table to another master while
    clients look up and write it: every lookup succeeds and is exact, and Redis keeps answering."""
    served, cluster = served_over_redis, disposable_redis_cluster
    keys = served.truth["user"][0][:MAX_KEYS]
    expected = served.expected("user", keys)
    level = served.server.models.volatile
    assert isinstance(level, RedisClusterLevel)
    name = served.config.model("ctr").storage_name(served.config.model("ctr").table("user"))
    errors: list[BaseException] = []
    lookups = [0]
    stop = threading.Event()

    def keep_looking_up() -> None:
        with Client(served.target, timeout=10) as client:
            while not stop.is_set():
                try:
                    np.testing.assert_array_equal(client.lookup("ctr", "user", keys), expected)
                    client.upsert("ctr", "user", keys[:32], expected[:32])  # writes go on through it too
                except BaseException as e:  # a failed or wrong lookup fails the test
                    errors.append(e)
                    return
                lookups[0] += 1

    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys)
    threads = [threading.Thread(target=keep_looking_up) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        during = lookups[0]
        _, moved = cluster.reshard(level._tables[name].slots)
        during = lookups[0] - during  # lookups made while the slots moved
        before = lookups[0]
        deadline = time.monotonic() + 10
        while lookups[0] < before + 5 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert moved >= 1 and during > 0
    assert level.failures == 0
    with Client(served.target, timeout=10) as client:
        _wait_for_redis_hits(served, client, keys)  # Redis answers from the slot's new master
