"""RocksDB failing under a running server: writes refused cleanly (UNAVAILABLE, no server path in the
message or the log), a removed data folder never acknowledged into, a failed final flush a non-zero exit.

Faults are real: the folder is made immutable with chattr (root ignores permission bits) or removed."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hps_client import Client, UnavailableError
from hps_server import config as config_module
from hps_server.server import WRITES_HEALTH_NAME, HpsServer
from hps_server.storage.base import LevelUnavailableError
from hps_server.storage.rocksdb import RECOVER_SECONDS, RocksDBLevel
from tests.conftest import sample_config, write_sample_config, write_sample_tables


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """No file can be created in or removed from `folder` while inside, for root too."""
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _server(tmp_path: Path) -> tuple[HpsServer, str, Path]:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, metrics_address="127.0.0.1:0"))
    server = HpsServer(config)
    port = server.start()
    return server, f"127.0.0.1:{port}", config.persistent_db.path


def _writes_failing(server: HpsServer) -> float | None:
    """hps_level_writes_failing{level="rocksdb"} as /metrics serves it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hps_level_writes_failing" and sample.labels == {"level": "rocksdb"}:
                return sample.value
    return None


def _health(target: str, service: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _eventually(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within 10 s (the server checks its write path once a second)."""
    for _ in range(200):
        if condition():
            return True
        threading.Event().wait(0.05)
    return False


def _fill(client: Client, start: int, rows: int = 20_000) -> None:
    keys = np.arange(start, start + rows)
    client.upsert("ctr", "user", keys, np.ones((rows, 16), np.float32))


def test_a_failing_disk_makes_writes_unavailable_without_paths_then_they_recover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, target, folder = _server(tmp_path)
    try:
        with Client(target) as client, immutable(folder):
            with pytest.raises(UnavailableError) as refused:
                for batch in range(60):  # enough rows to need a new log or table file
                    _fill(client, 10**7 + batch * 20_000)
            message = str(refused.value)
            assert "rocksdb: write failed" in message and "<rocksdb folder>" in message
            assert str(folder) not in message and str(tmp_path) not in message
            keys = np.array([10**7, 10**7 + 1])
            assert client.lookup("ctr", "user", keys).shape == (2, 16)  # reads are still answered
            assert _writes_failing(server) == 1.0
            # Clients see the write path failed: its own health name and DescribeModel; reads stay SERVING.
            assert _eventually(lambda: _health(target, WRITES_HEALTH_NAME) == "NOT_SERVING")
            assert _health(target, "") == "SERVING" and _health(target, "hps.v1.LookupService") == "SERVING"
            refused = client.describe("ctr").writes_refused
            assert refused.startswith("rocksdb: writes failing: write failed:") and str(tmp_path) not in refused
        # The fault fixed, the write path recovers without a restart and without a write asking (the level
        # reopens the database).
        assert _eventually(lambda: _health(target, WRITES_HEALTH_NAME) == "SERVING")
        with Client(target) as client:
            assert client.describe("ctr").writes_refused == ""
            _fill(client, 9 * 10**7, 10)
            got = client.lookup_tables("ctr", {"user": np.arange(9 * 10**7, 9 * 10**7 + 10)})["user"]
            assert got.found.all()
            np.testing.assert_array_equal(got.vectors, np.ones((10, 16), np.float32))
        assert _writes_failing(server) == 0.0
        assert not any(str(tmp_path) in record.getMessage() for record in caplog.records)
    finally:
        server.stop(grace=1)


def test_writes_into_a_removed_data_folder_are_refused_not_acknowledged(tmp_path: Path) -> None:
    server, target, folder = _server(tmp_path)
    try:
        with Client(target) as client:
            _fill(client, 10**7, 10)
            assert client.describe("ctr").writes_refused == ""
            shutil.rmtree(folder)
            assert "data folder was removed or replaced" in client.describe("ctr").writes_refused
            with pytest.raises(UnavailableError, match="data folder was removed or replaced"):
                _fill(client, 2 * 10**7, 10)
            with pytest.raises(UnavailableError, match="data folder was removed or replaced"):
                client.delete("ctr", "user", [10**7])
    finally:
        server.stop(grace=1)


def test_sync_writes_is_read_from_config_and_used(tmp_path: Path) -> None:
    raw = {"persistent_db": {"path": "db", "sync_writes": True}, "models": []}
    config = config_module.parse(raw, tmp_path)
    assert config.persistent_db.sync_writes
    from hps_server.storage.rocksdb import RocksDBLevel

    level = RocksDBLevel.from_config(config.persistent_db)
    try:
        assert level._write_options.sync
        level.create_table("m.t", 2)
        level.insert("m.t", np.array([1]), np.ones((1, 2), np.float32))
        assert level.size("m.t") == 1
    finally:
        level.close()


def test_a_failed_final_flush_makes_hps_serve_exit_non_zero(tmp_path: Path) -> None:
    path, _ = write_sample_config(tmp_path, "127.0.0.1:0", shutdown_grace_seconds=1)
    folder = tmp_path / "rocksdb"
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE_AND_REPORT_PORT, str(path), str(port_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3000):
            if port_file.exists() and port_file.read_text():
                break
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            subprocess.run(["sleep", "0.01"], check=True)
        with Client(f"127.0.0.1:{port_file.read_text()}") as client:
            _fill(client, 10**7, 100)  # in the memtable: the final flush has to write it
        with immutable(folder):
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1
        assert "closing the levels failed" in stderr and "final flush failed" in stderr
        assert str(tmp_path) not in stderr
    finally:
        if process.poll() is None:
            process.kill()


# Serves a config like `hps serve` (serve() and its exit code) and writes the port it bound to a file.
_SERVE_AND_REPORT_PORT = """
import logging, sys
from pathlib import Path
from hps_server import config, server
logging.basicConfig(level=logging.INFO)
original = server.HpsServer.start
def start(self):
    port = original(self)
    Path(sys.argv[2]).write_text(str(port))
    return port
server.HpsServer.start = start
sys.exit(server.serve(config.load(sys.argv[1])))
"""


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`: a real file system that runs out of room."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill_disk(disk: Path) -> Path:
    """Writes a file until the disk has no room left; the file."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(bytes(1 << 16))
            out.flush()
    return filler


def test_reads_go_on_while_a_full_disk_refuses_the_reopen_after_failed_writes(tmp_path: Path) -> None:
    """A full disk still takes an empty file, so the level reopens after a failed write; the reopen's own
    files do not fit. Reads go on from the rows acknowledged before (the database opened read-only), writes
    stay refused with the first failure's reason, and both work again once there is room."""
    with small_disk(tmp_path / "disk") as disk:
        level = RocksDBLevel(disk / "db")
        try:
            keys = np.arange(2000, dtype=np.int64)
            rows = np.random.default_rng(5).standard_normal((keys.size, 16), dtype=np.float32)
            level.create_table("m.t", 16)
            level.insert("m.t", keys, rows)
            filler = _fill_disk(disk)
            for attempt in range(3):  # the write that fails, then the reopens it leads to
                with pytest.raises(LevelUnavailableError, match="rocksdb: write"):
                    level.insert("m.t", keys, rows + attempt + 1)
                got, found = level.fetch("m.t", keys)
                assert found.all()
                np.testing.assert_array_equal(got, rows)
                time.sleep(RECOVER_SECONDS)
            assert level.write_failure is not None and "No space" in level.write_failure
            filler.unlink()
            level.insert("m.t", keys, rows + 10)
            assert level.write_failure is None
            np.testing.assert_array_equal(level.fetch("m.t", keys)[0], rows + 10)
        finally:
            level.close()
        reopened = RocksDBLevel(disk / "db")
        np.testing.assert_array_equal(reopened.fetch("m.t", keys)[0], rows + 10)
        reopened.close()
