"""Tests of the Redis Cluster level against a real cluster: contract, HPS layout, overflow, auth, failures.

Every test uses its own table names on the shared cluster; failure tests get a cluster of their own.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hps_bench.redis_cluster_launcher import NEW_KEY, RedisClusterProcesses
from hps_server.config import ConfigError, VolatileDbConfig
from hps_server.config import load as load_config
from hps_server.storage import open_volatile
from hps_server.storage.base import LevelUnavailableError, StorageError, UnknownTableError
from hps_server.storage.redis_cluster import Command, RedisClusterLevel, hash_name, partition_of
from hps_server.write_epochs import WriteEpochs

DIM = 8


@pytest.fixture
def table() -> str:
    return f"m{uuid.uuid4().hex[:8]}.t"


@pytest.fixture
def level(redis_cluster: str, table: str) -> Iterator[RedisClusterLevel]:
    lvl = RedisClusterLevel(redis_cluster, num_partitions=4, max_batch_size=64, timeout_ms=2000)
    lvl.create_table(table, DIM)
    yield lvl
    lvl.close()


def rows(keys: np.ndarray, dim: int = DIM) -> np.ndarray:
    """Vectors that encode their key, so a row served for the wrong key is caught."""
    return keys.astype(np.float32)[:, None] + np.arange(dim, dtype=np.float32)[None, :] / 100


def cluster_client(seed: str, **options: object) -> redis.RedisCluster:
    host, port = seed.split(":")
    return redis.RedisCluster(host=host, port=int(port), **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the storage contract


def test_fetch_returns_inserted_rows_and_zero_for_missing(level: RedisClusterLevel, table: str) -> None:
    keys = np.arange(-500, 500, dtype=np.int64) * 1_000_003  # negative keys and keys with zero bytes
    level.insert(table, keys, rows(keys))
    query = np.concatenate([keys[::-7], [7, 8, 9], keys[:3]])
    vectors, found = level.fetch(table, query)
    assert vectors.dtype == np.float32 and vectors.shape == (len(query), DIM)
    expected_found = np.isin(query, keys)
    np.testing.assert_array_equal(found, expected_found)
    np.testing.assert_array_equal(vectors[found], rows(query[found]))
    assert not vectors[~found].any()
    assert level.size(table) == len(keys)


def test_batches_larger_than_max_batch_size_are_chunked(level: RedisClusterLevel, table: str) -> None:
    keys = np.random.default_rng(1).choice(2**62, size=3000, replace=False).astype(np.int64)
    level.insert(table, keys, rows(keys))
    vectors, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys))


def test_many_tables_go_in_one_round_per_node(redis_cluster: str, level: RedisClusterLevel, table: str) -> None:
    names = [table, f"{table}.b", f"{table}.c"]
    for name in names[1:]:
        level.create_table(name, DIM)
    keys = np.tile(np.arange(300, dtype=np.int64) * 7919, 3)
    index = np.repeat([0, 1, 2], 300)
    vectors = rows(keys) + index[:, None].astype(np.float32) * 1000
    rounds: list[int] = []
    execute = level._execute

    def counted(commands: Sequence[Command], *, read: bool = False) -> list[Any]:
        rounds.append(len(commands))
        return execute(commands, read=read)

    level._execute = counted  # type: ignore[method-assign]
    level.insert_many(names, keys, index, vectors)
    asked = np.concatenate([keys, keys + 1])
    fetched, found = level.fetch_many(names, asked, np.concatenate([index, index]))
    # One _execute (one pipelined round per node) each, over every table's partitions and batches of 64.
    assert len(rounds) == 2
    assert rounds[1] > 3 * level.num_partitions
    np.testing.assert_array_equal(found, np.arange(len(asked)) < len(keys))
    np.testing.assert_array_equal(fetched[: len(keys)], vectors)
    for position, name in enumerate(names):
        assert level.size(name) == 300
        one, _ = level.fetch(name, keys[:300])
        np.testing.assert_array_equal(one, rows(keys[:300]) + position * 1000)
    # A second level object sees the rows where HPS would look for them.
    other = RedisClusterLevel(redis_cluster, num_partitions=4, timeout_ms=2000, read_only=True)
    try:
        other.create_table(names[2], DIM)
        assert other.contains(names[2], keys[:300]).all()
    finally:
        other.close()


def test_last_row_wins_for_a_repeated_key(level: RedisClusterLevel, table: str) -> None:
    keys = np.array([5, 6, 5, 5], dtype=np.int64)
    vectors = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)
    level.insert(table, keys, vectors)
    got, found = level.fetch(table, np.array([5, 6]))
    assert found.all()
    np.testing.assert_array_equal(got, vectors[[3, 1]])
    assert level.size(table) == 2


def test_evict_contains_size(level: RedisClusterLevel, table: str) -> None:
    keys = np.arange(100, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    assert level.evict(table, np.array([1, 2, 3, 1000])) == 3
    present = level.contains(table, np.array([0, 1, 2, 3, 4, 1000]))
    np.testing.assert_array_equal(present, [True, False, False, False, True, False])
    assert level.size(table) == 97
    _, found = level.fetch(table, np.array([1, 4]))
    np.testing.assert_array_equal(found, [False, True])


def test_dump_yields_every_row_once(level: RedisClusterLevel, table: str) -> None:
    keys = np.arange(1000, dtype=np.int64) * 3
    level.insert(table, keys, rows(keys))
    chunks = list(level.dump(table, chunk_rows=100))
    assert all(len(k) <= 100 for k, _ in chunks)
    got_keys = np.concatenate([k for k, _ in chunks])
    got_rows = np.concatenate([v for _, v in chunks])
    assert np.array_equal(np.sort(got_keys), keys)
    np.testing.assert_array_equal(got_rows, rows(got_keys))


def test_load_then_empty_calls(level: RedisClusterLevel, table: str) -> None:
    keys = np.arange(10, dtype=np.int64)
    assert level.load(table, [(keys[:5], rows(keys[:5])), (keys[5:], rows(keys[5:]))]) == 10
    empty = np.array([], dtype=np.int64)
    vectors, found = level.fetch(table, empty)
    assert vectors.shape == (0, DIM) and found.shape == (0,)
    level.insert(table, empty, np.zeros((0, DIM), np.float32))
    assert level.evict(table, empty) == 0
    assert level.size(table) == 10


def test_bad_input_is_refused_and_nothing_is_lost(level: RedisClusterLevel, table: str) -> None:
    keys = np.arange(10, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    with pytest.raises(ValueError, match="vectors"):
        level.insert(table, keys, rows(keys, DIM + 1))
    with pytest.raises(ValueError, match="keys"):
        level.fetch(table, keys.reshape(2, 5))
    vectors, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys))


def test_tables_dims_and_unknown_table(level: RedisClusterLevel, table: str) -> None:
    level.create_table(table, DIM)  # idempotent
    assert table in level.tables() and level.dim(table) == DIM
    with pytest.raises(StorageError, match="dim"):
        level.create_table(table, DIM + 1)
    with pytest.raises(UnknownTableError):
        level.fetch("nobody.nothing", np.array([1]))
    with pytest.raises(UnknownTableError):
        level.dim("nobody.nothing")


def test_opened_from_config_through_the_registry(redis_cluster: str, table: str) -> None:
    config = VolatileDbConfig(type="redis_cluster", address=redis_cluster, num_partitions=3, timeout_ms=2000)
    lvl = open_volatile(config)
    assert isinstance(lvl, RedisClusterLevel) and lvl.kind == "redis_cluster"
    try:
        lvl.create_table(table, 4)
        lvl.insert(table, np.array([1, 2]), np.ones((2, 4), np.float32))
        assert lvl.size(table) == 2
    finally:
        lvl.close()


def test_two_level_objects_share_rows(redis_cluster: str, level: RedisClusterLevel, table: str) -> None:
    """What two hps replicas on one cluster rely on: rows written by one are hits for the other."""
    other = RedisClusterLevel(redis_cluster, num_partitions=4, timeout_ms=2000, read_only=True)
    try:
        other.create_table(table, DIM)
        keys = np.arange(50, dtype=np.int64)
        level.insert(table, keys, rows(keys))
        vectors, found = other.fetch(table, keys)
        assert found.all()
        np.testing.assert_array_equal(vectors, rows(keys))
        with pytest.raises(StorageError, match="read-only"):
            other.insert(table, keys, rows(keys))
        with pytest.raises(StorageError, match="read-only"):
            other.evict(table, keys)
        assert level.size(table) == 50
    finally:
        other.close()


# ---------------------------------------------------------------- HugeCTR HPS layout


def _mixer_reference(key: int) -> int:
    """Pelle Evensen's rrxmrrxmsx_0 on one Python int, written independently of the NumPy version."""
    mask = 2**64 - 1

    def ror(x: int, n: int) -> int:
        return ((x >> n) | (x << (64 - n))) & mask

    x = key & mask
    x ^= ror(x, 25) ^ ror(x, 50)
    x = (x * 0xA24BAED4963EE407) & mask
    x ^= ror(x, 24) ^ ror(x, 49)
    x = (x * 0x9FB21C651E98DF25) & mask
    return x ^ (x >> 28)


