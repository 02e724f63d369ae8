"""Benchmark: how long after an Upsert on one replica another replica sharing the Redis Cluster answers the
new vector, and how many answers are still the old vector past the bound (two `hps serve` processes,
each with its own RocksDB and a warm L1 holding every row).

Baseline from the same run: a plain Lookup on the second replica (the propagation is also given in
lookups). Starts its own throwaway cluster; prints a table (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hps_bench import report
from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_bench.servers import free_port, hps_server, server_env
from hps_client import Client
from hps_server import tables as table_files

DIM = 64
ROWS = 10_000
BOUND_S = 0.050
TARGET_P99_S = 0.050
GIVE_UP_S = 2.0


def _write_replica(directory: Path, seed: str, port: int, keys: np.ndarray, vectors: np.ndarray) -> Path:
    directory.mkdir(parents=True)
    table_files.write_table(directory / "table", [(keys, vectors)], DIM)
    config = {
        "server": {"address": f"127.0.0.1:{port}"},
        "volatile_db": {"type": "redis_cluster", "address": seed, "initial_cache_rate": 1.0, "timeout_ms": 1000},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "updates": {"stream": "hps_bench_replicas"},
        "models": [
            {
                "name": "bench",
                "gpucache": True,
                "gpucacheper": 1.0,
                "tables": [{"name": "table", "dim": DIM, "source": "table"}],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _measure(writer: Client, reader: Client, keys: np.ndarray, upserts: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    delays, lookups, stale, unseen = [], [], 0, 0
    for i in range(upserts):
        key = keys[[int(rng.integers(len(keys)))]]
        new = np.full((1, DIM), float(i + 1), np.float32)
        writer.upsert("bench", "table", key, new)
        acknowledged = time.perf_counter()
        seen = None
        while True:
            started = time.perf_counter()
            got = reader.lookup("bench", "table", key)
            now = time.perf_counter()
            lookups.append(now - started)
            fresh = bool(np.array_equal(got, new))
            if not fresh and started - acknowledged > BOUND_S:
                stale += 1  # an old answer to a lookup sent after the bound
            if fresh and seen is None:
                seen = now - acknowledged
                delays.append(seen)
            if seen is not None and now - acknowledged > seen + 0.002:  # it stays new: looked at once more
                break
            if now - acknowledged > GIVE_UP_S:
                unseen += 1
                break
    delay = np.array(delays) if delays else np.array([np.inf])
    lookup = np.array(lookups)
    return {
        "upserts": upserts,
        "p50_ms": 1000 * float(np.percentile(delay, 50)),
        "p99_ms": 1000 * float(np.percentile(delay, 99)),
        "max_ms": 1000 * float(delay.max()),
        "over_bound": int((delay > BOUND_S).sum()),  # upserts B took longer than the bound to answer
        "stale_after_bound": stale,  # B's answers to lookups sent past the bound that were the old vector
        "never_seen": unseen,
        "lookup_p50_ms": 1000 * float(np.percentile(lookup, 50)),
        "p99_in_lookups": float(np.percentile(delay, 99) / np.percentile(lookup, 50)),
    }


def run(json_out: bool = False, upserts: int = 2000) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    keys = rng.choice(2**40, size=ROWS, replace=False).astype(np.int64)
    vectors = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    with (
        tempfile.TemporaryDirectory(prefix="hps-bench-replicas-") as root,
        RedisClusterProcesses(Path(root) / "redis").start() as cluster,
        contextlib.ExitStack() as stack,
    ):
        targets = []
        for name in ("a", "b"):
            port = free_port()
            config = _write_replica(Path(root) / name, cluster.seed, port, keys, vectors)
            targets.append(stack.enter_context(hps_server(config, port, server_env("cpu"))))
        writer, reader = (stack.enter_context(Client(target)) for target in targets)
        reader.lookup("bench", "table", keys[:1000])
        figures = _measure(writer, reader, keys, upserts)
    title = f"Cross-replica update: Upsert on replica A (dim {DIM}), until replica B answers the new vector"
    extra = {
        "bound_ms": 1000 * BOUND_S,
        "target_p99_ms": 1000 * TARGET_P99_S,
        "target_met": figures["p99_ms"] <= 1000 * TARGET_P99_S
        and figures["stale_after_bound"] == 0
        and figures["never_seen"] == 0,
    }
    report.emit(title, [figures], json_out, extra)
    return {"benchmark": title, "rows": [figures], **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench replicas", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--upserts", type=int, default=2000, help="upserts on replica A (each of one key)")
    args = parser.parse_args(argv)
    run(json_out=args.json, upserts=args.upserts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
