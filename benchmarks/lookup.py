"""`hps bench lookup`: Lookup RPC throughput and latency as ratios to a raw-bytes gRPC echo of the same sizes.

Serves a generated model with `hps serve` (warm in-process hash map over RocksDB) and, in the same run, the
echo server; calls alternate between the two in blocks so both see the same machine load.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks import echo_server, report, servers
from hps_client import Client, wire

MODEL = "bench"
WIDE_TABLES = 26
# Client threads for the throughput figures (latency figures come from one thread's sequential calls).
CLIENT_THREADS = 4


@dataclass(frozen=True)
class Case:
    name: str
    keys_by_table: dict[str, int]
    dim: int
    requests: int
    targets: str


def _cases(scale: float) -> list[Case]:
    return [
        Case(
            "a: 1,024 samples x 26 keys, dim 128",
            {"d128": 26 * 1024},
            128,
            max(10, int(60 * scale)),
            "bytes/s >= 0.8x echo",
        ),
        Case("b: 1 sample x 26 keys, dim 16", {"d16": 26}, 16, max(100, int(3000 * scale)), "p50 <= 1.5x echo"),
        Case(
            "26 tables x 1,024 keys, dim 128",
            {f"t{i:02d}": 1024 for i in range(WIDE_TABLES)},
            128,
            max(10, int(60 * scale)),
            "(no target)",
        ),
    ]


def _make_model(directory: Path, port: int, rows: int) -> tuple[Path, dict[str, np.ndarray]]:
    """Writes the tables and a config serving them; returns the config path and each table's keys."""
    rng = np.random.default_rng(7)
    specs = {"d128": (rows, 128, 26), "d16": (rows, 16, 26)}
    specs |= {f"t{i:02d}": (max(1, rows // 25), 128, 1) for i in range(WIDE_TABLES)}
    served = {}
    for name, (table_rows, dim, per_sample) in specs.items():
        keys = rng.permutation(table_rows * 4)[:table_rows].astype(np.int64)
        served[name] = (keys, rng.standard_normal((table_rows, dim), dtype=np.float32), per_sample)
    path = servers.write_served_model(directory, port, MODEL, served, max_batch_size=1024)
    return path, {name: keys for name, (keys, _, _) in served.items()}


def _throughput(call: Callable[[], object], threads: int, calls: int) -> float:
    """Calls per second with `threads` client threads sharing `calls` calls."""
    per_thread = max(1, calls // threads)

    def worker() -> None:
        for _ in range(per_thread):
            call()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return per_thread * threads / (time.perf_counter() - start)


def _measure(
    case: Case,
    client: Client,
    echo_stub: Callable[[bytes], bytes],
    key_sets: dict[str, np.ndarray],
    rng: np.random.Generator,
    blocks: int = 5,
) -> dict[str, float | str | int]:
    batch = {t: rng.choice(key_sets[t], size=n) for t, n in case.keys_by_table.items()}
    request_bytes = wire.tables_request(MODEL, batch).ByteSize()
    reply_rows = sum(case.keys_by_table.values())
    reply_bytes = reply_rows * case.dim * 4
    echo_request = echo_server.request(reply_bytes, request_bytes)

    def lookup() -> object:
        return client.lookup_tables(MODEL, batch)

    def echo() -> object:
        return echo_stub(echo_request)

    for call in (lookup, echo):  # warm both paths
        report.timed(call, 3)
    hps_times: list[float] = []
    echo_times: list[float] = []
    per_block = max(1, case.requests // blocks)
    for _ in range(blocks):
        hps_times += report.timed(lookup, per_block)
        echo_times += report.timed(echo, per_block)
    hps = np.array(hps_times)
    base = np.array(echo_times)
    hps_calls = echo_calls = 0.0
    for _ in range(blocks):  # throughput: concurrent clients, so server work overlaps other calls' transfers
        hps_calls += _throughput(lookup, CLIENT_THREADS, case.requests // blocks)
        echo_calls += _throughput(echo, CLIENT_THREADS, case.requests // blocks)
    return {
        "case": case.name,
        "reply_MB": reply_bytes / 1e6,
        "hps_rows_per_s": reply_rows * hps_calls / blocks,
        "hps_MB_per_s": reply_bytes * hps_calls / blocks / 1e6,
        "echo_MB_per_s": reply_bytes * echo_calls / blocks / 1e6,
        "bytes_ratio": hps_calls / echo_calls,
        "hps_p50_ms": float(np.percentile(hps, 50) * 1e3),
        "echo_p50_ms": float(np.percentile(base, 50) * 1e3),
        "p50_ratio": float(np.percentile(hps, 50) / np.percentile(base, 50)),
        "hps_p99_ms": float(np.percentile(hps, 99) * 1e3),
        "echo_p99_ms": float(np.percentile(base, 99) * 1e3),
        "p99_ratio": float(np.percentile(hps, 99) / np.percentile(base, 99)),
        "target": case.targets,
    }


def run(scale: float = 1.0, rows: int = 100_000) -> list[dict[str, float | str | int]]:
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        port = servers.free_port()
        config, key_sets = _make_model(Path(tmp), port, rows)
        rng = np.random.default_rng(11)
        with (
            servers.hps_server(config, port) as target,
            servers.echo_server() as echo_target,
            Client(target) as client,
            grpc.insecure_channel(echo_target, options=echo_server.OPTIONS) as channel,
        ):
            echo_stub = channel.unary_unary(echo_server.METHOD)
            return [_measure(case, client, echo_stub, key_sets, rng) for case in _cases(scale)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench lookup", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each large table")
    args = parser.parse_args(argv)
    rows = run(args.scale, args.rows)
    a, b = rows[0], rows[1]
    report.emit(
        f"Lookup RPC vs raw gRPC echo of the same sizes (throughput: {CLIENT_THREADS} client threads; "
        "latency: one thread, sequential calls)",
        rows,
        args.json,
        extra={
            "a_bytes_ratio": round(float(a["bytes_ratio"]), 3),
            "a_target_met": float(a["bytes_ratio"]) >= 0.8,
            "b_p50_ratio": round(float(b["p50_ratio"]), 3),
            "b_target_met": float(b["p50_ratio"]) <= 1.5,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
