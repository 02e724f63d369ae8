"""`hps bench reload`: lookups under load while a model is reloaded to new table versions (ReloadModel), as the
p99 during the switches against the steady p99 of the same run, with failed RPCs and replies mixing versions.

Every version's vectors hold its number in every element, so a reply that mixes versions (rows of two
versions in one reply, over its two tables) shows as two distinct values. Serves with `hps serve` (a warm
L1 per --l1 over a hash map over RocksDB); every version is imported before the server starts.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import yaml

from hps_bench import report, servers
from hps_client import Client, HpsError
from hps_server import config as config_module
from hps_server import storage, transfer
from hps_server import tables as table_files
from hps_wire._proto import hps_pb2, hps_pb2_grpc

MODEL = "reload"
TABLES = ("a", "b")
SEED = 11
# The switch window of a reload: from the ReloadModel call until this long after it returned, so the requests
# that drain the old version count as "during the switch".
DRAIN_SECONDS = 0.5
P99_TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Call:
    started: float
    seconds: float
    failed: bool
    mixed: bool


def _version(index: int) -> str:
    return f"v{index}"


def _write_model(directory: Path, port: int, rows: int, dim: int, versions: int, l1: servers.L1Choice) -> Path:
    """Version 0's files as the tables' sources, versions 1..versions imported into RocksDB; the config path."""
    keys = np.random.default_rng(SEED).choice(10 * rows, rows, replace=False).astype(np.int64)
    for table in TABLES:
        table_files.write_table(directory / table, [(keys, np.zeros((rows, dim), np.float32))], dim)
    raw = {
        "server": {"address": f"127.0.0.1:{port}", "admin": True},
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": MODEL,
                "max_batch_size": 1024,
                **servers._l1_options(l1),
                "tables": [{"name": table, "dim": dim, "source": table, "version": _version(0)} for table in TABLES],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = config_module.load(path)
    model = config.model(MODEL)
    level = storage.open_persistent(config.persistent_db)
    assert level is not None
    try:
        for index in range(1, versions + 1):
            folder = directory / _version(index)
            table_files.write_table(folder, [(keys, np.full((rows, dim), index, np.float32))], dim)
            for name in TABLES:
                versioned = config_module.TableConfig(name, dim, version=_version(index))
                transfer.import_table(level, model.storage_name(versioned), folder, dim, progress=False)
    finally:
        level.close()
    return path


def _client(target: str, keys: np.ndarray, batch: int, stop: threading.Event, calls: list[Call]) -> None:
    rng = np.random.default_rng()
    with Client(target, timeout=30) as client:
        while not stop.is_set():
            asked = {table: rng.choice(keys, batch) for table in TABLES}
            started = time.perf_counter()
            try:
                reply = client.lookup_tables(MODEL, asked)
            except HpsError:
                calls.append(Call(started, time.perf_counter() - started, True, False))
                continue
            seconds = time.perf_counter() - started
            values = np.unique(np.concatenate([reply[table].vectors.ravel() for table in TABLES]))
            calls.append(Call(started, seconds, False, len(values) != 1))


def run(
    as_json: bool, seconds: float, reloads: int, threads: int, rows: int, dim: int, batch: int, l1: servers.L1Choice
) -> None:
    with tempfile.TemporaryDirectory(prefix="hps-bench-reload-") as folder:
        port = servers.free_port()
        config = _write_model(Path(folder), port, rows, dim, reloads, l1)
        keys = table_files.read_table(Path(folder) / TABLES[0]).keys.copy()
        with servers.hps_server(config, port, servers.server_env(l1)) as target:
            per_thread: list[list[Call]] = [[] for _ in range(threads)]
            stop = threading.Event()
            clients = [
                threading.Thread(target=_client, args=(target, keys, batch, stop, calls)) for calls in per_thread
            ]
            windows: list[tuple[float, float]] = []
            reload_seconds: list[float] = []
            reload_failures = 0
            begun = time.perf_counter()
            for thread in clients:
                thread.start()
            with grpc.insecure_channel(target) as channel:
                models = hps_pb2_grpc.ModelServiceStub(channel)
                for index in range(1, reloads + 1):
                    time.sleep(max(0.0, begun + seconds * index / (reloads + 1) - time.perf_counter()))
                    started = time.perf_counter()
                    try:
                        models.ReloadModel(
                            hps_pb2.ReloadModelRequest(model=MODEL, version=_version(index)), timeout=300
                        )
                    except grpc.RpcError:
                        reload_failures += 1
                    done = time.perf_counter()
                    reload_seconds.append(done - started)
                    windows.append((started, done + DRAIN_SECONDS))
                time.sleep(max(0.0, begun + seconds - time.perf_counter()))
                served = models.DescribeModel(hps_pb2.DescribeModelRequest(model=MODEL)).version
            stop.set()
            for thread in clients:
                thread.join()
    calls = [call for thread_calls in per_thread for call in thread_calls]
    starts = np.array([call.started for call in calls])
    ends = starts + np.array([call.seconds for call in calls])
    during = np.zeros(len(calls), bool)
    for low, high in windows:
        during |= (ends >= low) & (starts <= high)
    ok = np.array([not call.failed for call in calls])
    latency_ms = np.array([call.seconds for call in calls]) * 1e3
    steady_p99 = float(np.percentile(latency_ms[ok & ~during], 99)) if (ok & ~during).any() else float("nan")
    switch_p99 = float(np.percentile(latency_ms[ok & during], 99)) if (ok & during).any() else float("nan")
    failed = int((~ok).sum())
    mixed = sum(call.mixed for call in calls)
    ratio = switch_p99 / steady_p99
    rows_out = [
        {
            "phase": "steady",
            "calls": int((~during).sum()),
            "p50_ms": float(np.percentile(latency_ms[ok & ~during], 50)),
            "p99_ms": steady_p99,
        },
        {
            "phase": "switching",
            "calls": int(during.sum()),
            "p50_ms": float(np.percentile(latency_ms[ok & during], 50)),
            "p99_ms": switch_p99,
        },
    ]
    report.emit(
        f"hps bench reload: {threads} client threads, {seconds:.0f} s, {reloads} reloads, L1 {l1}",
        rows_out,
        as_json,
        {
            "switch_p99_over_steady_p99": round(ratio, 3),
            "failed_rpcs": failed,
            "mixed_replies": mixed,
            "reload_failures": reload_failures,
            "reload_seconds": [round(s, 3) for s in reload_seconds],
            "served_version_at_end": served,
            "settings": {"rows": rows, "dim": dim, "keys_per_table_per_call": batch, "tables": len(TABLES)},
            "targets": {
                "p99_ratio_at_most_3": ratio <= P99_TARGET_RATIO,
                "no_failed_rpcs": failed == 0 and reload_failures == 0,
                "no_mixed_replies": mixed == 0,
            },
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hps bench reload", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--reloads", type=int, default=5, help="reloads to a new version, spread over the run")
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--rows", type=int, default=50_000, help="rows per table and version")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="keys per table per lookup")
    parser.add_argument("--l1", choices=servers.L1_CHOICES, default="cpu", help="L1 of the served model")
    args = parser.parse_args(argv)
    run(args.json, args.seconds, args.reloads, args.threads, args.rows, args.dim, args.batch, args.l1)


if __name__ == "__main__":
    main()
