"""The NumPy reference cache and static table: the algorithm every L1 implementation must reproduce."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hps_server.cache import CacheStats
from hps_server.cache.layout import Geometry, mix, set_of
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable


def rows_for(keys: np.ndarray, dim: int) -> np.ndarray:
    """Vectors that name their key, so any row returned can be checked against the key asked."""
    keys = np.asarray(keys, np.int64)
    return (keys[:, None] * 10 + np.arange(dim)[None, :]).astype(np.float32)


def keys_in_set(cache: ReferenceEmbeddingCache, target: int, count: int, start: int = 0) -> np.ndarray:
    """`count` keys >= start that hash to set `target`."""
    candidates = np.arange(start, start + 200_000, dtype=np.int64)
    sets = set_of(mix(candidates), cache.geometries[0].num_sets)
    chosen = candidates[sets == target][:count]
    assert chosen.size == count
    return chosen


def test_hits_return_the_rows_inserted_and_misses_are_zero() -> None:
    cache = ReferenceEmbeddingCache(1024, 8)
    keys = np.arange(100, 200, dtype=np.int64)
    cache.replace(keys, rows_for(keys, 8))
    asked = np.array([150, 5, 199, 100, 7_000_000], np.int64)
    vectors, hit, missed = cache.query_misses(asked)
    assert hit.tolist() == [True, False, True, True, False]
    np.testing.assert_array_equal(vectors[hit], rows_for(asked[hit], 8))
    assert not vectors[~hit].any()
    assert missed.tolist() == [1, 4]
    assert cache.stats() == CacheStats(hits=3, misses=2, rows=100, capacity=1024)


def test_least_recently_used_row_is_evicted_first() -> None:
    cache = ReferenceEmbeddingCache(8, 2, ways=4)  # 2 sets of 4 ways
    a, b, c, d, e = keys_in_set(cache, 0, 5)
    for key in (a, b, c, d):  # one batch each: stamps rise in this order
        cache.replace(np.array([key]), rows_for([key], 2))
    cache.query(np.array([a]))  # a becomes the most recent; b is now the oldest
    cache.replace(np.array([e]), rows_for([e], 2))
    _, hit = cache.query(np.array([a, b, c, d, e]))
    assert hit.tolist() == [True, False, True, True, True]
    f = keys_in_set(cache, 0, 1, start=int(e) + 1)[0]
    cache.replace(np.array([f]), rows_for([f], 2))  # the query above stamped all four alike: smallest key goes
    _, hit = cache.query(np.array([a, c, d, e, f]))
    assert hit.tolist() == [False, True, True, True, True]


def test_ties_between_rows_used_in_one_batch_go_to_the_smallest_key() -> None:
    cache = ReferenceEmbeddingCache(4, 1, ways=4)  # a single set
    keys = np.array([40, 10, 30, 20], np.int64)
    cache.replace(keys, rows_for(keys, 1))  # same stamp for all four
    cache.replace(np.array([99]), rows_for([99], 1))
    assert cache.dump()[0].tolist() == [20, 30, 40, 99]


def test_duplicate_keys_in_a_batch_take_the_last_row_and_one_slot() -> None:
    cache = ReferenceEmbeddingCache(64, 3)
    keys = np.array([7, 8, 7, 7, 9], np.int64)
    vectors = np.arange(15, dtype=np.float32).reshape(5, 3)
    cache.replace(keys, vectors)
    dumped_keys, dumped_vectors, _ = cache.dump()
    assert dumped_keys.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(dumped_vectors, vectors[[3, 1, 4]])
    got, hit = cache.query(np.array([7, 7, 9]))
    assert hit.all()
    np.testing.assert_array_equal(got, vectors[[3, 3, 4]])
    assert cache.stats().hits == 3


def test_update_overwrites_present_keys_only_and_keeps_recency() -> None:
    cache = ReferenceEmbeddingCache(4, 2, ways=4)
    cache.replace(np.array([1, 2]), rows_for([1, 2], 2))
    cache.query(np.array([1]))
    stamps_before = cache.dump()[2]
    cache.update(np.array([2, 3, 2]), np.array([[5, 5], [6, 6], [7, 7]], np.float32))
    keys, vectors, stamps = cache.dump()
    assert keys.tolist() == [1, 2]  # 3 was not present, so update did not insert it
    np.testing.assert_array_equal(vectors[1], [7, 7])
    np.testing.assert_array_equal(stamps, stamps_before)


def test_replace_overwrites_present_keys_and_refreshes_them() -> None:
    cache = ReferenceEmbeddingCache(2, 1, ways=2)
    cache.replace(np.array([1]), [[1.0]])
    cache.replace(np.array([2]), [[2.0]])
    cache.replace(np.array([1]), [[11.0]])  # present: overwritten and now the most recent
    cache.replace(np.array([3]), [[3.0]])  # evicts 2, the least recently used
    keys, vectors, _ = cache.dump()
    assert keys.tolist() == [1, 3]
    assert vectors[:, 0].tolist() == [11.0, 3.0]


def test_invalidate_drops_keys_and_frees_their_slots() -> None:
    cache = ReferenceEmbeddingCache(2, 1, ways=2)
    cache.replace(np.array([1, 2]), [[1.0], [2.0]])
    cache.invalidate(np.array([2, 2, 77]))
    assert cache.query(np.array([1, 2]))[1].tolist() == [True, False]
    cache.replace(np.array([3]), [[3.0]])  # takes the freed slot, so 1 stays
    assert cache.dump()[0].tolist() == [1, 3]
    assert cache.stats().rows == 2


def test_dump_round_trip_restores_every_row() -> None:
    rng = np.random.default_rng(1)
    source = ReferenceEmbeddingCache(512, 5)
    keys = rng.choice(10**12, size=2000, replace=False).astype(np.int64)
    source.replace(keys, rows_for(keys, 5))
    dumped_keys, dumped_vectors, _ = source.dump()
    assert 0 < dumped_keys.size <= 512
    copy = ReferenceEmbeddingCache(512, 5)
    copy.replace(dumped_keys, dumped_vectors)
    again_keys, again_vectors, _ = copy.dump()
    np.testing.assert_array_equal(again_keys, dumped_keys)
    np.testing.assert_array_equal(again_vectors, dumped_vectors)


def test_cache_smaller_than_a_batch_keeps_the_smallest_keys_of_each_full_set() -> None:
    cache = ReferenceEmbeddingCache(16, 2, ways=4)  # 4 sets
    keys = np.arange(1000, dtype=np.int64)
    cache.replace(keys, rows_for(keys, 2))
    dumped, vectors, _ = cache.dump()
    assert dumped.size == 16
    np.testing.assert_array_equal(vectors, rows_for(dumped, 2))
    sets = set_of(mix(keys), 4)
    expected = np.concatenate([np.sort(keys[sets == s])[:4] for s in range(4)])
    assert sorted(dumped.tolist()) == sorted(expected.tolist())


def test_single_set_and_single_way() -> None:
    cache = ReferenceEmbeddingCache(1, 4)
    assert cache.geometries == (Geometry(num_sets=1, ways=1),)
    cache.replace(np.array([5]), rows_for([5], 4))
    cache.replace(np.array([6]), rows_for([6], 4))
    vectors, hit = cache.query(np.array([5, 6]))
    assert hit.tolist() == [False, True]
    np.testing.assert_array_equal(vectors[1], rows_for([6], 4)[0])


def test_float16_storage_rounds_like_numpy() -> None:
    cache = ReferenceEmbeddingCache(64, 4, dtype="float16")
    vectors = np.array([[0.1, 1 / 3, 65504.0, -2.5e-8]], np.float32)
    cache.replace(np.array([1]), vectors)
    got, _ = cache.query(np.array([1]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors.astype(np.float16).astype(np.float32))


def test_empty_batches_change_nothing() -> None:
    cache = ReferenceEmbeddingCache(64, 2)
    vectors, hit = cache.query(np.array([], np.int64))
    assert vectors.shape == (0, 2) and hit.shape == (0,)
    cache.replace(np.array([], np.int64), np.zeros((0, 2), np.float32))
    assert cache.clock == 0 and cache.stats() == CacheStats(0, 0, 0, 64)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ReferenceEmbeddingCache(0, 4), "capacity"),
        (lambda: ReferenceEmbeddingCache(10, 0), "dim"),
        (lambda: ReferenceEmbeddingCache(10, 4, ways=33), "ways"),
        (lambda: ReferenceEmbeddingCache(10, 4, dtype="int8"), "dtype"),
    ],
)
def test_bad_construction_names_the_argument(build, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=field):
        build()


def test_bad_batches_name_the_argument_and_leave_the_cache_intact() -> None:
    cache = ReferenceEmbeddingCache(64, 2)
    cache.replace(np.array([1, 2]), rows_for([1, 2], 2))
    before = cache.dump()
    with pytest.raises(ValueError, match="keys"):
        cache.query(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="keys"):
        cache.replace(np.array([1.5]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="vectors"):
        cache.replace(np.array([3, 4]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="vectors"):
        cache.update(np.array([1]), np.zeros((2, 2)))
    after = cache.dump()
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_static_table_serves_its_key_set_and_hides_invalidated_keys() -> None:
    keys = np.array([30, 10, 20, 10], np.int64)
    vectors = rows_for([30, 10, 20, 11], 3)
    table = ReferenceStaticTable(keys, vectors)
    assert table.capacity == 3
    got, hit = table.query(np.array([10, 20, 40]))
    assert hit.tolist() == [True, True, False]
    np.testing.assert_array_equal(got[0], rows_for([11], 3)[0])  # the last row of a repeated key
    table.invalidate(np.array([20]))
    table.update(np.array([20]), rows_for([99], 3))  # dead keys ignore update
    assert not table.query(np.array([20]))[1][0]
    table.replace(np.array([20, 40]), rows_for([21, 41], 3))  # revives 20; 40 is outside the set
    got, hit = table.query(np.array([20, 40]))
    assert hit.tolist() == [True, False]
    np.testing.assert_array_equal(got[0], rows_for([21], 3)[0])
    assert table.dump()[0].tolist() == [10, 20, 30]
    assert table.stats() == CacheStats(hits=3, misses=3, rows=3, capacity=3)


def test_static_table_rejects_bad_vectors() -> None:
    with pytest.raises(ValueError, match="vectors"):
        ReferenceStaticTable(np.array([1, 2]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="vectors"):
        ReferenceStaticTable(np.array([1, 2]), np.zeros(2))


# ---------------------------------------------------------------- several tables in one cache


def random_table_ops(
    rng: np.random.Generator, num_tables: int, dim: int, key_space: int, steps: int
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(operation, keys, tables, vectors): key values drawn from one space for all tables, so they recur
    across tables; every table gets at least one key per operation, so a table's own cache ticks its
    clock exactly when the shared one does."""
    ops = []
    for _ in range(steps):
        kind = str(rng.choice(["query", "replace", "replace", "update", "invalidate"]))
        n = int(rng.integers(num_tables, 600))
        keys = rng.integers(-key_space, key_space, size=n).astype(np.int64)
        tables = rng.integers(0, num_tables, size=n)
        tables[:num_tables] = np.arange(num_tables)
        rng.shuffle(tables)
        ops.append((kind, keys, tables, rng.standard_normal((n, dim)).astype(np.float32)))
    return ops


