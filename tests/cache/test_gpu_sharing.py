"""One CUDA cache, or static table, shared by several processes (CUDA IPC): what one writes another reads,
concurrent replace/query/update/invalidate from several processes keep every hit exact, a writer that dies
part-way leaves no torn rows, and the rows are on the device once.

Runs where CuPy sees an NVIDIA GPU; elsewhere every test skips, saying it needs one. Other processes are
spawned (CUDA cannot open an IPC handle in the process that made it, and a forked CUDA process is unsafe).
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

try:
    import cupy as cp

    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no CuPy, or no driver/device
    HAVE_GPU = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU with CuPy")]

if HAVE_GPU:
    from hps_server.cache.gpu import GpuEmbeddingCache, GpuStaticTable, StaticLayout
    from hps_server.cache.gpu_sharing import SharedState, SharedStateSpec

CAPACITIES = [2048, 1024]
DIM = 64
BIG = [1 << 20]
KEY_SPACE = 20_000


def rows_for(keys: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """The one right vector of each (table, key): a hit with anything else is a torn or misplaced row."""
    base = (keys % 100_003).astype(np.float32) + 0.5 * tables.astype(np.float32)
    return base[:, None] + np.arange(DIM, dtype=np.float32)[None, :] / 8


def _owner(folder: Path) -> GpuEmbeddingCache:
    return GpuEmbeddingCache(CAPACITIES, DIM, shared=SharedState(folder, "l1-test"))


def _opened(spec: SharedStateSpec, capacities: list[int] = CAPACITIES, dim: int = DIM) -> GpuEmbeddingCache:
    return GpuEmbeddingCache(capacities, dim, shared=SharedState.open(spec))


def _query_in_child(spec: SharedStateSpec, keys: np.ndarray, tables: np.ndarray, out: multiprocessing.Queue) -> None:
    vectors, hit = _opened(spec).query(keys, tables)
    out.put((vectors.copy(), hit.copy()))


def _replace_in_child(spec: SharedStateSpec, keys: np.ndarray, tables: np.ndarray) -> None:
    _opened(spec).replace(keys, rows_for(keys, tables), tables)


def _churn(spec: SharedStateSpec, seed: int, steps: int, out: multiprocessing.Queue) -> None:
    """Random queries (misses replaced with their right rows), updates and invalidates; counts wrong hits."""
    cache = _opened(spec)
    rng = np.random.default_rng(seed)
    wrong = hits = 0
    for _ in range(steps):
        n = int(rng.integers(1, 4000))
        keys = rng.integers(0, KEY_SPACE, n).astype(np.int64)
        tables = rng.integers(0, len(CAPACITIES), n).astype(np.int32)
        kind = rng.choice(["query", "query", "update", "invalidate"])
        if kind == "query":
            vectors, hit = cache.query(keys, tables)
            hits += int(hit.sum())
            wrong += int((vectors[hit] != rows_for(keys, tables)[hit]).any(axis=1).sum())
            cache.replace(keys[~hit], rows_for(keys[~hit], tables[~hit]), tables[~hit])
        elif kind == "update":
            cache.update(keys, rows_for(keys, tables), tables)
        else:
            cache.invalidate(keys, tables)
    out.put((wrong, hits))


def _spawn(target: object, *args: object) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def test_a_row_one_process_replaces_is_a_hit_in_another(tmp_path: Path) -> None:
    owner = _owner(tmp_path)
    keys = np.arange(500, dtype=np.int64) * 7
    tables = (keys % 2).astype(np.int32)
    child = _spawn(_replace_in_child, owner.shared.spec, keys, tables)
    child.join(120)
    assert child.exitcode == 0
    vectors, hit = owner.query(keys, tables)
    assert hit.all()
    np.testing.assert_array_equal(vectors, rows_for(keys, tables))
    owner.invalidate(keys[:100], tables[:100])
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    child = _spawn(_query_in_child, owner.shared.spec, keys, tables, out)
    got, seen = out.get(timeout=120)
    child.join(120)
    assert not seen[:100].any() and seen[100:].all()
    np.testing.assert_array_equal(got[100:], rows_for(keys[100:], tables[100:]))


def test_concurrent_writers_and_readers_in_several_processes_never_see_a_wrong_row(tmp_path: Path) -> None:
    owner = _owner(tmp_path)
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    children = [_spawn(_churn, owner.shared.spec, seed, 150, out) for seed in range(4)]
    results = [out.get(timeout=300) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert sum(wrong for wrong, _ in results) == 0
    assert sum(hits for _, hits in results) > 0
    # What is left follows the reference's rules: every row right, no key twice, within each capacity.
    for table, capacity in enumerate(CAPACITIES):
        keys, vectors, _ = owner.dump(table)
        assert len(keys) <= capacity
        assert len(np.unique(keys)) == len(keys)
        np.testing.assert_array_equal(vectors, rows_for(keys, np.full(len(keys), table)))


def test_a_writer_that_died_holding_the_lock_leaves_an_empty_cache_not_torn_rows(tmp_path: Path) -> None:
    owner = _owner(tmp_path)
    keys = np.arange(800, dtype=np.int64)
    tables = np.zeros(800, np.int32)
    owner.replace(keys, rows_for(keys, tables), tables)
    gone = _spawn(os.getpid)  # a pid that no process holds any more
    gone.join(60)
    assert owner.shared is not None
    owner.shared.words[1] = gone.pid  # as a process killed inside replace() leaves it
    _, hit = owner.query(keys, tables)
    assert not hit.any()  # the cache was emptied before the query read it
    assert owner.shared.words[1] == 0
    owner.replace(keys, rows_for(keys, tables), tables)
    vectors, hit = owner.query(keys, tables)
    assert hit.all()
    np.testing.assert_array_equal(vectors, rows_for(keys, tables))


def _free_after_opening(spec: SharedStateSpec, out: multiprocessing.Queue) -> None:
    cp.cuda.Device(0).use()
    cp.zeros(1)  # the context first: its own memory is not the cache's
    before = cp.cuda.runtime.memGetInfo()[0]
    cache = _opened(spec, BIG, 128)
    out.put((before, cp.cuda.runtime.memGetInfo()[0], cache.capacity))


def test_opening_a_shared_cache_allocates_no_copy_of_its_rows(tmp_path: Path) -> None:
    owner = GpuEmbeddingCache(BIG, 128, shared=SharedState(tmp_path, "l1-big"))  # 512 MiB of rows
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    child = _spawn(_free_after_opening, owner.shared.spec, out)
    before, after, capacity = out.get(timeout=120)
    child.join(60)
    assert capacity == owner.capacity
    assert before - after < 64 << 20  # small arrays and the kernels, nowhere near the 512 MiB of rows


# ---------------------------------------------------------------- static tables

STATIC_KEYS = np.arange(0, 3 * KEY_SPACE, 3, dtype=np.int64)  # every third key: the others are absent
STATIC_TABLES = (STATIC_KEYS % 2).astype(np.int32)


def _static_owner(folder: Path, keys: np.ndarray = STATIC_KEYS, tables: np.ndarray = STATIC_TABLES) -> GpuStaticTable:
    shared = SharedState(folder, "static-test")
    return GpuStaticTable(keys, rows_for(keys, tables), tables=tables, num_tables=2, shared=shared)


def _static_churn(
    layout: StaticLayout, spec: SharedStateSpec, seed: int, steps: int, out: multiprocessing.Queue
) -> None:
    """Random queries over present and absent keys (misses of present keys replaced, which revives them),
    updates and invalidates; counts wrong hits and hits of absent keys."""
    table = GpuStaticTable.open(layout, 0, SharedState.open(spec))
    rng = np.random.default_rng(seed)
    wrong = hits = absent_hits = 0
    for _ in range(steps):
        n = int(rng.integers(1, 4000))
        keys = rng.integers(0, 3 * KEY_SPACE, n).astype(np.int64)
        tables = (keys % 2).astype(np.int32)
        kind = rng.choice(["query", "query", "update", "invalidate"])
        if kind == "query":
            vectors, hit = table.query(keys, tables)
            hits += int(hit.sum())
            absent_hits += int((hit & (keys % 3 != 0)).sum())
            wrong += int((vectors[hit] != rows_for(keys, tables)[hit]).any(axis=1).sum())
            refill = ~hit & (keys % 3 == 0)
            table.replace(keys[refill], rows_for(keys[refill], tables[refill]), tables[refill])
        elif kind == "update":
            table.update(keys, rows_for(keys, tables), tables)
        else:
            table.invalidate(keys, tables)
    out.put((wrong, hits, absent_hits))


def _static_query_in_child(
    layout: StaticLayout, spec: SharedStateSpec, keys: np.ndarray, out: multiprocessing.Queue
) -> None:
    cp.cuda.Device(0).use()
    cp.zeros(1)
    before = cp.cuda.runtime.memGetInfo()[0]
    table = GpuStaticTable.open(layout, 0, SharedState.open(spec))
    vectors, hit = table.query(keys, (keys % 2).astype(np.int32))
    table.invalidate(keys[:10], (keys[:10] % 2).astype(np.int32))
    out.put((vectors.copy(), hit.copy(), before - cp.cuda.runtime.memGetInfo()[0]))


def test_a_static_table_built_in_one_process_is_read_and_written_by_another(tmp_path: Path) -> None:
    owner = _static_owner(tmp_path)
    assert owner.shared is not None
    asked = np.arange(0, 600, dtype=np.int64)
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    child = _spawn(_static_query_in_child, owner.layout, owner.shared.spec, asked, out)
    got, hit, allocated = out.get(timeout=120)
    child.join(120)
    assert child.exitcode == 0
    np.testing.assert_array_equal(hit, asked % 3 == 0)
    np.testing.assert_array_equal(got[hit], rows_for(asked[hit], (asked[hit] % 2).astype(np.int32)))
    assert allocated < owner.layout.rows * DIM * 4 + (8 << 20)  # small arrays and kernels, no copy of the rows
    _, seen = owner.query(asked, (asked % 2).astype(np.int32))
    np.testing.assert_array_equal(seen, (asked % 3 == 0) & (asked >= 10))  # the child's invalidate reached it


def test_concurrent_writes_and_reads_of_a_shared_static_table_never_see_a_wrong_row(tmp_path: Path) -> None:
    owner = _static_owner(tmp_path)
    assert owner.shared is not None
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    children = [_spawn(_static_churn, owner.layout, owner.shared.spec, seed, 150, out) for seed in range(4)]
    results = [out.get(timeout=300) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert sum(r[0] for r in results) == 0
    assert sum(r[1] for r in results) > 0
    assert sum(r[2] for r in results) == 0  # a static table never takes a key it was not built with
    for table in (0, 1):
        keys, vectors = owner.dump(table)
        assert np.isin(keys, STATIC_KEYS[np.equal(STATIC_TABLES, table)]).all()
        np.testing.assert_array_equal(vectors, rows_for(keys, np.full(len(keys), table)))


def test_a_writer_that_died_holding_a_static_tables_lock_leaves_every_row_missing_until_refilled(
    tmp_path: Path,
) -> None:
    owner = _static_owner(tmp_path)
    gone = _spawn(os.getpid)
    gone.join(60)
    assert owner.shared is not None
    owner.shared.words[1] = gone.pid  # as a process killed inside update() leaves it
    _, hit = owner.query(STATIC_KEYS, STATIC_TABLES)
    assert not hit.any()  # no row is trusted: each may be half-written
    owner.replace(STATIC_KEYS[:100], rows_for(STATIC_KEYS[:100], STATIC_TABLES[:100]), STATIC_TABLES[:100])
    vectors, hit = owner.query(STATIC_KEYS, STATIC_TABLES)
    assert hit[:100].all() and not hit[100:].any()
    np.testing.assert_array_equal(vectors[:100], rows_for(STATIC_KEYS[:100], STATIC_TABLES[:100]))
