"""`hps serve` as a process: serves a ps.json with no import step, then drains and exits on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_client import Client, HpsError
from tests.conftest import TABLE_SPECS, write_sample_tables


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(target: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(target)


def test_ps_json_is_served_directly_and_sigterm_drains(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    port = _free_port()
    ps = {
        "supportlonglong": True,
        "server": {"address": f"127.0.0.1:{port}", "shutdown_grace_seconds": 5},
        "persistent_db": {"type": "rocks_db", "path": str(tmp_path / "rocksdb")},
        "models": [
            {
                "model": "ctr",
                "sparse_files": list(TABLE_SPECS),
                "embedding_table_names": list(TABLE_SPECS),
                "embedding_vecsize_per_table": [dim for _, dim, _ in TABLE_SPECS.values()],
                "default_value_for_each_table": [d for _, _, d in TABLE_SPECS.values()],
                "maxnum_catfeature_query_per_table_per_sample": [4, 4],
                "max_batch_size": 64,
                "deployed_device_list": [0],
                "gpucache": False,
            }
        ],
    }
    config = tmp_path / "ps.json"
    config.write_text(json.dumps(ps))
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_server.cli", "serve", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(target, process)
        keys, vectors = truth["user"]
        outcomes: list[str] = []
        stop = threading.Event()

        def keep_looking_up() -> None:
            with Client(target, timeout=5) as client:
                while not stop.is_set():
                    try:
                        got = client.lookup("ctr", "user", keys[:128])
                        outcomes.append("ok" if np.array_equal(got, vectors[:128]) else "wrong")
                    except HpsError as e:
                        outcomes.append(e.code.name)

        worker = threading.Thread(target=keep_looking_up)
        worker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        stop.set()
        worker.join()
    finally:
        if process.poll() is None:
            process.kill()
    assert outcomes.count("ok") > 0
    assert "wrong" not in outcomes
    # Calls in flight finish; only calls started after the stop are refused, as UNAVAILABLE.
    assert set(outcomes) <= {"ok", "UNAVAILABLE"}
    assert "draining" in process.stderr.read()
