"""`hps serve --processes 2` as people run it: real worker processes on one loopback port, a real supervisor.

Lookups from both workers, writes through either seen by both, prefetches filling the L1 lookups read, a
killed worker restarted, a drain on SIGTERM, a held address refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from hps_bench.servers import free_port
from hps_client import Client, wire
from hps_server.cache.placement import gpus_available
from hps_server.supervisor import claim_address
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import free_port_pair, serve_command, write_sample_config

Truth = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Group:
    """A running `hps serve --processes 2` and what the tests read from it."""

    process: subprocess.Popen[bytes]
    target: str
    log: Path
    metrics_port: int
    truth: Truth

    def wait_for_log(self, pattern: str, timeout: float = 120.0, since: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the supervisor's log, past its first `since` characters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text()[since:])
            if found:
                return found
            assert self.process.poll() is None, f"supervisor exited with {self.process.returncode}"
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the supervisor's log:\n{self.log.read_text()}")

    def worker_pids(self) -> dict[int, int]:
        """Each worker's pid, as the supervisor last logged it serving."""
        found = re.findall(r"worker (\d+) \(pid (\d+)\) serving", self.log.read_text())
        return {int(index): int(pid) for index, pid in found}

    def lookups_answered(self, worker: int) -> float:
        """Lookups worker `worker` answered, from its own /metrics (port metrics_address + index)."""
        url = f"http://127.0.0.1:{self.metrics_port + worker}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("hps_requests_total{") and 'method="Lookup"' in line
        )

    def metric(self, worker: int, name: str, label: str) -> float:
        """The sum of `name` samples carrying `label` on worker `worker`'s /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port + worker}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line
        )

    def check_lookups(self, calls: int = 32) -> None:
        """`calls` lookups, each on a connection of its own (so the kernel spreads them over the workers),
        all answered exactly."""
        keys, vectors = self.truth["user"]
        for call in range(calls):
            picked = np.arange(call, len(keys), len(keys) // 64)[:64]
            request = hps_pb2.LookupRequest(
                model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys[picked].tobytes())]
            )
            # A local subchannel pool: without it the channels of one process share one connection.
            with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = hps_pb2_grpc.LookupServiceStub(channel).Lookup(request, timeout=30)
            got = np.frombuffer(reply.results[0].vectors, "<f4").reshape(len(picked), -1)
            np.testing.assert_array_equal(got, vectors[picked])


def _start_group(directory: Path, **l1: object) -> Group:
    """A group of 2 workers; `l1`: the model's L1 keys (default: a cache of half the rows)."""
    port, metrics_port = free_port(), free_port_pair()
    config, truth = write_sample_config(
        directory, f"127.0.0.1:{port}", metrics_address=f"127.0.0.1:{metrics_port}", shutdown_grace_seconds=5
    )
    # With L1 on: each worker's NumPy cache on this host, one CUDA cache all workers share on a GPU host.
    raw = yaml.safe_load(config.read_text())
    raw["models"][0].update(l1 or {"gpucache": True, "gpucacheper": 0.5})
    config.write_text(yaml.safe_dump(raw))
    log = directory / "supervisor.log"
    process = subprocess.Popen(serve_command(config, "--processes", "2"), stderr=log.open("w"))
    group = Group(process, f"127.0.0.1:{port}", log, metrics_port, truth)
    try:
        group.wait_for_log(rf"serving 2 workers on port {port}")
    except BaseException:
        _stop(process)
        raise
    return group


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    started = _start_group(tmp_path_factory.mktemp("group"))
    yield started
    _stop(started.process)


def test_both_workers_answer_lookups_exactly(group: Group) -> None:
    assert len(group.worker_pids()) == 2
    group.check_lookups()
    for worker in (0, 1):
        assert group.lookups_answered(worker) > 0, f"worker {worker} answered no lookup"


