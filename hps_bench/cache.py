"""Benchmark of the GPU embedding cache: query and replace throughput, and hit rate under Zipf traffic
(--devices: over several GPUs, replicated and sharded, see cache_devices.py).

Query, static-table and replace speeds are stated against a raw random-row gather of as many rows of the
same dim in the same run (the physical ceiling: each moves a batch's rows once in and once out); the
cases match HierarchicalKV's find and insert_or_assign benchmarks (1M keys; dims 16, 64, 128; the cache
filled to a load of 0.75). Hit rates are stated against the best any fixed set of rows that size could
do. Needs CuPy and a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hps_bench import report
from hps_bench.report import emit

QUERY_BATCHES = (65_536, 1 << 20)
DIMS = (16, 64, 128)
FILL_LOAD = 0.75  # keys offered to the cache before the query runs, per row it holds (HierarchicalKV's load)
ZIPF_ALPHAS = (1.05, 1.2)
ZIPF_ROWS = 10_000_000
CACHE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
# Keys per lookup in the hit-rate runs: a serving-sized batch (1,024 samples x 64 keys). Batches far
# larger than the cache would make any LRU policy evict the hot rows within one batch.
ZIPF_BATCH = 65_536


def _timed(cp: Any, run: Callable[[], object], stream: Any, repeats: int) -> float:
    """Seconds per call: the median over `repeats` of event-timed calls on `stream`, after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def _gather_seconds(cp: Any, table: Any, batch: int, stream: Any, repeats: int) -> float:
    """Seconds per raw gather of `batch` random rows of `table`: the same-run ceiling of every case."""
    from hps_server.cache.gpu import gather

    index = cp.random.default_rng(9).integers(0, table.shape[0], size=batch, dtype=cp.int64)
    return _timed(cp, partial(gather, table, index), stream, repeats)