def test_partition_matches_the_hps_mixer() -> None:
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321, 2**40 + 3], dtype=np.int64)
    for n in (1, 2, 7, 8, 16):
        expected = [_mixer_reference(int(k)) % n for k in keys]
        assert partition_of(keys, n).tolist() == expected


def test_hash_names_follow_hps() -> None:
    assert hash_name("model.table", 3, "v") == "hps_et{hps_et.model.table/p3}v"
    assert hash_name("model.table", 3, "t") == "hps_et{hps_et.model.table/p3}t"


def test_rows_sit_in_the_hps_hashes(redis_cluster: str, table: str) -> None:
    lvl = RedisClusterLevel(redis_cluster, num_partitions=5, timeout_ms=2000, overflow_policy="evict_oldest")
    client = cluster_client(redis_cluster)
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(200, dtype=np.int64) * 977 - 5000
        before = time.time_ns() // 1000
        lvl.insert(table, keys, rows(keys))
        after = time.time_ns() // 1000
        parts = partition_of(keys, 5)
        for p in range(5):
            mine = keys[parts == p]
            fields = mine.astype("<i8").view("V8").tolist()
            values = client.hmget(hash_name(table, p, "v"), fields)
            assert b"".join(values) == rows(mine).astype("<f4").tobytes()
            assert client.hlen(hash_name(table, p, "v")) == len(mine)
            times = np.frombuffer(b"".join(client.hmget(hash_name(table, p, "t"), fields)), "<i8")
            assert len(times) == len(mine) and (times >= before).all() and (times <= after).all()  # microseconds
    finally:
        client.close()
        lvl.close()