def test_a_row_written_back_by_one_worker_is_an_l2_hit_in_the_other(group: Group) -> None:
    keys, vectors = group.truth["item"]  # a table no other test looks up
    picked = keys[:50]
    before = [group.metric(w, "hps_level_hits_total", 'level="rocksdb"') for w in (0, 1)]
    answered = [group.lookups_answered(w) for w in (0, 1)]
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="item", keys=picked.tobytes())])
    # Fresh connections until both workers answered these keys (the kernel picks a worker per connection).
    for _ in range(200):
        with grpc.insecure_channel(group.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = hps_pb2_grpc.LookupServiceStub(channel).Lookup(request, timeout=30)
        got = np.frombuffer(reply.results[0].vectors, "<f4").reshape(len(picked), -1)
        np.testing.assert_array_equal(got, vectors[: len(picked)])
        if all(group.lookups_answered(w) > answered[w] for w in (0, 1)):
            break
    else:
        pytest.fail("one worker answered every connection")
    # Only the first lookup read RocksDB: its write-back into the shared hash map answered the other worker.
    after = [group.metric(w, "hps_level_hits_total", 'level="rocksdb"') for w in (0, 1)]
    assert sum(after) - sum(before) == len(picked)


def test_workers_map_one_shared_hash_map_owned_by_the_supervisor(group: Group) -> None:
    prefix = f"/dev/shm/hps{group.process.pid}_"
    rows = [
        str(path) for path in Path("/dev/shm").glob(f"hps{group.process.pid}_*") if re.search(r"p\d+r\d+$", path.name)
    ]
    assert len(rows) == len({re.sub(r"r\d+$", "", path) for path in rows}) >= 1  # one generation per pool
    for pid in group.worker_pids().values():
        mapped = Path(f"/proc/{pid}/maps").read_text()
        # Each worker maps the supervisor's segments (a generation it has not re-attached yet, maybe unlinked
        # since), never rows of its own: the hash map's memory does not grow with N.
        assert re.search(re.escape(prefix) + r"[0-9a-f]+p\d+r\d+", mapped), f"worker {pid} maps no shared rows"


def _lookup_on_every_worker(group: Group, table: str, keys: np.ndarray) -> list[hps_pb2.TableResult]:
    """The same lookup on fresh connections until both workers answered it (the kernel picks a worker per
    connection); every reply."""
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table=table, keys=keys.tobytes())])
    answered = [group.lookups_answered(w) for w in (0, 1)]
    replies = []
    for _ in range(200):
        with grpc.insecure_channel(group.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            replies.append(hps_pb2_grpc.LookupServiceStub(channel).Lookup(request, timeout=30).results[0])
        if len(replies) >= 4 and all(group.lookups_answered(w) > answered[w] for w in (0, 1)):
            return replies
    pytest.fail("one worker answered every connection")


def _vectors(result: hps_pb2.TableResult, rows: int) -> np.ndarray:
    return np.frombuffer(result.vectors, "<f4").reshape(rows, -1)


def _upsert(group: Group, keys: np.ndarray, vectors: np.ndarray) -> int:
    request = hps_pb2.UpsertRequest(model="ctr", table="user", keys=keys.tobytes(), vectors=vectors.tobytes())
    with grpc.insecure_channel(group.target) as channel:
        return int(hps_pb2_grpc.LookupServiceStub(channel).Upsert(request, timeout=30).rows)


def _delete(group: Group, keys: np.ndarray) -> int:
    request = hps_pb2.DeleteRequest(model="ctr", table="user", keys=keys.tobytes())
    with grpc.insecure_channel(group.target) as channel:
        return int(hps_pb2_grpc.LookupServiceStub(channel).Delete(request, timeout=30).rows)


def _check_an_upsert_reaches_every_worker(group: Group, picked: np.ndarray, original: np.ndarray) -> None:
    """Every worker answers `picked` with `original` (so its L1 holds them), then after an upsert of new rows
    through one, with the new rows; `original` is written back after."""
    for reply in _lookup_on_every_worker(group, "user", picked):
        np.testing.assert_array_equal(_vectors(reply, len(picked)), original)
    new = (original + 1000).astype(np.float32)
    assert _upsert(group, picked, new) == len(picked)
    try:
        # Acknowledged means every worker's L1 and the shared levels hold it: no lookup sees the old rows.
        for reply in _lookup_on_every_worker(group, "user", picked):
            np.testing.assert_array_equal(_vectors(reply, len(picked)), new)
    finally:
        _upsert(group, picked, original)


def test_an_upsert_through_one_worker_is_seen_by_every_worker_at_once(group: Group) -> None:
    keys, vectors = group.truth["user"]
    _check_an_upsert_reaches_every_worker(group, keys[100:140], vectors[100:140])


def test_a_delete_through_one_worker_is_seen_by_every_worker_at_once(group: Group) -> None:
    keys, vectors = group.truth["user"]
    picked, original = keys[200:220], vectors[200:220]
    _lookup_on_every_worker(group, "user", picked)
    assert _delete(group, picked) == len(picked)
    try:
        for reply in _lookup_on_every_worker(group, "user", picked):
            assert not any(reply.found), "a worker answered a deleted key from a copy"
    finally:
        _upsert(group, picked, original)
    for reply in _lookup_on_every_worker(group, "user", picked):
        np.testing.assert_array_equal(_vectors(reply, len(picked)), original)


def test_a_prefetch_through_one_worker_fills_the_l1_its_lookups_read(group: Group) -> None:
    keys, _ = group.truth["user"]
    picked = keys[[p for p in range(4600, 5000) if p % 78 >= 64][:30]]  # rows no other test looks up
    prefetches = [group.metric(w, "hps_requests_total", 'method="Prefetch"') for w in (0, 1)]
    request = hps_pb2.PrefetchRequest(model="ctr", packed=wire.packed_query({"user": picked}))
    with grpc.insecure_channel(group.target) as channel:
        assert hps_pb2_grpc.LookupServiceStub(channel).Prefetch(request, timeout=30).keys == len(picked)
    (received,) = [w for w in (0, 1) if group.metric(w, "hps_requests_total", 'method="Prefetch"') > prefetches[w]]
    time.sleep(2)  # its walk (30 keys: milliseconds) has run, in the worker or, on a GPU, in the writer
    # One CUDA cache on a GPU host: the writer walked it into the L1 both workers read. Each worker's own
    # NumPy cache elsewhere: the worker that took the prefetch holds them.
    readers = (0, 1) if gpus_available([0]) else (received,)
    hits = [group.metric(w, "hps_level_hits", 'level="l1_cache"') for w in (0, 1)]
    answered = [group.lookups_answered(w) for w in (0, 1)]
    _lookup_on_every_worker(group, "user", picked)
    for worker in readers:
        lookups = group.lookups_answered(worker) - answered[worker]
        l1_hits = group.metric(worker, "hps_level_hits", 'level="l1_cache"') - hits[worker]
        assert l1_hits == lookups * len(picked), f"worker {worker}: a prefetched key missed its L1"


@pytest.mark.gpu
@pytest.mark.skipif(not gpus_available([0]), reason="needs an NVIDIA GPU with CuPy (a static table the workers share)")
def test_workers_read_one_shared_static_table_and_see_upserts_in_it(tmp_path: Path) -> None:
    group = _start_group(tmp_path, gpucache=True, use_static_table=True)
    try:
        group.check_lookups()
        keys, vectors = group.truth["user"]
        picked, original = keys[300:340], vectors[300:340]
        hits = [group.metric(w, "hps_level_hits", 'level="l1_cache"') for w in (0, 1)]
        answered = [group.lookups_answered(w) for w in (0, 1)]
        for reply in _lookup_on_every_worker(group, "user", picked):
            np.testing.assert_array_equal(_vectors(reply, len(picked)), original)
        for worker in (0, 1):  # every key from the static table, in both workers
            lookups = group.lookups_answered(worker) - answered[worker]
            l1_hits = group.metric(worker, "hps_level_hits", 'level="l1_cache"') - hits[worker]
            assert l1_hits == lookups * len(picked), f"worker {worker}: a key missed the static table"
        new = (original + 1000).astype(np.float32)
        assert _upsert(group, picked, new) == len(picked)
        for reply in _lookup_on_every_worker(group, "user", picked):
            np.testing.assert_array_equal(_vectors(reply, len(picked)), new)
    finally:
        _stop(group.process)


def test_a_killed_worker_is_restarted(group: Group) -> None:
    killed, logged = group.worker_pids()[0], len(group.log.read_text())
    os.kill(killed, signal.SIGKILL)
    group.wait_for_log(rf"worker 0 \(pid {killed}\) exited with code -9 \(SIGKILL\); restarting it")
    # No call was in flight on it: new connections go to the worker left, and every lookup is answered.
    group.check_lookups(calls=8)
    restarted = int(group.wait_for_log(r"worker 0 \(pid (\d+)\) serving again", since=logged).group(1))
    assert restarted != killed
    group.check_lookups()
    assert group.lookups_answered(0) > 0, "the restarted worker answered no lookup"
    # The killed worker's temporary folders (its RocksDB secondary's) went with the next one's start.
    folder = Path(_writer_socket(group.process.pid)).parent
    assert [len(list((folder / f"tmp-{index}").iterdir())) for index in (0, 1)] == [1, 1]


def test_the_first_upsert_after_a_worker_restarts_reaches_the_restarted_workers_l1(group: Group) -> None:
    """The writer's connection to a worker that was killed is stale: the refresh it carried must reach the
    worker started in its place, whose L1 took the old rows meanwhile, not be dropped with the connection."""
    keys, vectors = group.truth["user"]
    picked, original = keys[400:440], vectors[400:440]
    _lookup_on_every_worker(group, "user", picked)
    assert _upsert(group, picked, original) == len(picked)  # the writer now holds a connection to each worker
    killed, logged = group.worker_pids()[1], len(group.log.read_text())
    os.kill(killed, signal.SIGKILL)
    group.wait_for_log(r"worker 1 \(pid \d+\) serving again", since=logged)
    _check_an_upsert_reaches_every_worker(group, picked, original)


def _writer_socket(supervisor: int) -> str:
    """The path of the group writer's Unix socket, among the sockets process `supervisor` holds."""
    inodes = set()
    for fd in Path(f"/proc/{supervisor}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("/writer"):
            return fields[7]
    raise AssertionError("no writer socket found")


def test_peers_that_hang_up_while_connecting_leave_the_writer_accepting(group: Group) -> None:
    path = _writer_socket(group.process.pid)
    for _ in range(3):  # as a worker killed while it connects
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(path)
    killed = group.worker_pids()[0]
    os.kill(killed, signal.SIGKILL)
    group.wait_for_log(rf"worker 0 \(pid {killed}\) exited")
    group.wait_for_log(rf"worker 0 \(pid {killed}\) exited[\s\S]*worker 0 \(pid \d+\) serving again")
    keys = np.arange(10**8, 10**8 + 8)
    with Client(group.target) as client:  # through whichever worker: all reach the writer
        for _ in range(8):
            client.upsert("ctr", "user", keys, np.full((8, 16), 3.0, np.float32), timeout=30)


def test_a_supervisor_stopped_for_a_while_kills_no_worker(group: Group) -> None:
    workers = group.worker_pids()
    os.kill(group.process.pid, signal.SIGSTOP)  # swapped out, CPU-throttled, a paused VM
    try:
        time.sleep(12)  # more than UNRESPONSIVE_SECONDS
    finally:
        os.kill(group.process.pid, signal.SIGCONT)
    time.sleep(3)  # a few rounds of heartbeats
    log = group.log.read_text()
    assert not any(f"(pid {pid}) answered no heartbeat" in log for pid in workers.values()), log
    assert group.worker_pids() == workers
    group.check_lookups(calls=8)


def test_a_stopped_worker_is_killed_and_restarted(group: Group) -> None:
    stopped, logged = group.worker_pids()[1], len(group.log.read_text())
    os.kill(stopped, signal.SIGSTOP)  # alive but answering nothing, as a wedged worker
    try:
        group.wait_for_log(rf"worker 1 \(pid {stopped}\) answered no heartbeat for 10 s; killing it")
        group.wait_for_log(rf"worker 1 \(pid {stopped}\) exited with code -9 \(SIGKILL\); restarting it")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    restarted = int(group.wait_for_log(r"worker 1 \(pid (\d+)\) serving again", since=logged).group(1))
    assert restarted != stopped
    group.check_lookups()


def test_a_worker_stopped_while_it_starts_is_found_out_instead_of_stalling_the_start(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port_pair()
    config, _ = write_sample_config(
        tmp_path, f"127.0.0.1:{port}", metrics_address=f"127.0.0.1:{metrics_port}", shutdown_grace_seconds=5
    )
    log = tmp_path / "supervisor.log"
    process = subprocess.Popen(serve_command(config, "--processes", "2"), stderr=log.open("w"))
    group = Group(process, f"127.0.0.1:{port}", log, metrics_port, {})
    try:
        loading = int(group.wait_for_log(r"worker 0 \(pid (\d+)\) loading its models").group(1))
        os.kill(loading, signal.SIGSTOP)  # before it is serving: warming up, or waiting for the other
        deadline = time.monotonic() + 90
        while f"worker 0 (pid {loading}) answered no heartbeat" not in log.read_text():
            assert time.monotonic() < deadline, f"the stopped worker was never found out:\n{log.read_text()}"
            time.sleep(0.2)
        # Killed, it either fails the start (it exited before every worker was warm) or is restarted.
        while process.poll() is None and "serving 2 workers" not in log.read_text():
            assert time.monotonic() < deadline, f"the start neither failed nor completed:\n{log.read_text()}"
            time.sleep(0.2)
        assert process.poll() in (None, 1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(loading, signal.SIGCONT)
        _stop(process)


def _secondary_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hps-rocksdb-secondary-*"))


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    before = _secondary_folders()
    started = _start_group(tmp_path)
    try:
        killed = started.worker_pids()[1]  # its RocksDB secondary's folder is left for the supervisor to remove
        os.kill(killed, signal.SIGKILL)
        started.wait_for_log(rf"worker 1 \(pid {killed}\) exited[\s\S]*worker 1 \(pid \d+\) serving again")
        workers = started.worker_pids().values()
        started.process.send_signal(signal.SIGTERM)
        assert started.process.wait(timeout=60) == 0
    finally:
        _stop(started.process)
    log = started.log.read_text()
    assert "received SIGTERM, draining 2 workers" in log
    assert "all 2 workers stopped" in log
    for index in range(2):  # each worker drained and closed its levels, its lines carrying its index
        assert log.count(f"INFO worker {index} hps_server.server: stopped") == 1
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(Path("/dev/shm").glob(f"hps{started.process.pid}_*")), "the shared hash map was not unlinked"
    assert _secondary_folders() <= before


def test_a_port_whose_last_connections_are_in_time_wait_is_claimed() -> None:
    """A server restarted on its port finds connections of the one before in TIME_WAIT: no holder."""
    port = free_port()
    with socket.socket() as listening:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(("127.0.0.1", port))
        listening.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listening.accept()
            accepted.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
            client.recv(1)
    held, claimed = claim_address(f"127.0.0.1:{port}")
    held.close()
    assert claimed == port


@pytest.mark.parametrize("holder", ["plain socket", "gRPC server sharing its port"])
def test_an_address_held_by_another_program_is_refused(tmp_path: Path, holder: str) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    if holder == "plain socket":
        held = socket.socket()
        held.bind(("127.0.0.1", port))
        held.listen()
        release = held.close
    else:  # gRPC's default SO_REUSEPORT would let the workers join it silently
        other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        other.add_insecure_port(address)
        other.start()
        release = lambda: other.stop(0).wait()  # noqa: E731
    try:
        config, _ = write_sample_config(tmp_path, address)
        refused = subprocess.run(serve_command(config, "--processes", "2"), capture_output=True, text=True, timeout=120)
    finally:
        release()
    assert refused.returncode != 0
    assert f"server.address: cannot bind {address}" in refused.stderr
    assert "worker" not in refused.stderr  # refused before any worker started


def test_sighup_to_the_group_is_refused_and_the_workers_serve_on(group: Group) -> None:
    pids = group.worker_pids()
    group.process.send_signal(signal.SIGHUP)
    group.wait_for_log(r"SIGHUP: reloading the config is not supported with 2 worker processes")
    for pid in pids.values():
        os.kill(pid, signal.SIGHUP)  # as a hang-up of the whole group would: the workers ignore it
    group.check_lookups(8)
    assert group.worker_pids() == pids
