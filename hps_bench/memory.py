"""Memory per row and throughput of the in-process hash map, against a plain NumPy gather baseline.

Prints for people (a table, or one JSON object); it must not be imported by the server.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from hps_server.storage.hashmap import HashMapLevel

DEFAULT_ROWS = 1_000_000
DEFAULT_DIMS = (16, 64, 128)
DEFAULT_BATCH_ROWS = 65536


def _rows_per_second(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def measure(dim: int, rows: int, batch_rows: int, seed: int = 0) -> dict[str, float]:
    """Figures for one dim: bytes per row after `rows` inserts, and insert/fetch/gather rows/s."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=rows, dtype=np.int64))
    rng.shuffle(keys)
    vectors = rng.random((len(keys), dim), dtype=np.float32)
    order = rng.permutation(len(keys))
    batches = [slice(start, start + batch_rows) for start in range(0, len(keys), batch_rows)]

    level = HashMapLevel()
    level.create_table("bench.memory", dim)
    started = time.perf_counter()
    for batch in batches:
        level.insert("bench.memory", keys[batch], vectors[batch])
    insert_s = time.perf_counter() - started

    started = time.perf_counter()
    for batch in batches:
        fetched, found = level.fetch("bench.memory", keys[order[batch]])
    fetch_s = time.perf_counter() - started
    if not found.all():
        raise RuntimeError("hash_map lost rows during the benchmark")

    # Baseline: the same rows, same batches, gathered from a dense array by position.
    started = time.perf_counter()
    for batch in batches:
        gathered = vectors[order[batch]]
    gather_s = time.perf_counter() - started
    if not np.array_equal(fetched, gathered):
        raise RuntimeError("hash_map returned other vectors than the baseline")

    stored = level.size("bench.memory")
    bytes_per_row = level.memory_bytes("bench.memory") / stored
    raw = 8 + 4 * dim
    insert_rate = _rows_per_second(stored, insert_s)
    fetch_rate = _rows_per_second(stored, fetch_s)
    gather_rate = _rows_per_second(stored, gather_s)
    level.close()
    return {
        "dim": dim,
        "rows": stored,
        "bytes_per_row": bytes_per_row,
        "raw_bytes_per_row": raw,
        "memory_ratio": bytes_per_row / raw,
        "insert_rows_per_s": insert_rate,
        "fetch_rows_per_s": fetch_rate,
        "gather_rows_per_s": gather_rate,
        "insert_vs_gather": insert_rate / gather_rate,
        "fetch_vs_gather": fetch_rate / gather_rate,
    }


def print_table(report: dict) -> None:
    header = (
        "dim",
        "rows",
        "B/row",
        "raw B/row",
        "mem ratio",
        "insert r/s",
        "fetch r/s",
        "gather r/s",
        "ins/gather",
        "fetch/gather",
    )
    lines = [header]
    for r in report["results"]:
        lines.append(
            (
                str(r["dim"]),
                f"{r['rows']:,}",
                f"{r['bytes_per_row']:.1f}",
                str(r["raw_bytes_per_row"]),
                f"{r['memory_ratio']:.3f}",
                f"{r['insert_rows_per_s']:,.0f}",
                f"{r['fetch_rows_per_s']:,.0f}",
                f"{r['gather_rows_per_s']:,.0f}",
                f"{r['insert_vs_gather']:.3f}",
                f"{r['fetch_vs_gather']:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"hash_map memory and throughput, batches of {report['batch_rows']:,} rows (baseline: NumPy gather)")
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def run(
    json_out: bool,
    rows: int = DEFAULT_ROWS,
    dims: Sequence[int] = DEFAULT_DIMS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict:
    """Measures every dim, prints a table (or one JSON object with json_out) and returns the figures."""
    if rows < 1:
        raise ValueError(f"rows: must be at least 1, got {rows}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows: must be at least 1, got {batch_rows}")
    report = {
        "benchmark": "memory",
        "batch_rows": batch_rows,
        "results": [measure(dim, rows, batch_rows) for dim in dims],
    }
    if json_out:
        print(json.dumps(report))
    else:
        print_table(report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hps bench memory", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows inserted per dim")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DEFAULT_DIMS), help="vector sizes to measure")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per insert/fetch call")
    args = parser.parse_args(argv)
    run(args.json, rows=args.rows, dims=args.dims, batch_rows=args.batch_rows)


if __name__ == "__main__":
    main()
