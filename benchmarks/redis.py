"""Benchmark: fetch rows/s of the Redis Cluster level against plain redis-py MGET, same cluster, same keys.

Starts its own throwaway cluster on free loopback ports; prints a table (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from benchmarks.redis_cluster_launcher import RedisClusterProcesses
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


def run(json_out: bool = False, rows: int = 100_000, batches: int = 8, repeats: int = 3) -> dict[str, float]:
    """Measures both readers on the same cluster and keys; prints and returns every figure."""
    rng = np.random.default_rng(0)
    keys = rng.choice(2**62, size=rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    queries = [rng.choice(keys, BATCH) for _ in range(batches)]
    with (
        tempfile.TemporaryDirectory(prefix="hps-bench-redis-") as root,
        RedisClusterProcesses(Path(root)).start() as cluster,
    ):
        level = RedisClusterLevel(cluster.seed, timeout_ms=5000)
        host, port = cluster.seed.split(":")
        plain = redis.RedisCluster(host=host, port=int(port), socket_timeout=5.0)
        try:
            level.create_table(TABLE, DIM)
            for start in range(0, rows, BATCH):
                level.insert(TABLE, keys[start : start + BATCH], vectors[start : start + BATCH])
                plain.mset_nonatomic(
                    dict(
                        zip(
                            [f"{TABLE}:{k}" for k in keys[start : start + BATCH].tolist()],
                            vectors[start : start + BATCH].view(f"V{DIM * 4}").reshape(-1).tolist(),
                            strict=True,
                        )
                    )
                )

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
        finally:
            level.close()
            plain.close()
    fetched = batches * BATCH * repeats
    result = {
        "batch_keys": BATCH,
        "dim": DIM,
        "rows_in_cluster": rows,
        "batches_timed": batches * repeats,
        "hps_level_rows_per_s": fetched / level_s,
        "plain_mget_rows_per_s": fetched / plain_s,
        "hps_level_ms_per_batch": 1000 * level_s / (batches * repeats),
        "plain_mget_ms_per_batch": 1000 * plain_s / (batches * repeats),
        "ratio": plain_s / level_s,
        "target_ratio": TARGET_RATIO,
    }
    if json_out:
        print(json.dumps(result))
    else:
        print(f"Redis Cluster fetch, 3 masters + 3 replicas, batches of {BATCH:,} keys, dim {DIM}")
        print(f"{'reader':<34}{'rows/s':>14}{'ms/batch':>12}")
        print(
            f"{'RedisClusterLevel (HPS layout)':<34}"
            f"{result['hps_level_rows_per_s']:>14,.0f}{result['hps_level_ms_per_batch']:>12.1f}"
        )
        print(
            f"{'redis-py mget_nonatomic, key/row':<34}"
            f"{result['plain_mget_rows_per_s']:>14,.0f}{result['plain_mget_ms_per_batch']:>12.1f}"
        )
        print(f"ratio: {result['ratio']:.2f}x (target >= {TARGET_RATIO:.0f}x)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--rows", type=int, default=100_000, help="rows loaded into the cluster")
    args = parser.parse_args(argv)
    run(json_out=args.json, rows=args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
