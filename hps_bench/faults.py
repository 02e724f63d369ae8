"""`hps bench faults`: Redis Cluster faults under load through `hps serve`, every reply checked against the
acknowledged writes: wrong vectors, resurrected deletes, failed lookups and failed writes per fault.

Starts its own cluster (3 masters + 3 replicas) and an `hps serve` with Redis as the volatile level over
RocksDB; client threads own disjoint keys and look up, upsert and delete them, so each knows every key's
acknowledged state. Faults, in turn, under that load: every node SIGKILLed and restarted from a snapshot
taken before the last writes; a master frozen (SIGSTOP, then SIGCONT) for 0.7 s, then for 3 s (its replica
takes over); a live `redis-cli --cluster reshard` of a slot holding the table. It measures correctness,
not speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from redis.crc import key_slot

from hps_bench import report, servers
from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_client import Client, HpsError
from hps_server import tables as table_files
from hps_server.storage.redis_cluster import hash_name

MODEL = "faults"
TABLE = "t"
ROWS = 20_000
DIM = 8
PARTITIONS = 8
CLIENTS = 8
LOOKUP_KEYS = 64
UPSERT_KEYS = 16
DELETE_KEYS = 4
# Past hps's timeout_ms (300), so its calls time out, and below the cluster's node timeout (1 s), so the
# master is not replaced and applies what waited in its sockets when it resumes.
SHORT_FREEZE_SECONDS = 0.7
DELETED = -1  # a key's state once a delete of it was acknowledged
UNKNOWN = -2  # a key's state after a write of it failed (it may or may not have landed)


def _row(indices: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """The vector of key `indices[i]` at `versions[i]`: [index, version, 0, ...], exact in float32."""
    rows = np.zeros((len(indices), DIM), np.float32)
    rows[:, 0] = indices
    rows[:, 1] = versions
    return rows


def _keys(indices: np.ndarray) -> np.ndarray:
    return indices.astype(np.int64) * 7 + 1


@dataclass
class Counts:
    lookups: int = 0
    upserts: int = 0
    deletes: int = 0
    wrong_vectors: int = 0
    resurrected_deletes: int = 0
    failed_lookups: int = 0
    failed_writes: int = 0

    def add(self, other: Counts) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Worker:
    """One client thread: owns the key indices ≡ `number` mod CLIENTS and their acknowledged state."""

    number: int
    target: str
    indices: np.ndarray
    state: np.ndarray = field(init=False)
    counts: Counts = field(default_factory=Counts)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state = np.zeros(len(self.indices), np.int64)  # version 0: the imported rows

    def take_counts(self) -> Counts:
        with self.lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def run(self, stop: threading.Event) -> None:
        rng = np.random.default_rng(self.number)
        with Client(self.target, timeout=10) as client:
            while not stop.is_set():
                roll = rng.random()
                if roll < 0.7:
                    self._lookup(client, rng.choice(len(self.indices), LOOKUP_KEYS, replace=False))
                elif roll < 0.9:
                    self._upsert(client, rng.choice(len(self.indices), UPSERT_KEYS, replace=False))
                else:
                    self._delete(client, rng.choice(len(self.indices), DELETE_KEYS, replace=False))

    def _lookup(self, client: Client, picks: np.ndarray) -> None:
        try:
            got = client.lookup_tables(MODEL, {TABLE: _keys(self.indices[picks])})[TABLE]
        except HpsError:
            with self.lock:
                self.counts.lookups += 1
                self.counts.failed_lookups += 1
            return
        state = self.state[picks]
        known = state != UNKNOWN
        present = state >= 0
        expected = _row(self.indices[picks], np.maximum(state, 0))
        right = np.all(got.vectors == expected, axis=1) & got.found
        wrong = known & present & ~right
        resurrected = known & ~present & got.found
        with self.lock:
            self.counts.lookups += 1
            self.counts.wrong_vectors += int(wrong.sum())
            self.counts.resurrected_deletes += int(resurrected.sum())

    def _upsert(self, client: Client, picks: np.ndarray) -> None:
        versions = np.maximum(self.state[picks], 0) + 1
        try:
            client.upsert(MODEL, TABLE, _keys(self.indices[picks]), _row(self.indices[picks], versions))
            self.state[picks] = versions
            failed = 0
        except HpsError:
            self.state[picks] = UNKNOWN
            failed = 1
        with self.lock:
            self.counts.upserts += 1
            self.counts.failed_writes += failed

    def _delete(self, client: Client, picks: np.ndarray) -> None:
        try:
            client.delete(MODEL, TABLE, _keys(self.indices[picks]))
            self.state[picks] = DELETED
            failed = 0
        except HpsError:
            self.state[picks] = UNKNOWN
            failed = 1
        with self.lock:
            self.counts.deletes += 1
            self.counts.failed_writes += failed


def _write_config(directory: Path, port: int, cluster: RedisClusterProcesses) -> Path:
    indices = np.arange(ROWS)
    table_files.write_table(directory / TABLE, [(_keys(indices), _row(indices, np.zeros(ROWS)))], DIM)
    config = {
        "server": {"address": f"127.0.0.1:{port}"},
        "volatile_db": {
            "type": "redis_cluster",
            "address": cluster.seed,
            "num_partitions": PARTITIONS,
            "timeout_ms": 300,
            "initial_cache_rate": 1.0,
        },
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": MODEL,
                "max_batch_size": LOOKUP_KEYS,
                "gpucache": False,
                "tables": [{"name": TABLE, "dim": DIM, "source": TABLE, "max_keys_per_sample": 1}],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snapshot_restart(cluster: RedisClusterProcesses, seconds: float) -> None:
    """Snapshot every master, keep writing, then SIGKILL every node and start them on that snapshot."""
    for port in cluster.masters_ports():
        with cluster.client(port) as node:
            node.save()
    time.sleep(seconds)
    cluster.stop_all()
    cluster.start_all()


def _freeze(cluster: RedisClusterProcesses, seconds: float) -> None:
    """SIGSTOP one master for `seconds`, then SIGCONT: writes sent meanwhile wait in its socket and land
    when it resumes (below the cluster's node timeout), or its replica takes over (past it)."""
    port = cluster.masters_ports()[0]
    cluster.pause_node(port)
    try:
        time.sleep(seconds)
    finally:
        cluster.resume_node(port)
    cluster.wait_ok(60)


def _reshard(cluster: RedisClusterProcesses) -> None:
    storage = f"{MODEL}.{TABLE}"
    cluster.reshard([key_slot(hash_name(storage, p, "v").encode()) for p in range(PARTITIONS)])


def run(json_out: bool, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisClusterProcesses(Path(tmp) / "redis").start() as cluster:
        directory = Path(tmp) / "served"
        directory.mkdir()
        port = servers.free_port()
        with servers.hps_server(_write_config(directory, port, cluster), port) as target:
            indices = np.arange(ROWS)
            workers = [_Worker(n, target, indices[indices % CLIENTS == n]) for n in range(CLIENTS)]
            stop = threading.Event()
            threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
            for thread in threads:
                thread.start()
            phases: list[tuple[str, Callable[[], None]]] = [
                ("steady", lambda: None),
                ("snapshot_restart", lambda: _snapshot_restart(cluster, seconds)),
                ("freeze_short", lambda: _freeze(cluster, SHORT_FREEZE_SECONDS)),
                ("freeze_failover", lambda: _freeze(cluster, max(seconds, 3.0))),
                ("reshard", lambda: _reshard(cluster)),
            ]
            rows = []
            try:
                for name, fault in phases:
                    began = time.perf_counter()
                    fault()
                    time.sleep(seconds)  # load goes on after the fault, while Redis settles
                    counts = Counts()
                    for worker in workers:
                        counts.add(worker.take_counts())
                    rows.append({"fault": name, "seconds": time.perf_counter() - began, **vars(counts)})
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
    totals = Counts()
    for row in rows:
        totals.add(Counts(**{k: v for k, v in row.items() if k in vars(Counts())}))
    targets = {
        name: {"value": getattr(totals, name), "target": 0, "met": getattr(totals, name) == 0}
        for name in ("wrong_vectors", "resurrected_deletes", "failed_lookups", "failed_writes")
    }
    report.emit(
        "hps bench faults: Redis Cluster faults under load, replies checked against acknowledged writes",
        rows,
        json_out,
        {"clients": CLIENTS, "table_rows": ROWS, "totals": vars(totals), "targets": targets},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench faults", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of load after each fault")
    args = parser.parse_args(argv)
    run(json_out=args.json, seconds=args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
