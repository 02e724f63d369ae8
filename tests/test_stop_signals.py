"""`hps serve` and SIGTERM at both ends of its life: a signal while the tables are still being ingested stops
it cleanly (one process and a group: exit 0, shared memory unlinked, a fresh import at the next start; a
SIGHUP meanwhile is answered once serving), and
hps_client's reads during a drain under load fail only with UNAVAILABLE once no server is left."""

from __future__ import annotations

import glob
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hps_bench.servers import free_port, wait_serving
from hps_client import Client, HpsError, UnavailableError
from hps_server import tables
from tests.conftest import sample_raw_config, serve_command, write_sample_config, write_sample_tables

# Rows of the large table: seconds of ingest, enough to signal the server in the middle of it.
LARGE_ROWS = 3_000_000
LARGE_DIM = 8
# What a server logs for a SIGHUP, by its number of processes (a group refuses to reload its config).
HANGUP_ANSWER = {1: "config reload: no model changed", 2: "SIGHUP: reloading the config is not supported"}


def _config_with_a_large_table(directory: Path, address: str, processes: int) -> Path:
    write_sample_tables(directory)
    keys = np.arange(LARGE_ROWS, dtype=np.int64)
    vectors = np.broadcast_to(keys[:, None].astype(np.float32), (LARGE_ROWS, LARGE_DIM))
    tables.write_table(directory / "large", [(keys, vectors)], LARGE_DIM)
    raw = sample_raw_config()
    raw["server"].update(address=address, processes=processes)
    raw["models"][0]["tables"].append({"name": "large", "dim": LARGE_DIM, "source": "large"})
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        time.sleep(0.01)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_while_the_tables_are_ingested_stops_cleanly(tmp_path: Path, processes: int) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = _config_with_a_large_table(tmp_path, address, processes)
    log = tmp_path / "serve.log"
    process = subprocess.Popen(serve_command(config), stderr=log.open("w"))
    try:
        _wait_for_line(log, "ingesting ctr.large", process)
        for _ in range(3):  # an impatient operator: the later signals must not cut the cleanup short
            process.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "received SIGTERM while starting; stopped before serving" in text
    assert "Traceback" not in text
    assert glob.glob(f"/dev/shm/hps{process.pid}_*") == []  # the group's hash map is unlinked

    # The interrupted import is redone in full at the next start; a SIGHUP meanwhile is answered once serving.
    restart_log = tmp_path / "restart.log"
    restarted = subprocess.Popen(serve_command(config), stderr=restart_log.open("w"))
    try:
        _wait_for_line(restart_log, "ingesting ctr.large", restarted)
        restarted.send_signal(signal.SIGHUP)
        wait_serving(address, restarted)
        _wait_for_line(restart_log, HANGUP_ANSWER[processes], restarted)
        with Client(address) as client:
            got = client.lookup("ctr", "large", np.array([0, LARGE_ROWS - 1]))
        np.testing.assert_array_equal(got[:, 0], [0, LARGE_ROWS - 1])
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
    assert f"ingested {LARGE_ROWS} rows into ctr.large" in restart_log.read_text()


def test_reads_through_hps_client_during_a_drain_fail_only_once_the_server_is_gone(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    config, truth = write_sample_config(tmp_path, address, shutdown_grace_seconds=5)
    keys = truth["user"][0][:64]
    process = subprocess.Popen(serve_command(config), stderr=(tmp_path / "serve.log").open("w"))
    answered = [0] * 8
    failures: list[HpsError] = []
    stop = threading.Event()

    def look_up(index: int) -> None:
        with Client(address) as client:
            while not stop.is_set():
                try:
                    client.lookup("ctr", "user", keys)
                    answered[index] += 1
                except HpsError as e:
                    failures.append(e)
                    time.sleep(0.01)

    threads = [threading.Thread(target=look_up, args=(index,)) for index in range(len(answered))]
    try:
        wait_serving(address, process)
        for thread in threads:
            thread.start()
        while min(answered) < 20:
            time.sleep(0.01)
        # Calls arriving as the shutdown begins are cancelled by gRPC's server unrun; the client retries
        # them (the reads change nothing) and sees UNAVAILABLE only when no server answers any more.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if process.poll() is None:
            process.kill()
    assert failures, "the lookups never saw the server gone"
    assert all(isinstance(e, UnavailableError) for e in failures), {type(e).__name__: e.code for e in failures}