def test_a_copy_keeps_the_rows_redis_holds_and_adds_the_others_with_their_times(
    redis_cluster: str, level: RedisClusterLevel, table: str
) -> None:
    written = np.arange(0, 300, 3, dtype=np.int64)  # another server's writes: newer than any copy
    level.insert(table, written, rows(written) + 1000)
    copied = np.arange(300, dtype=np.int64)
    before = time.time_ns() // 1000
    level.copy_many([table], copied, np.zeros(len(copied), np.intp), rows(copied))
    vectors, found = level.fetch(table, copied)
    assert found.all()
    kept = np.isin(copied, written)
    np.testing.assert_array_equal(vectors[kept], rows(copied[kept]) + 1000)
    np.testing.assert_array_equal(vectors[~kept], rows(copied[~kept]))
    assert level.size(table) == 300
    client = cluster_client(redis_cluster)
    try:
        parts = partition_of(copied, 4)
        for p in range(4):
            added = copied[(parts == p) & ~kept].astype("<i8").view("V8").tolist()
            times = np.frombuffer(b"".join(client.hmget(hash_name(table, p, "t"), added)), "<i8")
            assert len(times) == len(added) and (times >= before).all()
    finally:
        client.close()


def test_serves_a_cluster_filled_in_the_hps_layout(redis_cluster: str, table: str) -> None:
    """Rows written by another HPS implementation (plain HSET in the documented layout) are served."""
    client = cluster_client(redis_cluster)
    keys = np.array([3, -4, 2**50], dtype=np.int64)
    for key, vector in zip(keys, rows(keys), strict=True):
        name = hash_name(table, int(partition_of(np.array([key]), 8)[0]), "v")
        client.hset(name, int(key).to_bytes(8, "little", signed=True), vector.astype("<f4").tobytes())
    client.close()
    lvl = RedisClusterLevel(redis_cluster, num_partitions=8, timeout_ms=2000)
    try:
        lvl.create_table(table, DIM)
        vectors, found = lvl.fetch(table, keys)
        assert found.all()
        np.testing.assert_array_equal(vectors, rows(keys))
        lvl.create_table(table + "x", DIM + 1)
    finally:
        lvl.close()


def test_rows_of_another_dim_are_an_error_not_garbage(redis_cluster: str, table: str) -> None:
    writer = RedisClusterLevel(redis_cluster, timeout_ms=2000)
    reader = RedisClusterLevel(redis_cluster, timeout_ms=2000)
    try:
        writer.create_table(table, DIM)
        reader.create_table(table, DIM * 2)
        writer.insert(table, np.array([1]), rows(np.array([1])))
        with pytest.raises(StorageError, match="float32"):
            reader.fetch(table, np.array([1]))
    finally:
        writer.close()
        reader.close()


# ---------------------------------------------------------------- overflow and TTL


