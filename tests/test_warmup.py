"""Start-time warm-up over real levels: volatile and L1 filled to initial_cache_rate, readiness after it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_bench.servers import free_port
from hps_server import storage, warmup
from hps_server.cache.placement import build_caches
from hps_server.config import ModelConfig, PersistentDbConfig, TableConfig, VolatileDbConfig
from hps_server.server import HpsServer
from hps_server.session import LookupSession
from hps_server.storage.hashmap import HashMapLevel
from hps_server.storage.rocksdb import RocksDBLevel
from tests.conftest import TABLE_SPECS, sample_config, write_sample_tables

MODEL = ModelConfig(name="m", tables=(TableConfig(name="t", dim=4),), gpucacheper=0.1, max_batch_size=8)


def _levels(tmp_path: Path, rows: int) -> tuple[HashMapLevel, RocksDBLevel]:
    volatile = HashMapLevel()
    persistent = RocksDBLevel.from_config(PersistentDbConfig(path=tmp_path / "db"))
    for level in (volatile, persistent):
        level.create_table("m.t", 4)
    keys = np.arange(rows, dtype=np.int64)
    persistent.insert("m.t", keys, np.repeat(keys[:, None], 4, axis=1).astype(np.float32))
    return volatile, persistent


def test_first_rows_stops_at_the_budget(tmp_path: Path) -> None:
    _, persistent = _levels(tmp_path, 1000)
    chunks = list(warmup.first_rows(persistent, "m.t", 150))
    assert sum(len(k) for k, _ in chunks) == 150
    assert list(warmup.first_rows(persistent, "m.t", 0)) == []
    persistent.close()


def test_warm_fills_the_volatile_level_and_l1_to_the_rate(tmp_path: Path) -> None:
    volatile, persistent = _levels(tmp_path, 1000)
    session = LookupSession(MODEL, [volatile, persistent], build_caches(MODEL, [volatile, persistent]))
    warmup.warm([session], volatile, persistent, 0.5, threading.Event())
    assert volatile.size("m.t") == 500
    l1 = session.table("t").l1
    assert l1 is not None
    (cache,) = l1.caches
    keys, vectors, _ = cache.dump()
    assert 0 < keys.size <= cache.capacity
    assert volatile.contains("m.t", keys).all()  # L1 was filled from the volatile level, the highest with rows
    np.testing.assert_array_equal(vectors, np.repeat(keys[:, None], 4, axis=1))
    session.close()
    persistent.close()


def test_a_volatile_level_that_is_down_is_passed_over_and_l1_warms_from_rocksdb(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, persistent = _levels(tmp_path, 1000)
    down = storage.open_volatile(VolatileDbConfig(type="redis_cluster", address=f"127.0.0.1:{free_port()}"))
    assert down is not None
    down.create_table("m.t", 4)
    session = LookupSession(MODEL, [down, persistent], build_caches(MODEL, [down, persistent]))
    with caplog.at_level(logging.INFO, logger="hps_server.warmup"):
        warmup.warm([session], down, persistent, 0.5, threading.Event())
    l1 = session.table("t").l1
    assert l1 is not None
    keys, vectors, _ = l1.caches[0].dump()
    assert keys.size > 0
    np.testing.assert_array_equal(vectors, np.repeat(keys[:, None], 4, axis=1))
    assert "warmed m.t: " in caplog.text and "rows in L1 (from rocksdb)" in caplog.text
    assert not any(record.exc_info for record in caplog.records)
    session.close()
    down.close()
    persistent.close()


def test_warm_stops_when_asked(tmp_path: Path) -> None:
    volatile, persistent = _levels(tmp_path, 1000)
    session = LookupSession(MODEL, [volatile, persistent])
    stop = threading.Event()
    stop.set()
    warmup.warm([session], volatile, persistent, 1.0, stop)
    assert volatile.size("m.t") == 0
    persistent.close()


def test_server_reports_serving_once_warm(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    server = HpsServer(sample_config(tmp_path, initial_cache_rate=1.0))
    port = server.start()
    try:
        assert server.wait_ready(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert server.models.volatile is not None
        for table, (rows, _, _) in TABLE_SPECS.items():
            assert server.models.volatile.size(f"ctr.{table}") == rows
    finally:
        server.stop(grace=1)


class _PausingDump(RocksDBLevel):
    """Real RocksDB whose dump waits after reading each chunk, so an upsert can land mid warm-up."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read = threading.Event()
        self.resume = threading.Event()

    def dump(self, table: str, chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in super().dump(table, chunk_rows):
            self.read.set()
            self.resume.wait(timeout=10)
            yield chunk


def test_warm_up_never_overwrites_a_newer_upsert(tmp_path: Path) -> None:
    volatile = HashMapLevel()
    persistent = _PausingDump(tmp_path / "db")
    for level in (volatile, persistent):
        level.create_table("m.t", 4)
    keys = np.arange(100, dtype=np.int64)
    persistent.insert("m.t", keys, np.zeros((100, 4), np.float32))
    session = LookupSession(MODEL, [volatile, persistent])
    warming = threading.Thread(target=warmup.warm, args=([session], volatile, persistent, 1.0, threading.Event()))
    warming.start()
    assert persistent.read.wait(timeout=10)  # warm-up holds the old rows in hand
    session.upsert("t", np.array([5]), np.ones((1, 4), np.float32))
    persistent.resume.set()
    warming.join()
    np.testing.assert_array_equal(volatile.fetch("m.t", np.array([5]))[0], np.ones((1, 4), np.float32))
    persistent.close()
