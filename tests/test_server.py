"""`hps serve` as a process: serves a ps.json with no import step, drains and exits on SIGTERM, and
refuses an address another server already holds."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_bench.servers import free_port, wait_serving
from hps_client import Client
from hps_client.errors import FailedPreconditionError
from hps_server import config as config_module
from hps_server.server import WRITES_CHECK_SECONDS, WRITES_HEALTH_NAME, HpsServer
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import (
    TABLE_SPECS,
    ServedModel,
    free_port_pair,
    sample_config,
    sample_raw_config,
    serve_command,
    write_sample_config,
    write_sample_tables,
)


def _draining(channel: grpc.Channel) -> bool:
    """Whether the server has started its drain: health says NOT_SERVING, or new calls are refused."""
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return True
    return status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_ps_json_is_served_directly_and_sigterm_drains(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    port = free_port()
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
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_server.cli", "serve", "--config", str(config)], stderr=log.open("w")
    )
    target = f"127.0.0.1:{port}"
    keys, vectors = truth["user"]
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys[:64].tobytes())])
    try:
        wait_serving(target, process)
        with grpc.insecure_channel(target) as channel:
            # A stream opened before SIGTERM is a call in flight: it must go on being answered while the
            # server drains, and end normally when the client closes it.
            outgoing: queue.Queue[hps_pb2.LookupRequest | None] = queue.Queue()
            replies = hps_pb2_grpc.LookupServiceStub(channel).StreamLookup(iter(outgoing.get, None))
            outgoing.put(request)
            first = next(replies)
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not _draining(channel):
                assert time.monotonic() < deadline, "no drain after SIGTERM"
                time.sleep(0.05)
            outgoing.put(request)
            during_drain = next(replies)
            outgoing.put(None)
            assert list(replies) == []
            # New calls are refused once draining started.
            with pytest.raises(grpc.RpcError) as refused:
                hps_pb2_grpc.LookupServiceStub(channel).Lookup(request, timeout=5)
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for reply in (first, during_drain):
        got = np.frombuffer(reply.results[0].vectors, "<f4").reshape(64, -1)
        np.testing.assert_array_equal(got, vectors[:64])
    assert "draining" in log.read_text()


def test_a_second_server_on_a_served_address_is_refused(served: ServedModel, tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    second = HpsServer(replace(config, server=replace(config.server, address=served.target)))
    try:
        with pytest.raises(OSError, match=re.escape(f"server.address: cannot bind {served.target}")):
            second.start()
    finally:
        second.stop(grace=0)

    process = subprocess.run(
        serve_command(write_sample_config(tmp_path / "cli", served.target)[0]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0
    assert f"server.address: cannot bind {served.target} (Address already in use: held by another program?)" in (
        process.stderr
    )
    assert "ingesting" not in process.stderr  # refused before the slow part of the start
    # The first server was not disturbed.
    with grpc.insecure_channel(served.target) as channel:
        reply = hps_pb2_grpc.ModelServiceStub(channel).ListModels(hps_pb2.ListModelsRequest(), timeout=10)
    assert list(reply.models) == ["ctr"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_busy_metrics_address_is_refused_before_the_tables_are_ingested(tmp_path: Path, processes: int) -> None:
    base = free_port_pair()  # the port after it free too, for the second worker's
    busy = base + processes - 1  # the last worker's port (worker i serves /metrics on the port + i)
    with socket.socket() as held:
        held.bind(("127.0.0.1", busy))
        held.listen()
        config, _ = write_sample_config(
            tmp_path, f"127.0.0.1:{free_port()}", metrics_address=f":{base}", processes=processes
        )
        refused = subprocess.run(serve_command(config), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert f"server.metrics_address: cannot bind :{busy} (Address already in use: held by" in refused.stderr
    assert "ingesting" not in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_a_metrics_port_that_is_the_grpc_port_is_refused_naming_both(tmp_path: Path, processes: int) -> None:
    port = free_port()
    metrics = f"127.0.0.1:{port - processes + 1}"  # the last worker's /metrics would be the gRPC port
    config, _ = write_sample_config(tmp_path, f"0.0.0.0:{port}", metrics_address=metrics, processes=processes)
    refused = subprocess.run(serve_command(config), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "server.metrics_address: its port" in refused.stderr
    assert f"include server.address's port {port}" in refused.stderr
    assert "Traceback" not in refused.stderr


def _connection_states_after_a_call(server: HpsServer, seconds: float) -> list[grpc.ChannelConnectivity]:
    """The channel's connectivity states from one health check until `seconds` later (or until it went idle)."""
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    seen = []
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        channel.subscribe(states.put)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and grpc.ChannelConnectivity.IDLE not in seen[1:]:
            try:
                seen.append(states.get(timeout=left))
            except queue.Empty:
                break
        channel.unsubscribe(states.put)
    return seen


