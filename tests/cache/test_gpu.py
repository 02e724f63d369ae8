"""The CUDA cache against the NumPy reference: same operation sequences, identical results.

Runs where CuPy sees an NVIDIA GPU; elsewhere every test skips, saying it needs one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hps_server.cache.layout import mix, set_of
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable

try:
    import cupy as cp

    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no CuPy, or no driver/device
    HAVE_GPU = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU with CuPy")]

if HAVE_GPU:
    from hps_server.cache.gpu import GpuEmbeddingCache, GpuStaticTable


def rows_for(keys: np.ndarray, dim: int) -> np.ndarray:
    keys = np.asarray(keys, np.int64)
    return (keys[:, None] % 100_003 + np.arange(dim)[None, :] / 8).astype(np.float32)


def assert_same_state(gpu: Any, ref: Any) -> None:
    for got, want in zip(gpu.dump(), ref.dump(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert gpu.stats() == ref.stats()
    assert getattr(gpu, "clock", 0) == getattr(ref, "clock", 0)


def random_ops(rng: np.random.Generator, dim: int, key_space: int, steps: int) -> list[tuple[str, Any]]:
    ops: list[tuple[str, Any]] = []
    for _ in range(steps):
        kind = rng.choice(["query", "replace", "replace", "update", "invalidate"])
        n = int(rng.integers(0, 3000))
        keys = rng.integers(-key_space, key_space, size=n).astype(np.int64)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        ops.append((str(kind), (keys,) if kind in ("query", "invalidate") else (keys, vectors)))
    return ops


def run_ops(cache: Any, ops: list[tuple[str, Any]]) -> list[Any]:
    results = []
    for kind, args in ops:
        if kind == "query":
            results.append(cache.query_misses(*args))
        else:
            getattr(cache, kind)(*args)
    return results


@pytest.mark.parametrize(
    ("capacity", "dim", "ways", "dtype"),
    [
        (4096, 128, 32, "float32"),
        (4096, 16, 32, "float16"),
        (1000, 3, 32, "float32"),
        (77, 5, 4, "float16"),
        (32, 8, 32, "float32"),
        (1, 4, 32, "float32"),
    ],
)
def test_random_operation_sequences_match_the_reference(capacity: int, dim: int, ways: int, dtype: str) -> None:
    rng = np.random.default_rng(capacity * 131 + dim)
    ops = random_ops(rng, dim, key_space=3 * capacity + 50, steps=60)
    gpu = GpuEmbeddingCache(capacity, dim, ways=ways, dtype=dtype)
    ref = ReferenceEmbeddingCache(capacity, dim, ways=ways, dtype=dtype)
    for got, want in zip(run_ops(gpu, ops), run_ops(ref, ops), strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert_same_state(gpu, ref)


def test_a_batch_far_larger_than_the_cache_keeps_the_same_rows() -> None:
    keys = np.random.default_rng(2).integers(0, 2**62, size=200_000).astype(np.int64)
    vectors = rows_for(keys, 4)
    gpu, ref = GpuEmbeddingCache(640, 4), ReferenceEmbeddingCache(640, 4)
    for cache in (gpu, ref):
        cache.replace(keys, vectors)
        cache.replace(keys[::-1], vectors[::-1])
    assert_same_state(gpu, ref)


def test_device_variants_match_the_host_ones() -> None:
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 5000, size=4000).astype(np.int64)
    vectors = rng.standard_normal((4000, 12)).astype(np.float32)
    host, device = GpuEmbeddingCache(2048, 12), GpuEmbeddingCache(2048, 12)
    host.replace(keys, vectors)
    device.replace_device(cp.asarray(keys), cp.asarray(vectors))
    probe = rng.integers(0, 6000, size=3000).astype(np.int64)
    want_vectors, want_hit = host.query(probe)
    got_vectors, got_hit = device.query_device(cp.asarray(probe))
    np.testing.assert_array_equal(cp.asnumpy(got_vectors), want_vectors)
    np.testing.assert_array_equal(cp.asnumpy(got_hit), want_hit)
    host.invalidate(probe[:100])
    device.invalidate_device(cp.asarray(probe[:100]))
    host.update(keys[:500], vectors[:500] + 1)
    device.update_device(cp.asarray(keys[:500]), cp.asarray(vectors[:500] + 1))
    for a, b in zip(host.dump(), device.dump(), strict=True):
        np.testing.assert_array_equal(a, b)


def fingerprint_twins(num_sets: int, count: int) -> np.ndarray:
    """[groups, count] keys: each row's keys share one set and one fingerprint (mix's low 16 bits, 0 read as
    1, as fingerprint() in cache.cu), one row per set at most."""
    candidates = np.arange(1, 3_000_000, dtype=np.int64)
    hashes = mix(candidates)
    fingerprints = np.maximum((hashes & np.uint64(0xFFFF)).astype(np.int64), 1)
    buckets = set_of(hashes, num_sets) * 65_536 + fingerprints
    order = np.argsort(buckets, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(buckets[order]) != 0])
    sizes = np.diff(np.r_[starts, buckets.size])
    rows = [candidates[order[a : a + count]] for a in starts[sizes >= count]]
    sets = set_of(mix(np.array([row[0] for row in rows])), num_sets)
    return np.array(rows)[np.unique(sets, return_index=True)[1]]


def test_keys_sharing_a_set_and_a_fingerprint_are_told_apart() -> None:
    """A query copies the row of the first way whose fingerprint matches while it reads that way's key:
    where another key holds that way, the row must be copied again from the right way, or zeros for a miss."""
    dim, sets = 8, 64
    gpu, ref = GpuEmbeddingCache(sets * 32, dim), ReferenceEmbeddingCache(sets * 32, dim)
    twins = fingerprint_twins(sets, 3)
    assert twins.shape[0] > 30
    held = twins[:, :2].ravel()
    for cache in (gpu, ref):
        cache.replace(held, rows_for(held, dim))
        cache.replace(twins[::2, 1], rows_for(twins[::2, 1], dim) + 1)
        cache.invalidate(twins[1::2, 0])
    probe = np.concatenate([twins.ravel(), twins[::-1].ravel()])
    for got, want in zip(gpu.query_misses(probe), ref.query_misses(probe), strict=True):
        np.testing.assert_array_equal(got, want)
    assert gpu.stats().hits == 2 * (held.size - twins[1::2].shape[0])
    assert_same_state(gpu, ref)


@pytest.mark.parametrize("dim", [4, 128], ids=["one-pass", "two-passes"])
def test_a_lookup_of_many_blocks_ending_in_a_partial_warp_matches_the_reference(dim: int) -> None:
    """A lookup over hundreds of blocks, the last warp part full, hits and misses mixed: in one kernel, and
    in the two passes of a batch past the one-pass size (the slots found a thread per key, then the rows
    copied a warp per 32 keys)."""
    from hps_server.cache.gpu import _ONE_PASS_ELEMENTS

    n = max(1000 * 256, _ONE_PASS_ELEMENTS // 128) + 77
    rng = np.random.default_rng(15)
    gpu, ref = GpuEmbeddingCache(32_768, dim), ReferenceEmbeddingCache(32_768, dim)
    assert (n * dim > _ONE_PASS_ELEMENTS) == (dim == 128)
    stored = rng.integers(0, 80_000, size=40_000).astype(np.int64)
    probe = rng.integers(0, 80_000, size=n).astype(np.int64)
    for cache in (gpu, ref):
        cache.replace(stored, rows_for(stored, dim))
    launches = gpu.launches
    for got, want in zip(gpu.query_misses(probe), ref.query_misses(probe), strict=True):
        np.testing.assert_array_equal(got, want)
    assert gpu.launches - launches == (2 if dim == 128 else 1)
    assert_same_state(gpu, ref)


def thread_keys(num_sets: int, threads: int, per_thread: int) -> list[np.ndarray]:
    """Disjoint key pools whose sets are disjoint too: thread t owns the sets s with s % threads == t."""
    candidates = np.arange(1, 40 * threads * per_thread, dtype=np.int64)
    owner = set_of(mix(candidates), num_sets) % threads
    return [candidates[owner == t][:per_thread] for t in range(threads)]


def test_concurrent_queries_and_replaces_from_several_threads_match_the_reference() -> None:
    """Threads own disjoint sets, so every thread's results are those of its own sequence, however they interleave."""
    threads, dim = 6, 32
    gpu = GpuEmbeddingCache(32 * 60, dim)
    pools = thread_keys(gpu.geometries[0].num_sets, threads, 2000)
    sequences = []
    for t, pool in enumerate(pools):
        rng = np.random.default_rng(100 + t)
        ops = []
        for _ in range(80):
            keys = rng.choice(pool, size=int(rng.integers(1, 700)))
            ops.append(("query", (keys,)) if rng.random() < 0.5 else ("replace", (keys, rows_for(keys, dim))))
        sequences.append(ops)
    results: list[list[Any]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            results[t] = run_ops(gpu, sequences[t])
        except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    ref = ReferenceEmbeddingCache(32 * 60, dim)
    for t in range(threads):
        for got, want in zip(results[t], run_ops(ref, sequences[t]), strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
    got_keys, got_vectors, _ = gpu.dump()
    want_keys, want_vectors, _ = ref.dump()
    np.testing.assert_array_equal(got_keys, want_keys)
    np.testing.assert_array_equal(got_vectors, want_vectors)
    assert gpu.stats() == ref.stats()


def test_threads_sharing_sets_only_ever_see_true_rows() -> None:
    dim = 64
    gpu = GpuEmbeddingCache(4096, dim)
    hits = [0] * 8

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        for _ in range(40):
            keys = rng.integers(0, 20_000, size=2000).astype(np.int64)
            if t % 2:
                gpu.replace(keys, rows_for(keys, dim))
            else:
                vectors, hit = gpu.query(keys)
                np.testing.assert_array_equal(vectors[hit], rows_for(keys[hit], dim))
                assert not vectors[~hit].any()
                hits[t] += int(hit.sum())

    run_threads(work, 8)
    keys, vectors, _ = gpu.dump()
    assert np.unique(keys).size == keys.size <= 4096
    np.testing.assert_array_equal(vectors, rows_for(keys, dim))
    assert gpu.stats().hits == sum(hits) > 0


def run_threads(work: Callable[[int], None], count: int) -> None:
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize(("dim", "dtype"), [(128, "float32"), (7, "float16")])
def test_static_table_matches_the_reference(dim: int, dtype: str) -> None:
    rng = np.random.default_rng(dim)
    keys = rng.integers(-(2**62), 2**62, size=50_000).astype(np.int64)
    keys[:100] = keys[100:200]  # repeated keys: the last row wins
    vectors = rng.standard_normal((keys.size, dim)).astype(np.float32)
    gpu, ref = GpuStaticTable(keys, vectors, dtype=dtype), ReferenceStaticTable(keys, vectors, dtype=dtype)
    probe = np.concatenate([rng.choice(keys, 20_000), rng.integers(0, 2**40, 5000)])
    ops = [
        ("query", (probe,)),
        ("invalidate", (probe[:3000],)),
        ("update", (probe[1000:5000], rng.standard_normal((4000, dim)).astype(np.float32))),
        ("replace", (probe[2000:2500], rng.standard_normal((500, dim)).astype(np.float32))),
        ("query", (probe,)),
    ]
    for got, want in zip(run_ops(gpu, ops), run_ops(ref, ops), strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(gpu.dump(), ref.dump(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert gpu.stats() == ref.stats()


def test_bad_arguments_are_rejected_before_any_kernel_runs() -> None:
    gpu = GpuEmbeddingCache(64, 4)
    with pytest.raises(ValueError, match="vectors"):
        gpu.replace(np.array([1, 2]), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="keys"):
        gpu.query_device(cp.zeros((2, 2), cp.int64))
    with pytest.raises(ValueError, match="device"):
        GpuEmbeddingCache(64, 4, device=cp.cuda.runtime.getDeviceCount())
    assert gpu.stats().rows == 0


@pytest.mark.parametrize("static", [False, True], ids=["lru", "static"])
def test_a_server_with_the_gpu_level_returns_exactly_the_stored_vectors(tmp_path: Path, static: bool) -> None:
    from hps_client import Client
    from hps_server.server import HpsServer
    from tests.conftest import TABLE_SPECS, sample_config, write_sample_tables

    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    model = dataclasses.replace(config.models[0], gpucache=True, gpucacheper=0.05, use_static_table=static)
    config = dataclasses.replace(config, models=(model,))
    server = HpsServer(config)
    port = server.start()
    rng = np.random.default_rng(7)
    try:
        session = server.models.session("ctr")
        l1 = session.table("user").l1
        assert l1 is not None
        assert all(isinstance(c, GpuStaticTable if static else GpuEmbeddingCache) for c in l1.caches)
        with Client(f"127.0.0.1:{port}") as client:
            for step in range(300):
                table = "user" if step % 2 else "item"
                keys, vectors = truth[table]
                if step % 3 == 0:  # uniform over the stored keys, plus keys no level holds
                    asked = np.concatenate([rng.choice(keys, 200), rng.integers(2 * 10**6, 3 * 10**6, 56)])
                else:  # Zipf-skewed: a few hot keys carry most lookups
                    ranks = np.minimum(rng.zipf(1.2, 256) - 1, keys.size - 1)
                    asked = keys[ranks]
                got = client.lookup("ctr", table, asked)
                expected = np.full((asked.size, TABLE_SPECS[table][1]), TABLE_SPECS[table][2], np.float32)
                order = np.argsort(keys)
                at = np.clip(np.searchsorted(keys, asked, sorter=order), 0, keys.size - 1)
                held = keys[order[at]] == asked
                expected[held] = vectors[order[at[held]]]
                np.testing.assert_array_equal(got, expected)
        stats = session.cache_stats()["user"]
        assert stats.hits > 0 and stats.rows > 0
    finally:
        server.stop(grace=1)


# ---------------------------------------------------------------- several tables in one structure


def random_table_ops(
    rng: np.random.Generator, num_tables: int, dim: int, key_space: int, steps: int
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Operations whose keys are drawn from one space for all tables, so key values recur across tables;
    queries ask float32 or float16 replies."""
    ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for _ in range(steps):
        kind = str(rng.choice(["query", "replace", "replace", "update", "invalidate"]))
        n = int(rng.integers(0, 3000))
        keys = rng.integers(-key_space, key_space, size=n).astype(np.int64)
        tables = rng.integers(0, num_tables, size=n).astype((np.int32, np.int64, np.uint8)[int(rng.integers(3))])
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        if kind == "query":
            ops.append((kind, (keys, tables), {"dtype": (np.float32, np.float16)[int(rng.integers(2))]}))
        elif kind == "invalidate":
            ops.append((kind, (keys, tables), {}))
        else:
            ops.append((kind, (keys, vectors, tables), {}))
    return ops


def run_table_ops(cache: Any, ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    results = []
    for kind, args, options in ops:
        if kind == "query":
            results.append(cache.query_misses(*args, **options))
        else:
            getattr(cache, kind)(*args, **options)
    return results


def assert_same_tables(gpu: Any, ref: Any) -> None:
    for table in range(ref.num_tables):
        for got, want in zip(gpu.dump(table), ref.dump(table), strict=True):
            np.testing.assert_array_equal(got, want)
    assert gpu.table_stats() == ref.table_stats()
    assert gpu.stats() == ref.stats()
    assert getattr(gpu, "clock", 0) == getattr(ref, "clock", 0)


@pytest.mark.parametrize(
    ("capacities", "dim", "ways", "dtype"),
    [
        ([4096, 512, 77, 1], 16, 32, "float32"),
        ([300, 300, 300], 8, 4, "float16"),
        ([1000] * 26, 4, 32, "float32"),
        ([50, 2000], 3, 32, "float16"),
    ],
)
def test_random_multi_table_sequences_match_the_reference(
    capacities: list[int], dim: int, ways: int, dtype: str
) -> None:
    rng = np.random.default_rng(len(capacities) * 31 + dim)
    ops = random_table_ops(rng, len(capacities), dim, key_space=2 * max(capacities) + 50, steps=60)
    gpu = GpuEmbeddingCache(capacities, dim, ways=ways, dtype=dtype)
    ref = ReferenceEmbeddingCache(capacities, dim, ways=ways, dtype=dtype)
    assert gpu.capacities == ref.capacities and gpu.capacity == ref.capacity
    for got, want in zip(run_table_ops(gpu, ops), run_table_ops(ref, ops), strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert_same_tables(gpu, ref)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_float16_replies_are_written_by_the_kernel_as_the_reference_rounds_them(storage: str) -> None:
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 3000, size=4000).astype(np.int64)
    tables = rng.integers(0, 3, size=4000)
    vectors = (rng.standard_normal((4000, 24)) * 3e3).astype(np.float32)  # some beyond float16's range
    gpu, ref = GpuEmbeddingCache([2048] * 3, 24, dtype=storage), ReferenceEmbeddingCache([2048] * 3, 24, dtype=storage)
    for cache in (gpu, ref):
        cache.replace(keys, vectors, tables)
    wide, hit = gpu.query(keys, tables)
    narrow, narrow_hit = gpu.query(keys, tables, dtype=np.float16)
    assert narrow.dtype == np.float16 and hit.any()
    np.testing.assert_array_equal(narrow_hit, hit)
    np.testing.assert_array_equal(narrow, wide.astype(np.float16))
    np.testing.assert_array_equal(narrow, ref.query(keys, tables, dtype=np.float16)[0])
    device_narrow, _ = gpu.query_device(cp.asarray(keys), cp.asarray(tables), dtype=np.float16)
    assert device_narrow.dtype == cp.float16
    np.testing.assert_array_equal(cp.asnumpy(device_narrow), narrow)


def test_device_variants_with_tables_match_the_host_ones() -> None:
    rng = np.random.default_rng(12)
    keys = rng.integers(0, 5000, size=4000).astype(np.int64)
    tables = rng.integers(0, 4, size=4000).astype(np.int32)
    vectors = rng.standard_normal((4000, 12)).astype(np.float32)
    host, device = GpuEmbeddingCache([1024] * 4, 12), GpuEmbeddingCache([1024] * 4, 12)
    host.replace(keys, vectors, tables)
    device.replace_device(cp.asarray(keys), cp.asarray(vectors), cp.asarray(tables))
    probe, probe_tables = rng.integers(0, 6000, size=3000).astype(np.int64), rng.integers(0, 4, size=3000)
    want_vectors, want_hit = host.query(probe, probe_tables)
    got_vectors, got_hit = device.query_device(cp.asarray(probe), cp.asarray(probe_tables))
    np.testing.assert_array_equal(cp.asnumpy(got_vectors), want_vectors)
    np.testing.assert_array_equal(cp.asnumpy(got_hit), want_hit)
    host.invalidate(probe[:100], probe_tables[:100])
    device.invalidate_device(cp.asarray(probe[:100]), cp.asarray(probe_tables[:100]))
    host.update(keys[:500], vectors[:500] + 1, tables[:500])
    device.update_device(cp.asarray(keys[:500]), cp.asarray(vectors[:500] + 1), cp.asarray(tables[:500]))
    assert_same_tables(device, host)


def test_device_table_indices_out_of_range_are_misses_never_written_or_counted() -> None:
    gpu = GpuEmbeddingCache([64, 64], 2)
    keys = cp.asarray(np.array([1, 2, 3], np.int64))
    gpu.replace_device(keys, cp.ones((3, 2), cp.float32), cp.asarray(np.array([0, 2, -1], np.int64)))
    assert [gpu.dump(t)[0].tolist() for t in range(2)] == [[1], []]
    _, hit = gpu.query_device(keys, cp.asarray(np.array([0, 2**32, -1], np.int64)))
    assert cp.asnumpy(hit).tolist() == [True, False, False]
    assert gpu.stats().hits == 1 and gpu.stats().misses == 0
    with pytest.raises(ValueError, match="tables"):
        gpu.query_device(keys, cp.zeros(2, cp.int32))
    with pytest.raises(ValueError, match="tables"):
        gpu.query(np.array([1, 2]), np.array([0, 2]))


def test_table_counts_leave_no_temporaries_of_the_whole_structure_in_the_memory_pool() -> None:
    """Counting rows held per table is done in place: CuPy's pool, which keeps what it once allocated, grows
    by no more than the counts themselves (a worker group's every worker counts, for its metrics)."""
    rng = np.random.default_rng(16)
    keys = np.unique(rng.integers(0, 2**62, size=500_000, dtype=np.int64))
    cache = GpuEmbeddingCache([1 << 19, 1 << 19], 8)
    cache.replace(keys, rows_for(keys, 8), keys % 2)
    static = GpuStaticTable(keys, rows_for(keys, 8), tables=keys % 3, num_tables=3)
    static.invalidate(keys[:1000], keys[:1000] % 3)
    pool = cp.get_default_memory_pool()
    before = pool.total_bytes()
    cache_counts, static_counts = cache.table_stats(), static.table_stats()
    assert pool.total_bytes() - before < 64 << 10
    assert sum(s.rows for s in cache_counts) == cache.dump(0)[0].size + cache.dump(1)[0].size > 400_000
    assert [s.rows for s in static_counts] == [static.dump(t)[0].size for t in range(3)]
    assert sum(s.rows for s in static_counts) == keys.size - 1000


def test_static_multi_table_matches_the_reference() -> None:
    rng = np.random.default_rng(13)
    keys = rng.integers(-5000, 5000, size=30_000).astype(np.int64)  # each key value in several tables
    tables = rng.integers(0, 5, size=keys.size)
    vectors = rng.standard_normal((keys.size, 16)).astype(np.float32)
    gpu = GpuStaticTable(keys, vectors, tables=tables, num_tables=6, dtype="float16")
    ref = ReferenceStaticTable(keys, vectors, tables=tables, num_tables=6, dtype="float16")
    assert gpu.capacities == ref.capacities and gpu.capacities[5] == 0
    ops = random_table_ops(rng, 6, 16, key_space=6000, steps=40)
    for got, want in zip(run_table_ops(gpu, ops), run_table_ops(ref, ops), strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert_same_tables(gpu, ref)


@pytest.mark.parametrize("static", [False, True], ids=["lru", "static"])
def test_a_call_costs_the_same_launches_copies_and_syncs_for_1_and_26_tables(static: bool) -> None:
    rng = np.random.default_rng(14)
    keys = rng.integers(0, 100_000, size=26 * 512).astype(np.int64)
    vectors = rng.standard_normal((keys.size, 16)).astype(np.float32)
    costs = []
    for num_tables in (1, 26):
        tables = np.repeat(np.arange(num_tables), keys.size // num_tables)
        if static:
            cache: Any = GpuStaticTable(keys, vectors, tables=tables, num_tables=num_tables)
        else:
            cache = GpuEmbeddingCache([26 * 1024 // num_tables] * num_tables, 16)
        spent = []
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("replace", (keys, vectors, tables), {}),
            ("query", (keys, tables), {}),
            ("query", (keys, tables), {"dtype": np.float16}),
            ("update", (keys, vectors, tables), {}),
            ("invalidate", (keys[:100], tables[:100]), {}),
        ]
        for name, args, options in calls:
            before = (cache.launches, cache.copies_to_device, cache.copies_to_host, cache.syncs)
            getattr(cache, name)(*args, **options)
            after = (cache.launches, cache.copies_to_device, cache.copies_to_host, cache.syncs)
            spent.append(tuple(b - a for a, b in zip(before, after, strict=True)))
        costs.append(spent)
    assert costs[0] == costs[1]
    # a lookup: one copy each way, one sync, one launch
    assert costs[0][1] == costs[0][2] == (1, 1, 1, 1)


def test_a_request_of_26_tables_costs_the_gpu_what_one_of_1_table_does(tmp_path: Path) -> None:
    """Through the session: one lookup batch over every table is one query (one launch) and one copy back,
    whether it names 1 table or 26 (misses add the same fill launches either way)."""
    from hps_server.cache import TableL1
    from hps_server.config import ModelConfig, TableConfig
    from hps_server.session import KeyQuery, LookupSession, TableLookup
    from hps_server.storage.hashmap import HashMapLevel

    spent = []
    for num_tables in (1, 26):
        names = [f"t{i}" for i in range(num_tables)]
        model = ModelConfig(name="m", tables=tuple(TableConfig(name=n, dim=16) for n in names))
        volatile = HashMapLevel()
        cache = GpuEmbeddingCache([1024] * num_tables, 16)
        for name in names:
            volatile.create_table(f"m.{name}", 16)
            volatile.insert(f"m.{name}", np.arange(100), rows_for(np.arange(100), 16))
        session = LookupSession(model, [volatile], {n: TableL1((cache,), i) for i, n in enumerate(names)})
        queries = [KeyQuery.of(session.table(n), np.arange(0, 64, dtype=np.int64)) for n in names]
        costs = []
        for _ in range(2):  # the first pass misses and fills L1, the second hits everywhere
            before = (cache.launches, cache.copies_to_host, cache.syncs)
            outcomes = session.lookup_many(queries)
            after = (cache.launches, cache.copies_to_host, cache.syncs)
            costs.append(tuple(b - a for a, b in zip(before, after, strict=True)))
            for outcome in outcomes:
                assert isinstance(outcome, TableLookup)
                np.testing.assert_array_equal(outcome.vectors, rows_for(np.arange(64), 16))
        session.close()
        spent.append(costs)
    assert spent[0] == spent[1]
    assert spent[0][1] == (1, 1, 1)  # all hits: one query's launch, one copy back, one sync for the batch


@pytest.mark.parametrize("static", [False, True])
def test_a_query_into_a_reply_buffer_gives_what_a_plain_query_does(static: bool) -> None:
    """Vectors copied into a caller's buffer (a reply buffer, page-locked on its second use, and pageable
    before) equal those of a query into the cache's own pinned reply, hits and misses alike."""
    from hps_server.cache.gpu import pin_host
    from hps_server.reply_buffers import ReplyBuffers

    rng = np.random.default_rng(11)
    keys = np.arange(5000, dtype=np.int64)
    vectors = rows_for(keys, 64)
    if static:
        cache: Any = GpuStaticTable(keys, vectors)
    else:
        cache = GpuEmbeddingCache(4096, 64)
        cache.replace(keys, vectors)
    replies = ReplyBuffers(min_bytes=1)
    for _ in range(3):
        asked = rng.integers(-1000, 6000, 3000).astype(np.int64)
        want_vectors, want_hit = cache.query(asked, dtype=np.float16)
        taken = replies.take(3 + asked.size * 64 * 2, pin_host)
        assert taken is not None
        data, buffer = taken
        out = buffer[3:].view(np.float16).reshape(asked.size, 64)  # not aligned, as inside a reply
        got_vectors, got_hit = cache.query(asked, dtype=np.float16, out=out)
        assert got_vectors is out
        np.testing.assert_array_equal(got_hit, want_hit)
        np.testing.assert_array_equal(np.frombuffer(data, np.float16, offset=3).reshape(-1, 64), want_vectors)
        del taken, data, buffer, out, got_vectors
    assert replies.made == 1
    replies.close()


@pytest.mark.parametrize("static", [False, True], ids=["cache", "static"])
def test_a_reply_stays_as_it_was_after_later_queries(static: bool) -> None:
    """A host query's vectors and hit flags are its own: small replies come back through the staging the
    next call reuses, larger ones through pinned memory of their own; either way a later query (and one
    into an `out`) leaves an earlier reply as the reference gave it."""
    keys = np.arange(40_000, dtype=np.int64)
    vectors = rows_for(keys, 32)
    tables = (keys % 2).astype(np.int32)
    ref: Any = (
        ReferenceStaticTable(keys, vectors, tables=tables) if static else ReferenceEmbeddingCache([30_000] * 2, 32)
    )
    cache: Any = GpuStaticTable(keys, vectors, tables=tables) if static else GpuEmbeddingCache([30_000] * 2, 32)
    if not static:
        ref.replace(keys, vectors, tables)
        cache.replace(keys, vectors, tables)
    rng = np.random.default_rng(12)
    replies = []
    for n in (26, 500, 520, 3000, 26, 3000):  # replies of 3.4 KB up to 387 KB, each side of 64 KiB
        asked = rng.integers(-100, 41_000, n).astype(np.int64)
        asked_tables = rng.integers(0, 2, n).astype(np.int32)
        replies.append((cache.query(asked, asked_tables), ref.query(asked, asked_tables)))
    cache.query(keys[:3000], tables[:3000], out=np.empty((3000, 32), np.float32))
    for (got_vectors, got_hit), (want_vectors, want_hit) in replies:
        np.testing.assert_array_equal(got_vectors, want_vectors)
        np.testing.assert_array_equal(got_hit, want_hit)