def apply(cache: Any, kind: str, keys: np.ndarray, tables: np.ndarray | None, vectors: np.ndarray) -> Any:
    if kind == "query":
        return cache.query_misses(keys, tables)
    if kind == "invalidate":
        return cache.invalidate(keys, tables)
    return getattr(cache, kind)(keys, vectors, tables)


def assert_same_dump(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("capacities", "ways", "dtype"),
    [([256, 64, 1000], 32, "float32"), ([77, 1, 40, 5], 4, "float16"), ([33], 32, "float32")],
)
def test_a_multi_table_cache_answers_as_separate_caches_would(capacities: list[int], ways: int, dtype: str) -> None:
    rng = np.random.default_rng(len(capacities) * 7 + ways)
    dim = 6
    shared = ReferenceEmbeddingCache(capacities, dim, ways=ways, dtype=dtype)
    alone = [ReferenceEmbeddingCache(c, dim, ways=ways, dtype=dtype) for c in capacities]
    assert shared.num_tables == len(capacities)
    assert shared.capacities == tuple(c.capacity for c in alone)
    assert shared.capacity == sum(shared.capacities)
    for kind, keys, tables, vectors in random_table_ops(rng, len(capacities), dim, 300, 80):
        got = apply(shared, kind, keys, tables, vectors)
        for t, cache in enumerate(alone):
            mine = tables == t
            want = apply(cache, kind, keys[mine], None, vectors[mine])
            if kind == "query":
                np.testing.assert_array_equal(got[0][mine], want[0])
                np.testing.assert_array_equal(got[1][mine], want[1])
        if kind == "query":
            np.testing.assert_array_equal(got[2], np.flatnonzero(~got[1]))
    assert shared.clock == alone[0].clock
    for t, cache in enumerate(alone):
        assert_same_dump(shared.dump(t), cache.dump())
    assert shared.table_stats() == [cache.stats() for cache in alone]
    assert shared.stats() == CacheStats.total(cache.stats() for cache in alone)


