"""The update feed: a trainer's batches appended to the Redis Stream (hps_client.feed, `hps push`) reach
every level of the servers reading it (L1, Redis, RocksDB), with a real `hps serve` and a real cluster.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_bench.servers import free_port, hps_server
from hps_client import Client
from hps_client.feed import UpdatePublisher
from hps_server import tables
from hps_server.storage.redis_cluster import RedisClusterLevel
from hps_server.storage.rocksdb import RocksDBLevel
from tests.conftest import sample_raw_config, write_sample_tables
from tests.test_updates import MAX_KEYS, serve_replica


def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)


def _hps_push(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hps_server.cli", "push", "--config", str(config), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_published_rows_are_applied_in_l1_in_place(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    stream = f"hps_feed_{uuid.uuid4().hex[:8]}"
    served = serve_replica(tmp_path / "a", redis_cluster_processes, stream)
    try:
        keys = served.truth["item"][0][:MAX_KEYS]
        new = np.random.default_rng(3).standard_normal((len(keys), 8), dtype=np.float32)
        session = served.server.models.sessions["ctr"]
        with Client(served.target) as client, UpdatePublisher(redis_cluster_processes.seed, stream=stream) as feed:
            client.lookup("ctr", "item", keys)  # into L1
            assert feed.upsert("ctr", "item", keys, new) == 1
            _until(lambda: np.array_equal(client.lookup("ctr", "item", keys), new))
            hits = session.cache_stats()["item"].hits
            np.testing.assert_array_equal(client.lookup("ctr", "item", keys), new)
            assert session.cache_stats()["item"].hits == hits + len(keys)
            feed.delete("ctr", "item", keys[:5])
            _until(lambda: not client.lookup_tables("ctr", {"item": keys[:5]})["item"].found.any())
            with pytest.raises(ValueError, match="vectors: contains NaN"):
                feed.upsert("ctr", "item", keys[:1], np.full((1, 8), np.nan, np.float32))
            with pytest.raises(ValueError, match=r"vectors: expected \[2, dim\]"):
                feed.upsert("ctr", "item", keys[:2], new[:1])
            # A batch of the wrong dim for the server (the publisher knows no dims) is skipped, and counted;
            # the batches after it are applied.
            assert feed.upsert("ctr", "item", keys[:1], np.ones((1, 4), np.float32)) == 1
            assert feed.upsert("ctr", "item", keys[5:6], np.full((1, 8), 2.0, np.float32)) == 1
            _until(lambda: np.array_equal(client.lookup("ctr", "item", keys[5:6]), np.full((1, 8), 2.0, np.float32)))
            np.testing.assert_array_equal(client.lookup("ctr", "item", keys[:1]), client.lookup("ctr", "item", [-1]))
            skipped = served.server.metrics.registry.get_sample_value("hps_update_skipped_messages_total")
            assert skipped == 1
    finally:
        served.server.stop(grace=1)


def test_hps_push_of_a_table_folder_reaches_every_level_of_hps_serve(
    tmp_path: Path, redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    truth = write_sample_tables(tmp_path)
    port = free_port()
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster_processes.seed, timeout_ms=300)
    raw["server"]["address"] = f"127.0.0.1:{port}"
    raw["models"][0].update(gpucache=True, gpucacheper=1.0)
    raw["updates"] = {"stream": f"hps_feed_{uuid.uuid4().hex[:8]}", "block_ms": 200}
    config = tmp_path / "hps.yaml"
    config.write_text(yaml.safe_dump(raw))
    old_keys = truth["user"][0][:100]
    keys = np.concatenate([old_keys, np.arange(10**7, 10**7 + 100)])  # rows changed, and rows new to the table
    vectors = np.random.default_rng(5).standard_normal((len(keys), 16), dtype=np.float32)
    tables.write_table(tmp_path / "update", [(keys, vectors)], 16)
    with hps_server(config, port) as target, Client(target) as client:
        client.lookup("ctr", "user", old_keys)  # into L1
        pushed = _hps_push(config, "--table", "user", "--source", str(tmp_path / "update"), "--rows-per-message", "64")
        assert pushed.returncode == 0, pushed.stderr
        assert "pushed 200 rows" in pushed.stdout and "in 4 messages" in pushed.stdout
        _until(lambda: np.array_equal(client.lookup("ctr", "user", keys), vectors))
        redis_level = RedisClusterLevel(redis_cluster_processes.seed)
        try:
            redis_level.create_table("ctr.user", 16)
            _until(lambda: np.array_equal(redis_level.fetch("ctr.user", keys)[0], vectors))  # after L1 and RocksDB
        finally:
            redis_level.close()
    rocksdb = RocksDBLevel(tmp_path / "rocksdb", read_only=True)  # the server has stopped
    try:
        rows, found = rocksdb.fetch("ctr.user", keys)
        assert found.all()
        np.testing.assert_array_equal(rows, vectors)
    finally:
        rocksdb.close()


def test_hps_push_without_a_stream_is_a_config_error(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    config = tmp_path / "hps.yaml"
    config.write_text(yaml.safe_dump(sample_raw_config()))  # hash_map, no updates.address
    pushed = _hps_push(config, "--table", "user", "--source", str(tmp_path / "user"))
    assert pushed.returncode == 2
    assert "updates: no stream to push to" in pushed.stderr