def test_max_connection_age_makes_clients_reconnect(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    aged = replace(config, server=replace(config.server, max_connection_age_seconds=0.5))
    for server_config, closed in ((aged, True), (config, False)):
        server = HpsServer(server_config)
        server.start()
        try:
            states = _connection_states_after_a_call(server, 5.0 if closed else 1.5)
        finally:
            server.stop(grace=0)
        # The server's GOAWAY takes a ready channel back to IDLE; without the option the connection stays.
        assert grpc.ChannelConnectivity.READY in states
        went_idle = grpc.ChannelConnectivity.IDLE in states[states.index(grpc.ChannelConnectivity.READY) :]
        assert went_idle is closed, states


def _serve(config: config_module.Config) -> tuple[HpsServer, str]:
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    return server, f"127.0.0.1:{port}"


def test_rows_deleted_until_a_table_is_empty_stay_deleted_after_a_restart(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    keys = truth["item"][0]
    server, target = _serve(config)
    try:
        with Client(target) as client:
            for start in range(0, len(keys), 256):
                client.delete("ctr", "item", keys[start : start + 256])
    finally:
        server.stop(grace=1)
    server, target = _serve(config)  # the table's source folder is still configured
    try:
        with Client(target) as client:
            assert not client.lookup_tables("ctr", {"item": keys[:256]})["item"].found.any()
            assert client.describe("ctr").tables[1].rows == 0
    finally:
        server.stop(grace=1)


def test_writes_to_a_model_whose_rocksdb_is_read_only_are_refused(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    server, _ = _serve(sample_config(tmp_path))  # imports the tables
    server.stop(grace=1)
    raw = sample_raw_config()
    raw["persistent_db"]["read_only"] = True
    server, target = _serve(config_module.parse(raw, tmp_path))
    keys, vectors = truth["user"][0][:4], truth["user"][1][:4]
    try:
        with Client(target) as client:
            for write in (
                lambda: client.upsert("ctr", "user", keys, vectors + 1),
                lambda: client.delete("ctr", "user", keys),
            ):
                with pytest.raises(
                    FailedPreconditionError, match="its rocksdb level, which holds the rows, is read-only"
                ):
                    write()
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), vectors)
            assert "read-only" in client.describe("ctr").writes_refused
    finally:
        server.stop(grace=1)


def test_a_watch_of_the_writes_health_gets_a_message_only_when_it_changes(served: ServedModel) -> None:
    request = health_pb2.HealthCheckRequest(service=WRITES_HEALTH_NAME)
    statuses = []
    with grpc.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=3.5 * WRITES_CHECK_SECONDS)
        with contextlib.suppress(grpc.RpcError):  # the deadline ends it
            statuses.extend(reply.status for reply in watch)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING]  # not once more per check


def test_upserts_into_a_redis_only_model_survive_a_restart(tmp_path: Path, redis_cluster_processes) -> None:  # type: ignore[no-untyped-def]
    redis_cluster_processes.flush()
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster_processes.seed, timeout_ms=2000)
    raw["persistent_db"] = {"type": "disabled"}
    config = config_module.parse(raw, tmp_path)
    keys = truth["user"][0][:4]
    server, target = _serve(config)  # ingests the sources into Redis, the model's authority here
    try:
        with Client(target) as client:
            client.upsert("ctr", "user", keys, np.full((4, 16), 7.0, np.float32))
    finally:
        server.stop(grace=1)
    server, target = _serve(config)  # its sources are still configured: they must not be ingested again
    try:
        with Client(target) as client:
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), np.full((4, 16), 7.0, np.float32))
    finally:
        server.stop(grace=1)
