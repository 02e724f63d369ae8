"""Benchmark: fetch rows/s of the Redis Cluster level against plain redis-py MGET, same cluster, same keys.

Starts its own throwaway cluster on free loopback ports; prints a table (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from hps_bench import report
from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_server.storage.redis_cluster import RedisClusterLevel

TABLE = "bench.table"
BATCH = 26_624
DIM = 128
TARGET_RATIO = 2.0


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _check_same_rows(
    level: RedisClusterLevel, plain: redis.RedisCluster, keys: np.ndarray, vectors: np.ndarray, query: np.ndarray
) -> None:
    """Both readers must return the stored rows, or the timing compares different work."""
    sorter = np.argsort(keys)
    expected = vectors[sorter[np.searchsorted(keys, query, sorter=sorter)]]
    got, found = level.fetch(TABLE, query)
    values: list[Any] = plain.mget_nonatomic([f"{TABLE}:{k}" for k in query.tolist()])
    if not (found.all() and np.array_equal(got, expected)):
        raise RuntimeError("RedisClusterLevel returned wrong rows")
    if not np.array_equal(np.frombuffer(b"".join(values), dtype="<f4").reshape(-1, DIM), expected):
        raise RuntimeError("plain MGET returned wrong rows")


def _measure(seed: str, rows: int, batch: int, batches: int, repeats: int) -> tuple[float, float]:
    """(seconds RedisClusterLevel took, seconds plain MGET took) for the same batches on the cluster at `seed`."""
    rng = np.random.default_rng(0)
    keys = rng.choice(2**62, size=rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    queries = [rng.choice(keys, batch) for _ in range(batches)]
    level = RedisClusterLevel(seed, timeout_ms=5000)
    host, port = seed.split(":")
    plain = redis.RedisCluster(host=host, port=int(port), socket_timeout=5.0)
    try:
        level.create_table(TABLE, DIM)
        for start in range(0, rows, batch):
            chunk = slice(start, start + batch)
            level.insert(TABLE, keys[chunk], vectors[chunk])
            names = [f"{TABLE}:{k}" for k in keys[chunk].tolist()]
            plain.mset_nonatomic(dict(zip(names, vectors[chunk].view(f"V{DIM * 4}").reshape(-1).tolist(), strict=True)))

        def hps_level() -> None:
            for query in queries:
                level.fetch(TABLE, query)

        def plain_mget() -> None:
            # What a user writes without this level: one Redis key per row, MGET across the cluster.
            for query in queries:
                values: list[Any] = plain.mget_nonatomic([f"{TABLE}:{k}" for k in query.tolist()])
                np.frombuffer(b"".join(values), dtype="<f4").reshape(-1, DIM)

        _check_same_rows(level, plain, keys, vectors, queries[0])
        level_s = plain_s = 0.0
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            level_s += _seconds(hps_level)
            plain_s += _seconds(plain_mget)
        return level_s, plain_s
    finally:
        level.close()
        plain.close()


def run(
    json_out: bool = False,
    rows: int = 100_000,
    batch: int = BATCH,
    batches: int = 8,
    repeats: int = 3,
    seed: str | None = None,
) -> dict[str, Any]:
    """Measures both readers on the same cluster and keys, prints a table (or one JSON object) and returns
    the figures. seed: host:port of a cluster to use (its keys are overwritten); None starts a throwaway one."""
    if seed is None:
        with (
            tempfile.TemporaryDirectory(prefix="hps-bench-redis-") as root,
            RedisClusterProcesses(Path(root)).start() as cluster,
        ):
            level_s, plain_s = _measure(cluster.seed, rows, batch, batches, repeats)
    else:
        level_s, plain_s = _measure(seed, rows, batch, batches, repeats)
    timed = batches * repeats
    ratio = plain_s / level_s
    title = f"Redis Cluster fetch, batches of {batch:,} keys, dim {DIM}: hps level vs plain redis-py, same keys"
    table = [
        {
            "reader": "RedisClusterLevel (HPS layout)",
            "rows_per_s": timed * batch / level_s,
            "ms_per_batch": 1000 * level_s / timed,
            "vs_plain": ratio,
        },
        {
            "reader": "redis-py mget_nonatomic, key per row",
            "rows_per_s": timed * batch / plain_s,
            "ms_per_batch": 1000 * plain_s / timed,
            "vs_plain": 1.0,
        },
    ]
    extra = {
        "batch_keys": batch,
        "dim": DIM,
        "rows_in_cluster": rows,
        "batches_timed": timed,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    report.emit(title, table, json_out, extra)
    return {"benchmark": title, "rows": table, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench redis", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--rows", type=int, default=100_000, help="rows loaded into the cluster")
    parser.add_argument("--batch", type=int, default=BATCH, help="keys per fetch")
    parser.add_argument("--seed", help="host:port of an existing cluster to use (default: start a throwaway one)")
    args = parser.parse_args(argv)
    run(json_out=args.json, rows=args.rows, batch=args.batch, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