def test_one_key_in_several_tables_is_several_rows_and_the_last_of_each_pair_wins() -> None:
    cache = ReferenceEmbeddingCache([64, 64], 2)
    keys = np.array([5, 5, 5, 6], np.int64)
    tables = np.array([0, 1, 0, 1], np.uint8)
    vectors = np.array([[1, 1], [2, 2], [3, 3], [4, 4]], np.float32)
    cache.replace(keys, vectors, tables)
    got, hit = cache.query(np.array([5, 5, 6, 6]), np.array([0, 1, 0, 1]))
    assert hit.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(got, [[3, 3], [2, 2], [0, 0], [4, 4]])
    cache.invalidate(np.array([5]), np.array([1]))
    assert cache.dump(0)[0].tolist() == [5] and cache.dump(1)[0].tolist() == [6]
    assert [s.rows for s in cache.table_stats()] == [1, 1]


def test_the_clock_is_shared_by_the_tables() -> None:
    cache = ReferenceEmbeddingCache([32, 32], 1)
    cache.replace(np.array([1]), [[1.0]], np.array([0]))  # clock 2: inserted with stamp 2
    cache.replace(np.array([1]), [[1.0]], np.array([1]))  # clock 4: inserted with stamp 4
    cache.query(np.array([1, 1]), np.array([0, 1]))  # one tick for both tables
    assert cache.clock == 5
    assert cache.dump(0)[2].tolist() == [5] and cache.dump(1)[2].tolist() == [5]


