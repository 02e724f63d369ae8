"""Benchmark: rows/s the update feed applies to every level (L1, Redis, RocksDB), against a plain redis-py
XREAD of the same messages from the same stream in the same run.

Starts its own throwaway cluster on free loopback ports; prints a table (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import redis

from hps_bench import report
from hps_bench.redis_cluster_launcher import RedisClusterProcesses
from hps_client.feed import UpdatePublisher
from hps_server import config as config_module
from hps_server.models import HostedModels
from hps_server.updates import UpdateFeed

DIM = 64
STREAM = "hps_bench_feed"
TARGET_RATIO = 0.8


def _config(directory: Path, seed: str, rows: int, messages: int) -> config_module.Config:
    raw = {
        "server": {"address": "127.0.0.1:0"},
        "volatile_db": {"type": "redis_cluster", "address": seed, "initial_cache_rate": 0.0, "timeout_ms": 5000},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        # The stream is read by the feed the benchmark starts itself, from the first message.
        "updates": {"enabled": False, "stream": STREAM, "max_len": messages * 2, "read_count": 64},
        "models": [
            {
                "name": "bench",
                "gpucache": True,
                "gpucacheper": 1.0,
                "tables": [{"name": "table", "dim": DIM}],
                "max_batch_size": rows,
            }
        ],
    }
    return config_module.parse(raw, directory)


def _plain_xread(seed: str, count: int) -> tuple[int, float]:
    """(rows, seconds) of reading the whole stream with redis-py XREAD, vectors as arrays."""
    host, port = seed.split(":")
    plain = redis.RedisCluster(host=host, port=int(port), socket_timeout=30.0)
    try:
        rows, position = 0, "0-0"
        started = time.perf_counter()
        while True:
            reply: Any = plain.xread({STREAM: position}, count=count)
            if not reply:
                return rows, time.perf_counter() - started
            entries = reply[0][1]
            for _, fields in entries:
                rows += len(np.frombuffer(fields[b"vectors"], "<f4").reshape(-1, DIM))
            position = entries[-1][0]
    finally:
        plain.close()


def _feed(config: config_module.Config, last_id: bytes, rows: int) -> float:
    """Seconds a fresh UpdateFeed takes to apply the whole stream (read from its start) to every level."""
    models = HostedModels.open(config)
    try:
        feed = UpdateFeed(
            replace(config.updates, enabled=True),
            config.volatile_db,
            lambda: models.sessions,
            start_after=b"0-0",
        )
        started = time.perf_counter()
        feed.start()
        if not feed.wait_applied(last_id, timeout=600):
            raise RuntimeError("the feed did not apply the stream within 10 minutes")
        seconds = time.perf_counter() - started
        feed.close()
        if feed.applied_rows != rows:
            raise RuntimeError(f"the feed applied {feed.applied_rows} rows, {rows} were published")
        return seconds
    finally:
        models.close()


def _levels_alone(config: config_module.Config, keys: np.ndarray, vectors: np.ndarray, batch: int) -> float:
    """Seconds the same rows take written straight into the same levels, in the feed's batch size (no stream)."""
    models = HostedModels.open(config)
    try:
        session = models.sessions["bench"]
        started = time.perf_counter()
        for start in range(0, len(keys), batch):
            session.apply_update("table", "upsert", keys[start : start + batch], vectors[start : start + batch], False)
        return time.perf_counter() - started
    finally:
        models.close()


def run(json_out: bool = False, messages: int = 100, rows_per_message: int = 4096, repeats: int = 2) -> dict[str, Any]:
    rows = messages * rows_per_message
    rng = np.random.default_rng(0)
    keys = rng.choice(2**62, size=rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    with (
        tempfile.TemporaryDirectory(prefix="hps-bench-feed-") as root,
        RedisClusterProcesses(Path(root) / "redis").start() as cluster,
    ):
        config = _config(Path(root), cluster.seed, rows_per_message, messages)
        with UpdatePublisher(
            cluster.seed, stream=STREAM, max_len=messages * 2, rows_per_message=rows_per_message
        ) as publisher:
            publisher.upsert("bench", "table", keys, vectors)
        with redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0]) as plain:
            newest: Any = plain.xrevrange(STREAM, count=1)
        last_id: bytes = newest[0][0]
        feed_s = plain_s = levels_s = 0.0
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits all alike
            read_rows, seconds = _plain_xread(cluster.seed, config.updates.read_count)
            if read_rows != rows:
                raise RuntimeError(f"XREAD read {read_rows} rows, {rows} were published")
            plain_s += seconds
            feed_s += _feed(config, last_id, rows)
            levels_s += _levels_alone(config, keys, vectors, rows_per_message * config.updates.read_count)
    ratio = plain_s / feed_s
    title = f"Update feed, {messages} messages of {rows_per_message:,} rows, dim {DIM}: applied vs plain XREAD"
    table = [
        {
            "reader": "UpdateFeed: L1 + Redis + RocksDB",
            "rows_per_s": repeats * rows / feed_s,
            "seconds": feed_s / repeats,
            "vs_xread": ratio,
        },
        {
            "reader": "the same rows written straight into the levels",
            "rows_per_s": repeats * rows / levels_s,
            "seconds": levels_s / repeats,
            "vs_xread": plain_s / levels_s,
        },
        {
            "reader": "redis-py XREAD",
            "rows_per_s": repeats * rows / plain_s,
            "seconds": plain_s / repeats,
            "vs_xread": 1.0,
        },
    ]
    extra = {
        "dim": DIM,
        "messages": messages,
        "rows_per_message": rows_per_message,
        "ratio": round(ratio, 3),
        # What reading the stream costs the feed beyond the level writes it does anyway.
        "feed_vs_levels_alone": round(levels_s / feed_s, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    report.emit(title, table, json_out, extra)
    return {"benchmark": title, "rows": table, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench feed", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--messages", type=int, default=100, help="messages in the stream")
    parser.add_argument("--rows-per-message", type=int, default=4096, help="rows per message")
    parser.add_argument("--repeats", type=int, default=2, help="times each reader reads the whole stream")
    args = parser.parse_args(argv)
    run(json_out=args.json, messages=args.messages, rows_per_message=args.rows_per_message, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