def test_overflow_evict_random_keeps_the_target_per_partition(redis_cluster: str, table: str) -> None:
    lvl = RedisClusterLevel(
        redis_cluster, num_partitions=2, timeout_ms=2000, overflow_margin=100, overflow_resolution_target=0.8
    )
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(1000, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        assert lvl.size(table) == 2 * 80
        vectors, found = lvl.fetch(table, keys)
        assert found.sum() == 160
        np.testing.assert_array_equal(vectors[found], rows(keys[found]))
        counts = np.bincount(partition_of(keys[found], 2), minlength=2)
        assert counts.tolist() == [80, 80]
    finally:
        lvl.close()


def test_overflow_evict_oldest_spares_recently_read_rows(redis_cluster: str, table: str) -> None:
    lvl = RedisClusterLevel(
        redis_cluster,
        num_partitions=1,
        timeout_ms=2000,
        overflow_margin=10,
        overflow_resolution_target=0.5,
        overflow_policy="evict_oldest",
    )
    client = cluster_client(redis_cluster)
    try:
        lvl.create_table(table, DIM)
        old = np.arange(8, dtype=np.int64)
        lvl.insert(table, old, rows(old))
        lvl.fetch(table, old[[2, 5]])  # reading refreshes their access time
        new = np.arange(100, 103, dtype=np.int64)
        lvl.insert(table, new, rows(new))  # 11 rows > 10: evict the 6 oldest, keep 5
        assert lvl.size(table) == 5
        kept = np.concatenate([old, new])[lvl.contains(table, np.concatenate([old, new]))]
        assert sorted(kept.tolist()) == [2, 5, 100, 101, 102]
        assert client.hlen(hash_name(table, 0, "t")) == 5
    finally:
        client.close()
        lvl.close()


def test_evict_oldest_reads_hps_seconds_as_older_than_hps_microseconds(redis_cluster: str, table: str) -> None:
    """Access times HugeCTR HPS wrote (seconds) and ours (microseconds) are ordered together."""
    lvl = RedisClusterLevel(
        redis_cluster,
        num_partitions=1,
        timeout_ms=2000,
        overflow_margin=4,
        overflow_resolution_target=0.5,
        overflow_policy="evict_oldest",
    )
    client = cluster_client(redis_cluster)
    try:
        lvl.create_table(table, DIM)
        for key in (1, 2, 3):  # one by one: each gets its own access time
            lvl.insert(table, np.array([key]), rows(np.array([key])))
        theirs = 9  # written by HPS one second ago, in its own format
        field = theirs.to_bytes(8, "little", signed=True)
        client.hset(hash_name(table, 0, "v"), field, rows(np.array([theirs])).tobytes())
        client.hset(hash_name(table, 0, "t"), field, (int(time.time()) - 1).to_bytes(8, "little", signed=True))
        lvl.insert(table, np.array([4]), rows(np.array([4])))  # 5 rows > 4: keep the 2 newest
        assert lvl.contains(table, np.array([1, 2, 3, 4, theirs])).tolist() == [False, False, True, True, False]
    finally:
        client.close()
        lvl.close()


def test_ttl_expires_rows(redis_cluster: str, table: str) -> None:
    lvl = RedisClusterLevel(redis_cluster, num_partitions=2, timeout_ms=2000, ttl_seconds=1)
    client = cluster_client(redis_cluster)
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(20, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        ttl = client.pttl(hash_name(table, 0, "v"))
        assert 0 < ttl <= 1000
        time.sleep(0.5)
        lvl.insert(table, keys, rows(keys))  # a later write does not extend the first write's deadline
        assert client.pttl(hash_name(table, 0, "v")) <= 600
        time.sleep(0.7)
        _, found = lvl.fetch(table, keys)
        assert not found.any()
    finally:
        client.close()
        lvl.close()


# ---------------------------------------------------------------- ACL


def test_acl_user_with_password(redis_cluster_acl: RedisClusterProcesses, table: str) -> None:
    lvl = RedisClusterLevel(
        redis_cluster_acl.seed, user_name=redis_cluster_acl.user, password=redis_cluster_acl.password, timeout_ms=2000
    )
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(30, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        vectors, found = lvl.fetch(table, keys)
        assert found.all()
        np.testing.assert_array_equal(vectors, rows(keys))
    finally:
        lvl.close()


# What docs/security.md tells operators to grant hps's Redis user: its own keys and the commands it uses.
LEAST_PRIVILEGE_ACL = (
    "~hps_et*",
    "+hmget", "+hset", "+hsetnx", "+eval", "+hdel", "+hgetall", "+hlen", "+hrandfield", "+hscan", "+del", "+expire",
    "+info", "+cluster|info", "+cluster|slots", "+cluster|shards", "+asking", "+command", "+ping",
)  # fmt: skip


def test_acl_user_limited_to_hps_keys_and_commands(redis_cluster_acl: RedisClusterProcesses, table: str) -> None:
    cluster = redis_cluster_acl
    for port in cluster.ports:  # ACL users are per node
        with cluster.client(port) as node:
            node.execute_command("ACL", "SETUSER", "hps-least", "reset", "on", ">least-s3cret", *LEAST_PRIVILEGE_ACL)
    lvl = RedisClusterLevel(
        cluster.seed,
        user_name="hps-least",
        password="least-s3cret",
        num_partitions=4,
        ttl_seconds=3600,
        overflow_margin=50,
        overflow_policy="evict_oldest",
        timeout_ms=2000,
    )
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(200, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))  # overflow: HLEN, access times, eviction
        vectors, found = lvl.fetch(table, keys)
        assert 0 < found.sum() <= 4 * 50
        np.testing.assert_array_equal(vectors[found], rows(keys[found]))
        assert lvl.contains(table, keys).sum() == found.sum() == lvl.size(table)
        assert sum(len(chunk[0]) for chunk in lvl.dump(table)) == lvl.size(table)
        assert lvl.evict(table, keys) == found.sum() and lvl.size(table) == 0
        lvl.copy_many([table], keys[:10], np.zeros(10, np.intp), rows(keys[:10]))  # a warm-up's, a write-back's
        np.testing.assert_array_equal(lvl.fetch(table, keys[:10])[0], rows(keys[:10]))
    finally:
        lvl.close()
    client = cluster_client(cluster.seed, username="hps-least", password="least-s3cret")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("not-an-hps-key", b"1")
    finally:
        client.close()


def test_wrong_password_is_a_configuration_error(redis_cluster_acl: RedisClusterProcesses) -> None:
    with pytest.raises(ConfigError, match=r"volatile_db\.user_name/password"):
        RedisClusterLevel(redis_cluster_acl.seed, user_name=redis_cluster_acl.user, password="wrong", timeout_ms=2000)
    with pytest.raises(ConfigError, match=r"volatile_db\.user_name/password"):
        RedisClusterLevel(redis_cluster_acl.seed, timeout_ms=2000)  # no password at all


def test_bad_address_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"volatile_db\.address"):
        RedisClusterLevel("localhost")


def _served(lvl: RedisClusterLevel, table: str) -> None:
    """The level stores and returns rows (over whatever connection it was given)."""
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(40, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        vectors, found = lvl.fetch(table, keys)
        assert found.all()
        np.testing.assert_array_equal(vectors, rows(keys))
    finally:
        lvl.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that signed none of the clusters' certificates."""
    folder = tmp_path_factory.mktemp("other-ca")
    command = f"req -x509 {NEW_KEY} -keyout ca.key -out ca.crt -days 2 -subj /CN=not-the-redis-ca"
    subprocess.run(["openssl", *command.split()], cwd=folder, check=True, capture_output=True, timeout=60)
    return folder / "ca.crt"


def test_tls_with_the_clusters_ca_and_hostname_check(redis_cluster_tls: RedisClusterProcesses, table: str) -> None:
    lvl = RedisClusterLevel(redis_cluster_tls.seed, tls=True, tls_ca_file=redis_cluster_tls.ca_file, timeout_ms=2000)
    assert lvl.available and lvl.failures == 0
    _served(lvl, table)


@pytest.mark.parametrize("ca", ["other", "system"])
def test_tls_refuses_a_certificate_of_another_ca_as_a_configuration_error(
    redis_cluster_tls: RedisClusterProcesses, other_ca: Path, ca: str
) -> None:
    ca_file = other_ca if ca == "other" else None  # None: the system's trust store, which lacks the test CA
    with pytest.raises(ConfigError, match=r"^volatile_db\.tls_ca_file: .* does not verify") as error:
        RedisClusterLevel(redis_cluster_tls.seed, tls=True, tls_ca_file=ca_file, password="pw-s3cret", timeout_ms=2000)
    message = str(error.value)
    assert "self-signed certificate" in message or "unable to get local issuer" in message
    assert str(other_ca.parent) not in message and "pw-s3cret" not in message


def test_tls_files_that_do_not_load_name_the_key_not_the_path(redis_cluster_mtls: RedisClusterProcesses) -> None:
    cluster = redis_cluster_mtls
    for options, key in [
        ({"tls_ca_file": cluster.root / "missing.crt"}, "tls_ca_file: cannot load it: No such file"),
        ({"tls_ca_file": cluster.client_key_file}, "tls_ca_file: cannot load it"),  # a key, not a certificate
        ({"tls_cert_file": cluster.client_cert_file, "tls_key_file": cluster.root / "tls" / "node.key"}, "KEY_VALUES"),
    ]:
        with pytest.raises(ConfigError, match=key) as error:
            RedisClusterLevel(cluster.seed, tls=True, timeout_ms=2000, **options)  # type: ignore[arg-type]
        assert str(cluster.root) not in str(error.value)


def test_mtls_with_the_client_certificate(redis_cluster_mtls: RedisClusterProcesses, table: str) -> None:
    cluster = redis_cluster_mtls
    lvl = RedisClusterLevel(
        cluster.seed,
        tls=True,
        tls_ca_file=cluster.ca_file,
        tls_cert_file=cluster.client_cert_file,
        tls_key_file=cluster.client_key_file,
        tls_check_hostname=False,  # the nodes' certificate names redis.hps.test, not 127.0.0.1
        timeout_ms=2000,
    )
    _served(lvl, table)


def test_mtls_without_a_client_certificate_is_refused_by_the_cluster(
    redis_cluster_mtls: RedisClusterProcesses, table: str
) -> None:
    cluster = redis_cluster_mtls
    lvl = RedisClusterLevel(
        cluster.seed, tls=True, tls_ca_file=cluster.ca_file, tls_check_hostname=False, timeout_ms=2000
    )
    try:
        assert not lvl.available and lvl.failures == 1
        lvl.create_table(table, DIM)
        with pytest.raises(LevelUnavailableError):
            lvl.fetch(table, np.array([1]))
    finally:
        lvl.close()


def test_hostname_check_refuses_a_certificate_for_another_name(redis_cluster_mtls: RedisClusterProcesses) -> None:
    cluster = redis_cluster_mtls
    with pytest.raises(ConfigError, match=r"^volatile_db\.tls_check_hostname: .*not valid for '127\.0\.0\.1'"):
        RedisClusterLevel(
            cluster.seed,
            tls=True,
            tls_ca_file=cluster.ca_file,
            tls_cert_file=cluster.client_cert_file,
            tls_key_file=cluster.client_key_file,
            timeout_ms=2000,
        )


def test_ps_json_tls_keys_reach_the_cluster(
    redis_cluster_mtls: RedisClusterProcesses, table: str, tmp_path: Path
) -> None:
    cluster = redis_cluster_mtls
    ps = {
        "volatile_db": {
            "type": "redis_cluster",
            "address": cluster.seed,
            "enable_tls": True,
            "tls_ca_certificate": str(cluster.ca_file),
            "tls_client_certificate": str(cluster.client_cert_file),
            "tls_client_key": str(cluster.client_key_file),
            "tls_check_hostname": False,
            "timeout_ms": 2000,
        },
        "models": [{"model": "m", "sparse_files": ["t"], "embedding_vecsize_per_table": [DIM]}],
    }
    (tmp_path / "ps.json").write_text(json.dumps(ps))
    level = open_volatile(load_config(tmp_path / "ps.json").volatile_db)
    assert isinstance(level, RedisClusterLevel)
    _served(level, table)


# ---------------------------------------------------------------- failures


def _wait_until_serving(lvl: RedisClusterLevel, table: str, keys: np.ndarray, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            lvl.insert(table, keys, rows(keys))
            vectors, found = lvl.fetch(table, keys)
            assert found.all()
            np.testing.assert_array_equal(vectors, rows(keys))
            return
        except LevelUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_master_killed_under_load_never_serves_wrong_rows(disposable_redis_cluster: RedisClusterProcesses) -> None:
    cluster = disposable_redis_cluster
    lvl = RedisClusterLevel(cluster.seed, num_partitions=16, timeout_ms=300)
    table = "m.t"
    lvl.create_table(table, DIM)
    keys = np.arange(5000, dtype=np.int64) * 13
    lvl.insert(table, keys, rows(keys))
    cluster.wait_replicated()  # Redis replicates asynchronously: rows a replica never got are lost on failover
    stop = threading.Event()
    outcomes = {"served": 0, "unavailable": 0}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def look_up(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            query = rng.choice(keys, 500)
            try:
                vectors, found = lvl.fetch(table, query)
            except LevelUnavailableError:
                with lock:
                    outcomes["unavailable"] += 1
                time.sleep(0.01)
                continue
            except BaseException as e:  # anything else fails the test below
                errors.append(e)
                return
            if not np.array_equal(vectors[found], rows(query[found])) or vectors[~found].any():
                errors.append(AssertionError("wrong rows served"))
                return
            with lock:
                outcomes["served"] += 1

    threads = [threading.Thread(target=look_up, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        served_before = outcomes["served"]
        cluster.kill_node(cluster.masters_ports()[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not errors:
            time.sleep(0.1)
            if lvl.failures and lvl.available and outcomes["served"] > served_before + 20:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert lvl.failures > 0 and outcomes["unavailable"] > 0
    assert served_before > 0 and outcomes["served"] > served_before + 20, outcomes
    vectors, found = lvl.fetch(table, keys)  # after failover the promoted replica serves its rows
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys))
    lvl.close()


def test_whole_cluster_down_fails_fast_and_recovers(disposable_redis_cluster: RedisClusterProcesses) -> None:
    cluster = disposable_redis_cluster
    lvl = RedisClusterLevel(cluster.seed, num_partitions=8, timeout_ms=200)
    table = "m.t"
    lvl.create_table(table, DIM)
    keys = np.arange(100, dtype=np.int64)
    lvl.insert(table, keys, rows(keys))
    cluster.stop_all()
    with pytest.raises(LevelUnavailableError):
        lvl.fetch(table, keys)
    assert lvl.failures == 1 and not lvl.available
    for _ in range(100):  # while down, calls fail at once: none goes to the network (no new failure)
        with pytest.raises(LevelUnavailableError):
            lvl.fetch(table, keys)
    assert lvl.failures == 1
    cluster.start_all()
    _wait_until_serving(lvl, table, keys)  # the same level object, never recreated
    assert lvl.available
    lvl.close()


def test_a_paused_node_costs_one_timeout_then_recovers(disposable_redis_cluster: RedisClusterProcesses) -> None:
    cluster = disposable_redis_cluster
    lvl = RedisClusterLevel(cluster.seed, num_partitions=8, timeout_ms=200)
    table = "m.t"
    lvl.create_table(table, DIM)
    keys = np.arange(100, dtype=np.int64)
    lvl.insert(table, keys, rows(keys))
    port = cluster.masters_ports()[0]
    cluster.pause_node(port)
    try:
        with pytest.raises(LevelUnavailableError):
            lvl.fetch(table, keys)
        assert lvl.failures == 1
    finally:
        cluster.resume_node(port)
    _wait_until_serving(lvl, table, keys)
    lvl.close()


def test_a_group_worker_reads_nothing_a_failed_write_of_the_writer_may_have_left_stale(
    disposable_redis_cluster: RedisClusterProcesses,
) -> None:
    """The record of which keys a failed write may have left stale is the writer's: a worker's level (its
    own connections to the same cluster) serves none of Redis's rows until the writer has dropped them."""
    cluster = disposable_redis_cluster
    epochs = WriteEpochs(1)  # as the group's shared ones, in this process
    writer, worker = (RedisClusterLevel(cluster.seed, num_partitions=4, timeout_ms=200) for _ in range(2))
    for lvl in (writer, worker):
        lvl.serve_as_cache()
        lvl.create_table("m.t", DIM)
    writer.share_staleness(None, epochs.mark_volatile_stale)
    worker.share_staleness(epochs.volatile_stale, None)
    keys = np.arange(50, dtype=np.int64)
    try:
        writer.insert("m.t", keys, rows(keys))
        masters = cluster.masters_ports()
        for port in masters:
            cluster.pause_node(port)
        try:
            with pytest.raises(LevelUnavailableError):  # the session acknowledges it once RocksDB has it
                writer.insert("m.t", keys, rows(keys) + 1)
        finally:
            for port in masters:
                cluster.resume_node(port)
        assert epochs.volatile_stale()
        deadline = time.monotonic() + 30
        while epochs.volatile_stale():  # until the writer's repair (its watch, or its next read)
            try:
                _, found = worker.fetch("m.t", keys)
                assert not found.any(), "a worker served a row the writer's failed write may have left stale"
            except LevelUnavailableError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _, found = worker.fetch("m.t", keys)
        assert not found.any()  # dropped: the next lookup refills from the level below
    finally:
        writer.close()
        worker.close()


def test_unreachable_at_start_serves_once_the_cluster_answers(disposable_redis_cluster: RedisClusterProcesses) -> None:
    cluster = disposable_redis_cluster
    cluster.stop_all()
    lvl = RedisClusterLevel(cluster.addresses, num_partitions=4, timeout_ms=200)
    try:
        lvl.create_table("m.t", DIM)
        with pytest.raises(LevelUnavailableError):
            lvl.fetch("m.t", np.array([1]))
        cluster.start_all()
        _wait_until_serving(lvl, "m.t", np.arange(10, dtype=np.int64))
    finally:
        lvl.close()


# ---------------------------------------------------------------- resharding and invalidation


def _node_id(client: redis.Redis) -> str:
    return client.execute_command("CLUSTER MYID").decode()


def test_lookups_during_a_slot_migration_follow_ask_and_moved(
    redis_cluster_processes: RedisClusterProcesses, level: RedisClusterLevel, table: str
) -> None:
    """A table's slot migrated hash by hash (ASK while half-moved, MOVED after) under lookups and inserts:
    every lookup succeeds and is exact."""
    cluster = redis_cluster_processes
    keys = np.arange(4000, dtype=np.int64) * 7_919
    level.insert(table, keys, rows(keys))
    parts = level._tables[table]
    slot = parts.slots[0]
    owners = {port: cluster.client(port) for port in cluster.masters_ports()}  # one client per master, closed below
    try:
        source = next(p for p, c in owners.items() if c.execute_command("CLUSTER COUNTKEYSINSLOT", slot))
        target = next(p for p in owners if p != source)
        errors: list[BaseException] = []
        lookups = [0]
        stop = threading.Event()

        def keep_looking_up() -> None:
            while not stop.is_set():
                try:
                    vectors, found = level.fetch(table, keys)
                    assert found.all()
                    np.testing.assert_array_equal(vectors, rows(keys))
                    level.insert(table, keys[:100], rows(keys[:100]))
                except BaseException as e:  # a failed or wrong lookup fails the test
                    errors.append(e)
                    return
                lookups[0] += 1

        thread = threading.Thread(target=keep_looking_up)
        thread.start()
        try:
            src, dst = owners[source], owners[target]
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", _node_id(src))
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", _node_id(dst))
            for name in (parts.values[0], parts.times[0]):
                before = lookups[0]
                src.execute_command("MIGRATE", "127.0.0.1", target, name, 0, 5000)
                deadline = time.monotonic() + 10
                while lookups[0] < before + 3 and not errors and time.monotonic() < deadline:
                    time.sleep(0.01)  # lookups while the slot is half moved: ASK
            for client in owners.values():
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", _node_id(dst))
            before = lookups[0]
            deadline = time.monotonic() + 10
            while lookups[0] < before + 3 and not errors and time.monotonic() < deadline:
                time.sleep(0.01)  # lookups after: MOVED
        finally:
            stop.set()
            thread.join()
        assert not errors, errors[0]
        assert level.failures == 0
        assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 2
    finally:
        for client in owners.values():
            client.close()


def test_a_failed_write_is_invalidated_before_the_next_read(
    disposable_redis_cluster: RedisClusterProcesses, table: str
) -> None:
    """Writes while the cluster is frozen may or may not land; once it answers, their keys are dropped
    before any read, and past the bound the whole table is."""
    cluster = disposable_redis_cluster
    lvl = RedisClusterLevel(cluster.seed, num_partitions=4, timeout_ms=300)
    lvl.serve_as_cache()
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(1000, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        for port in cluster.ports:
            cluster.pause_node(port)
        with pytest.raises(LevelUnavailableError):
            lvl.insert(table, keys[:10], rows(keys[:10]) + 1)  # times out: outcome unknown
        with pytest.raises(LevelUnavailableError):
            lvl.evict(table, keys[10:20])  # fails fast
        for port in cluster.ports:
            cluster.resume_node(port)
        deadline = time.monotonic() + 30
        while not lvl.available:
            assert time.monotonic() < deadline, "the level did not come back"
            time.sleep(0.05)
        _, found = lvl.fetch(table, keys)
        np.testing.assert_array_equal(found, keys >= 20)
    finally:
        for port in cluster.ports:
            cluster.resume_node(port)
        lvl.close()


def test_past_the_bound_the_whole_table_is_flushed(
    redis_cluster: str, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hps_server.storage.redis_cluster.STALE_KEYS_BOUND", 5)
    lvl = RedisClusterLevel(redis_cluster, num_partitions=4, timeout_ms=2000)
    lvl.serve_as_cache()
    try:
        lvl.create_table(table, DIM)
        keys = np.arange(100, dtype=np.int64)
        lvl.insert(table, keys, rows(keys))
        parts = lvl._tables[table]
        lvl._record_stale([parts], keys[:3], np.zeros(3, dtype=np.intp))
        _, found = lvl.fetch(table, keys)
        np.testing.assert_array_equal(found, keys >= 3)  # only the recorded keys
        lvl._record_stale([parts], keys[:10], np.zeros(10, dtype=np.intp))
        assert lvl.size(table) == 0  # 10 keys > bound: the whole table
        lvl.insert(table, keys, rows(keys))
        assert lvl.contains(table, keys).all()  # flushed once, not for ever
    finally:
        lvl.close()
