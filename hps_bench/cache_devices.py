"""`hps bench cache --devices`: L1 query throughput over 1, 2, 4 ... GPUs, replicated and sharded, against one
GPU measured in the same run, plus a check that a sharded static table larger than one GPU's budget answers right.

Queries go through the host path the server uses (keys from host memory, one reply in host memory). Needs CuPy
and at least one GPU; it must never report a figure it did not measure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from hps_bench import report
from hps_server.cache import EmbeddingCache
from hps_server.cache.sharded import Gather, ShardedCache, split_rows

DIM = 128
BATCH = 1 << 20
GATHERS: tuple[Gather, ...] = ("host", "device")  # ShardedCache's ways of gathering a reply


def device_counts(available: int, asked: str) -> list[int]:
    """1, 2, 4 ... up to the devices asked for ('all' or a number, at most those available), and that number."""
    most = available if asked == "all" else min(int(asked), available)
    counts = [1 << i for i in range(most.bit_length()) if 1 << i <= most]
    return counts if counts[-1] == most else [*counts, most]


def _streams(calls: Sequence[Callable[[], object]], repeats: int) -> float:
    """Seconds for every call to run `repeats` times, each call in its own thread (a request stream)."""
    for call in calls:
        call()
    start_line = threading.Barrier(len(calls) + 1)

    def stream(call: Callable[[], object]) -> None:
        start_line.wait()
        for _ in range(repeats):
            call()

    threads = [threading.Thread(target=stream, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _filled(cache: EmbeddingCache, keys: np.ndarray, rng: np.random.Generator) -> None:
    for start in range(0, keys.size, BATCH):
        chunk = keys[start : start + BATCH]
        cache.replace(chunk, rng.standard_normal((chunk.size, DIM), dtype=np.float32))


def query_rows(counts: Sequence[int], capacity: int, repeats: int) -> list[dict[str, Any]]:
    """Sharded (one stream, each way of gathering) and replicated (one stream per device, at least two) keys/s per
    device count, and the baseline: one plain cache on GPU 0 serving one stream and the same numbers of streams."""
    from hps_server.cache.gpu import GpuEmbeddingCache

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    held = rng.choice(2**62, size=counts[-1] * capacity // 2, replace=False).astype(np.int64)
    one_copy = held[: capacity // 2]
    base = GpuEmbeddingCache(capacity, DIM, device=0)
    _filled(base, one_copy, rng)
    present = base.dump()[0]  # a few sets overflow at half load: query only what is held (every replica the same)
    stream_keys = [present[rng.integers(0, present.size, size=BATCH)] for _ in range(max(2, counts[-1]))]
    single = {1: BATCH / report.median_seconds(partial(base.query, stream_keys[0]), repeats)}  # streams -> keys/s
    for streams in sorted({max(2, count) for count in counts}):
        seconds = _streams([partial(base.query, k) for k in stream_keys[:streams]], repeats)
        single[streams] = streams * repeats * BATCH / seconds
    del base
    for count in counts:
        sharded = ShardedCache([GpuEmbeddingCache(capacity, DIM, device=d) for d in range(count)])
        mine = held[: count * capacity // 2]  # count times one GPU's rows
        _filled(sharded, mine, rng)
        held_here = sharded.dump()[0]
        keys = held_here[rng.integers(0, held_here.size, size=BATCH)]
        sharded_rates = {}
        for gather in GATHERS:
            shards = ShardedCache(sharded.shards, gather=gather)
            vectors, hit = shards.query(keys)
            assert bool(hit.all()), "every key queried is held by its shard"
            sharded_rates[gather] = BATCH / report.median_seconds(partial(shards.query, keys), repeats)
            del shards, vectors, hit
        del sharded
        replicas = [GpuEmbeddingCache(capacity, DIM, device=d) for d in range(count)]
        for replica in replicas:
            _filled(replica, one_copy, rng)
        streams = max(2, count)
        calls = [partial(replicas[i % count].query, stream_keys[i]) for i in range(streams)]
        assert all(bool(call()[1].all()) for call in calls), "replicas hold what the baseline holds"
        replicated_rate = streams * repeats * BATCH / _streams(calls, repeats)
        del replicas, calls
        rows.append(
            {
                "devices": count,
                "batch": BATCH,
                "dim": DIM,
                **{f"sharded_{g}_gather_Mkeys_s": rate / 1e6 for g, rate in sharded_rates.items()},
                **{f"sharded_{g}_gather_vs_1gpu": rate / single[1] for g, rate in sharded_rates.items()},
                "replicated_streams": streams,
                "replicated_Mkeys_s": replicated_rate / 1e6,
                "replicated_vs_1gpu_same_streams": replicated_rate / single[streams],
            }
        )
    return rows


def static_check(count: int, budget_rows: int) -> dict[str, Any]:
    """A static table of `count` x budget_rows rows sharded over `count` GPUs: every row queried with each way of
    gathering, misses and wrong vectors counted against the rows written."""
    from hps_server.cache.gpu import GpuStaticTable

    rng = np.random.default_rng(1)
    keys = rng.choice(2**62, size=count * budget_rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((keys.size, DIM), dtype=np.float32)
    parts = split_rows(keys, vectors, np.zeros(keys.size, np.int32), count)
    shards = [GpuStaticTable(k, v, tables=t, num_tables=1, device=d) for d, (k, v, t) in enumerate(parts)]
    del parts
    found: dict[str, Any] = {
        "devices": count,
        "rows": int(keys.size),
        "rows_per_gpu_budget": budget_rows,
        "largest_shard_rows": max(s.capacity for s in shards),
    }
    for gather in GATHERS:
        table = ShardedCache(shards, gather=gather)
        wrong = missed = 0
        for start in range(0, keys.size, BATCH):
            got, hit = table.query(keys[start : start + BATCH])
            missed += int((~hit).sum())
            wrong += int(np.count_nonzero(np.any(got != vectors[start : start + BATCH], axis=1)))
        found[f"{gather}_gather_missed"], found[f"{gather}_gather_wrong_vectors"] = missed, wrong
    return found
