"""Starts the servers a benchmark measures as child processes, so client and server don't share a GIL.

Process plumbing (free ports, readiness through gRPC health checks, clean shutdown) and the one model
folder every server benchmark serves from.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_server import tables as table_files


def write_served_model(
    directory: Path,
    port: int,
    model: str,
    tables: Mapping[str, tuple[np.ndarray, np.ndarray, int]],
    max_batch_size: int,
) -> Path:
    """Writes each table (keys, vectors, max keys per sample) in HPS format and a config serving them on
    127.0.0.1:port from a warm in-process hash map over RocksDB, without L1; returns the config path."""
    for name, (keys, vectors, _) in tables.items():
        table_files.write_table(directory / name, [(keys, vectors)], vectors.shape[1])
    config = {
        "server": {"address": f"127.0.0.1:{port}"},
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": model,
                "max_batch_size": max_batch_size,
                "gpucache": False,
                "tables": [
                    {"name": name, "dim": vectors.shape[1], "source": name, "max_keys_per_sample": per_sample}
                    for name, (_, vectors, per_sample) in tables.items()
                ],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    """Waits until the server at `target` reports SERVING; raises if the process dies first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server process exited with {process.returncode} before serving")
            with contextlib.suppress(grpc.RpcError):
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{target} not serving after {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def hps_server(config: Path, port: int) -> Iterator[str]:
    """`hps serve --config` in a child process (config must listen on 127.0.0.1:port); yields its target."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_server.cli", "--log-level", "WARNING", "serve", "--config", str(config)]
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process)
        yield target
    finally:
        _stop(process)


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """The raw-bytes echo baseline in a child process; yields its target."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.echo_server"], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)