def query_rows(cp: Any, capacity_rows: int, repeats: int) -> list[dict[str, Any]]:
    from hps_server.cache.gpu import GpuEmbeddingCache

    rows = []
    rng = cp.random.default_rng(0)
    for dim in DIMS:
        cache = GpuEmbeddingCache(capacity_rows, dim)
        fill = cp.unique(rng.integers(0, 2**62, size=int(capacity_rows * FILL_LOAD), dtype=cp.int64))
        with cache.stream:
            cache.replace_device(fill, rng.standard_normal((fill.size, dim), dtype=cp.float32))
            present = cp.asarray(cache.dump()[0])
            table = rng.standard_normal((capacity_rows, dim), dtype=cp.float32)
        for batch in QUERY_BATCHES:
            with cache.stream:
                keys = present[rng.integers(0, present.size, size=batch)]
                _, hit = cache.query_device(keys)
                assert bool(hit.all()), "every key queried was taken from the cache's own dump"
                cached = _timed(cp, partial(cache.query_device, keys), cache.stream, repeats)
                ceiling = _gather_seconds(cp, table, batch, cache.stream, repeats)
            host = report.median_seconds(partial(cache.query, cp.asnumpy(keys)), max(3, repeats // 3))
            rows.append(
                {
                    "dim": dim,
                    "batch": batch,
                    "rows_held/capacity": present.size / cache.capacity,
                    "query_Mkeys_s": batch / cached / 1e6,
                    "gather_Mrows_s": batch / ceiling / 1e6,
                    "query/gather": ceiling / cached,
                    "host_query_Mkeys_s": batch / host / 1e6,
                }
            )
        del cache, table
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def static_rows(cp: Any, table_rows: int, repeats: int) -> list[dict[str, Any]]:
    """Queries of the static table (use_static_table), all hits, against the gather over as many rows."""
    from hps_server.cache.gpu import GpuStaticTable

    rows = []
    rng = np.random.default_rng(4)
    keys = np.unique(rng.integers(0, 2**62, size=table_rows, dtype=np.int64))
    for dim in DIMS:
        vectors = (keys[:, None] % 1009 + np.arange(dim, dtype=np.float32)[None, :]).astype(np.float32)
        static = GpuStaticTable(keys, vectors)
        del vectors
        with static.stream:
            table = cp.random.default_rng(5).standard_normal((keys.size, dim), dtype=cp.float32)
            for batch in QUERY_BATCHES:
                asked = cp.asarray(keys[rng.integers(0, keys.size, size=batch)])
                _, hit = static.query_device(asked)
                assert bool(hit.all()), "every key queried is one the table holds"
                looked_up = _timed(cp, partial(static.query_device, asked), static.stream, repeats)
                ceiling = _gather_seconds(cp, table, batch, static.stream, repeats)
                rows.append(
                    {
                        "dim": dim,
                        "batch": batch,
                        "table_rows": keys.size,
                        "static_Mkeys_s": batch / looked_up / 1e6,
                        "gather_Mrows_s": batch / ceiling / 1e6,
                        "static/gather": ceiling / looked_up,
                    }
                )
        del static, table
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def _replace_next(cache: Any, batches: Iterator[Any], vectors: Any) -> None:
    cache.replace_device(next(batches), vectors)


def replace_rows(cp: Any, capacity_rows: int, repeats: int) -> list[dict[str, Any]]:
    """Replace of all-new keys into a cache filled to FILL_LOAD (each batch evicts), and of present keys."""
    from hps_server.cache.gpu import GpuEmbeddingCache

    rows = []
    rng = cp.random.default_rng(1)
    for dim in DIMS:
        for batch in QUERY_BATCHES:
            cache = GpuEmbeddingCache(capacity_rows, dim)
            vectors = rng.standard_normal((batch, dim), dtype=cp.float32)
            fill = rng.integers(0, 2**62, size=int(capacity_rows * FILL_LOAD), dtype=cp.int64)
            batches = [rng.integers(0, 2**62, size=batch, dtype=cp.int64) for _ in range(repeats + 1)]
            table = rng.standard_normal((capacity_rows, dim), dtype=cp.float32)
            with cache.stream:
                cache.replace_device(fill, cp.zeros((fill.size, dim), cp.float32))
                fresh = _timed(cp, partial(_replace_next, cache, iter(batches), vectors), cache.stream, repeats)
                again = _timed(cp, partial(cache.replace_device, batches[-1], vectors), cache.stream, repeats)
                ceiling = _gather_seconds(cp, table, batch, cache.stream, repeats)
            rows.append(
                {
                    "dim": dim,
                    "batch": batch,
                    "insert_Mkeys_s": batch / fresh / 1e6,
                    "overwrite_Mkeys_s": batch / again / 1e6,
                    "gather_Mrows_s": batch / ceiling / 1e6,
                    "insert/gather": ceiling / fresh,
                }
            )
            del cache, table
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def zipf_rows(cp: Any, rows_total: int, batch: int, warm: int, measured: int) -> list[dict[str, Any]]:
    from hps_server.cache.gpu import GpuEmbeddingCache

    out = []
    ids = cp.random.RandomState(2).permutation(rows_total).astype(cp.int64)
    for alpha in ZIPF_ALPHAS:
        weights = cp.arange(1, rows_total + 1, dtype=cp.float64) ** -alpha
        cdf = cp.cumsum(weights)
        cdf /= cdf[-1]
        rng = cp.random.default_rng(3)
        for fraction in CACHE_FRACTIONS:
            capacity = int(rows_total * fraction)
            cache = GpuEmbeddingCache(capacity, 1)
            hits = asked = 0
            for step in range(warm + measured):
                ranks = cp.minimum(cp.searchsorted(cdf, rng.random(batch)), rows_total - 1)
                keys = ids[ranks]
                _, hit = cache.query_device(keys)
                missed = keys[~hit]
                cache.replace_device(missed, cp.zeros((missed.size, 1), cp.float32))
                if step >= warm:
                    hits += int(hit.sum())
                    asked += batch
            out.append(
                {
                    "alpha": alpha,
                    "cache_%": 100 * fraction,
                    "rows": cache.capacity,
                    "hit_rate": hits / asked,
                    "best_fixed": float(cdf[cache.capacity - 1]),
                    "hit/best": hits / asked / float(cdf[cache.capacity - 1]),
                }
            )
            del cache
            cp.get_default_memory_pool().free_all_blocks()
    return out


def rpc_rows(requests: int, rows_total: int = 200_000, dim: int = 128, batch: int = 1024) -> list[dict[str, Any]]:
    """Lookup RPCs of Zipf keys through `hps serve` with the GPU L1 and with the NumPy L1, same data."""
    import tempfile

    import yaml

    from hps_bench.servers import free_port, hps_server
    from hps_client import Client
    from hps_server import tables

    rng = np.random.default_rng(5)
    keys = rng.permutation(rows_total * 4)[:rows_total].astype(np.int64)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        tables.write_table(directory / "t", [(keys, rng.standard_normal((rows_total, dim), dtype=np.float32))], dim)
        # A device id no machine has makes the server fall back to the NumPy reference L1.
        for level, devices in (("gpu", [0]), ("numpy", [99])):
            port = free_port()
            config = {
                "server": {"address": f"127.0.0.1:{port}"},
                "volatile_db": {"type": "hash_map", "initial_cache_rate": 0.0},
                "persistent_db": {"type": "rocksdb", "path": f"rocksdb-{level}"},
                "models": [
                    {
                        "name": "m",
                        "max_batch_size": batch,
                        "gpucacheper": 0.2,
                        "deployed_device_list": devices,
                        "tables": [{"name": "t", "dim": dim, "source": "t"}],
                    }
                ],
            }
            path = directory / f"{level}.yaml"
            path.write_text(yaml.safe_dump(config))
            ranks = np.minimum(rng.zipf(1.2, size=(requests * 2, batch)) - 1, rows_total - 1)
            with hps_server(path, port) as target, Client(target) as client:
                for row in ranks[:requests]:  # warm-up: fills L1 and L2
                    client.lookup("m", "t", keys[row])
                start = time.perf_counter()
                for row in ranks[requests:]:
                    client.lookup("m", "t", keys[row])
                seconds = time.perf_counter() - start
            rates[level] = requests / seconds
    return [
        {"l1": level, "keys_per_rpc": batch, "dim": dim, "rpcs_s": rate, "vs_numpy": rate / rates["numpy"]}
        for level, rate in rates.items()
    ]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for alpha in ZIPF_ALPHAS:
        mine = [r for r in rows if r["alpha"] == alpha]
        sizes = [r["cache_%"] for r in mine]
        axes.plot(sizes, [r["hit_rate"] for r in mine], "o-", label=f"LRU cache, alpha {alpha}")
        axes.plot(sizes, [r["best_fixed"] for r in mine], "--", label=f"best fixed rows, alpha {alpha}")
    axes.set_xscale("log")
    axes.set_xlabel("cache size (% of a 10M-row table)")
    axes.set_ylabel("hit rate")
    axes.set_title("L1 hit rate under Zipf-distributed keys")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _case(rows: list[dict[str, Any]], dim: int, batch: int) -> dict[str, Any]:
    return next(r for r in rows if r["dim"] == dim and r["batch"] == batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench cache", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--plot", type=Path, default=Path("cache-hit-rate.png"), help="where the hit-rate PNG goes")
    parser.add_argument("--quick", action="store_true", help="smaller tables and fewer repeats (a smoke run)")
    parser.add_argument(
        "--devices",
        help="instead: replicated and sharded query throughput over 1, 2, 4 ... GPUs ('all' or the most to use)",
    )
    parser.add_argument(
        "--budget-rows",
        type=int,
        help="with --devices: one GPU's L1 budget in rows; the sharded static check holds twice that on 2 GPUs",
    )
    args = parser.parse_args(argv)
    if args.devices is not None and args.devices != "all" and not (args.devices.isdigit() and int(args.devices) >= 1):
        parser.error(f"--devices: must be 'all' or a number of GPUs (1 or more), got {args.devices!r}")
    try:
        import cupy as cp

        device = cp.cuda.Device(0)
        name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, driver or device
        print(f"hps bench cache needs an NVIDIA GPU with CuPy, and none is usable here: {e}", file=sys.stderr)
        return 2
    capacity = 1 << (20 if args.quick else 23)
    repeats = 5 if args.quick else 20
    if args.devices is not None:
        return _devices_main(args, name, count, capacity, repeats)
    zipf_total = ZIPF_ROWS // 10 if args.quick else ZIPF_ROWS
    with device:
        queries = query_rows(cp, capacity, repeats)
        statics = static_rows(cp, capacity // 4, repeats)
        replaces = replace_rows(cp, capacity, repeats)
        hit_rates = zipf_rows(cp, zipf_total, batch=ZIPF_BATCH, warm=30 if args.quick else 600, measured=100)
    rpcs = rpc_rows(requests=200 if args.quick else 1000)
    plot(hit_rates, args.plot)
    best = max(r["query/gather"] for r in queries if r["batch"] == QUERY_BATCHES[-1] and r["dim"] == 128)
    summary = {
        "device": name,
        "cache_rows": capacity,
        "query_vs_gather_1M_dim128": best,
        "static_vs_gather_1M_dim128": _case(statics, 128, QUERY_BATCHES[-1])["static/gather"],
        "replace_1M_dim128_Mkeys_s": _case(replaces, 128, QUERY_BATCHES[-1])["insert_Mkeys_s"],
        "replace_64K_dim128_Mkeys_s": _case(replaces, 128, QUERY_BATCHES[0])["insert_Mkeys_s"],
        "rpc_gpu_vs_numpy_l1": rpcs[0]["vs_numpy"],
        "plot": str(args.plot),
    }
    if args.json:
        sections = {"query": queries, "static": statics, "replace": replaces, "hit_rate": hit_rates, "rpc": rpcs}
        emit("cache", [], True, {**summary, **sections})
    else:
        emit("L1 query at 100% hits vs a raw random-row gather of as many rows", queries, False, summary)
        emit("Static table (use_static_table) query at 100% hits vs the gather", statics, False)
        emit("L1 replace (insert: new keys into a cache at load 0.75; overwrite: present keys)", replaces, False)
        emit(f"L1 hit rate, Zipf keys over {zipf_total:,} rows, {ZIPF_BATCH:,}-key lookups", hit_rates, False)
        emit("Lookup RPCs (one client thread, Zipf 1.2 keys) with the GPU L1 against the NumPy L1", rpcs, False)
    return 0 if math.isfinite(best) else 1


def _devices_main(args: argparse.Namespace, name: str, available: int, capacity: int, repeats: int) -> int:
    from hps_bench import cache_devices

    counts = cache_devices.device_counts(available, args.devices)
    queries = cache_devices.query_rows(counts, capacity, repeats)
    static = cache_devices.static_check(min(2, counts[-1]), args.budget_rows or capacity)
    by_count = {row["devices"]: row for row in queries}
    summary = {
        "device": name,
        "gpus": available,
        "cache_rows_per_gpu": capacity,
        **{
            f"sharded_2gpu_{gather}_gather_vs_1gpu": by_count[2][f"sharded_{gather}_gather_vs_1gpu"]
            if 2 in by_count
            else None
            for gather in cache_devices.GATHERS
        },
        "replicated_2gpu_vs_1gpu_2_streams": by_count[2]["replicated_vs_1gpu_same_streams"] if 2 in by_count else None,
        "static_wrong_vectors": sum(static[f"{gather}_gather_wrong_vectors"] for gather in cache_devices.GATHERS),
        "static_missed": sum(static[f"{gather}_gather_missed"] for gather in cache_devices.GATHERS),
    }
    if args.json:
        emit("cache devices", [], True, {**summary, "query": queries, "static": static})
    else:
        emit(
            f"L1 query, {cache_devices.BATCH:,}-key batches dim {cache_devices.DIM}, over devices",
            queries,
            False,
            summary,
        )
        count = static["devices"]
        emit(
            f"Sharded static table of {count} x one GPU's budget over {count} GPU(s): every row queried",
            [static],
            False,
        )
    return 0 if summary["static_wrong_vectors"] == 0 and summary["static_missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