def test_bad_tables_are_refused_naming_them_and_leave_the_cache_intact() -> None:
    cache = ReferenceEmbeddingCache([64, 64], 2)
    cache.replace(np.array([1, 2]), rows_for([1, 2], 2), np.array([0, 1]))
    before = [cache.dump(t) for t in range(2)], cache.table_stats(), cache.clock
    keys = np.array([1, 2])
    for bad in (np.array([0.0, 1.0]), np.array([[0, 1]]), np.array([0]), np.array([0, 2]), np.array([-1, 0])):
        with pytest.raises(ValueError, match="tables"):
            cache.query(keys, bad)
        with pytest.raises(ValueError, match="tables"):
            cache.replace(keys, rows_for([7, 8], 2), bad)
        with pytest.raises(ValueError, match="tables"):
            cache.update(keys, rows_for([7, 8], 2), bad)
        with pytest.raises(ValueError, match="tables"):
            cache.invalidate(keys, bad)
    for table in (2, -1, 0.5):
        with pytest.raises(ValueError, match="table"):
            cache.dump(table)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        cache.query(keys, dtype=np.int8)
    with pytest.raises(ValueError, match="capacity"):
        ReferenceEmbeddingCache([], 2)
    with pytest.raises(ValueError, match="capacity"):
        ReferenceEmbeddingCache([64, 0], 2)
    after = [cache.dump(t) for t in range(2)], cache.table_stats(), cache.clock
    for was, now in zip(before[0], after[0], strict=True):
        assert_same_dump(now, was)
    assert after[1:] == before[1:]


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_float16_replies_are_the_float32_replies_rounded(storage: str) -> None:
    rng = np.random.default_rng(4)
    cache = ReferenceEmbeddingCache([128, 128], 8, dtype=storage)
    keys = rng.integers(0, 400, size=300).astype(np.int64)
    tables = rng.integers(0, 2, size=300)
    cache.replace(keys, (rng.standard_normal((300, 8)) * 1e3).astype(np.float32), tables)
    wide, hit = cache.query(keys, tables)
    narrow, narrow_hit = cache.query(keys, tables, dtype="float16")
    assert narrow.dtype == np.float16 and hit.any() and not hit.all()
    np.testing.assert_array_equal(narrow_hit, hit)
    np.testing.assert_array_equal(narrow, wide.astype(np.float16))


def test_static_multi_table_answers_as_separate_static_tables_would() -> None:
    rng = np.random.default_rng(5)
    dim, num_tables = 3, 4
    keys = rng.integers(-50, 50, size=300).astype(np.int64)
    tables = rng.integers(0, 3, size=300)  # table 3 is held empty
    vectors = rng.standard_normal((300, dim)).astype(np.float32)
    shared = ReferenceStaticTable(keys, vectors, tables=tables, num_tables=num_tables, dtype="float16")
    alone = [ReferenceStaticTable(keys[tables == t], vectors[tables == t], dtype="float16") for t in range(num_tables)]
    assert shared.num_tables == num_tables
    assert shared.capacities == tuple(t.capacity for t in alone) and shared.capacities[3] == 0
    for kind, op_keys, op_tables, op_vectors in random_table_ops(rng, num_tables, dim, 60, 40):
        got = apply(shared, kind, op_keys, op_tables, op_vectors)
        for t, table in enumerate(alone):
            mine = op_tables == t
            want = apply(table, kind, op_keys[mine], None, op_vectors[mine])
            if kind == "query":
                np.testing.assert_array_equal(got[0][mine], want[0])
                np.testing.assert_array_equal(got[1][mine], want[1])
    for t, table in enumerate(alone):
        assert_same_dump(shared.dump(t), table.dump())
    assert shared.table_stats() == [table.stats() for table in alone]
    assert shared.stats() == CacheStats.total(table.stats() for table in alone)
    narrow, _ = shared.query(keys, tables, dtype=np.float16)
    np.testing.assert_array_equal(narrow, shared.query(keys, tables)[0].astype(np.float16))


def test_static_table_counts_its_tables_and_refuses_bad_ones() -> None:
    keys = np.array([1, 2, 3])
    vectors = rows_for([1, 2, 3], 2)
    assert ReferenceStaticTable(keys, vectors).num_tables == 1
    assert ReferenceStaticTable(keys, vectors, tables=np.array([0, 4, 2])).num_tables == 5
    for bad in (np.array([0, 1]), np.array([0, -1, 0]), np.array([0.0, 1.0, 0.0])):
        with pytest.raises(ValueError, match="tables"):
            ReferenceStaticTable(keys, vectors, tables=bad)
    with pytest.raises(ValueError, match="tables"):
        ReferenceStaticTable(keys, vectors, tables=np.array([0, 1, 2]), num_tables=2)
    with pytest.raises(ValueError, match="num_tables"):
        ReferenceStaticTable(keys, vectors, num_tables=0)
    table = ReferenceStaticTable(keys, vectors, tables=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="tables"):
        table.query(keys, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="table"):
        table.dump(2)
    assert table.stats() == CacheStats(hits=0, misses=0, rows=3, capacity=3)
