"""The storage contract, run against every backend listed in tests/storage/conftest.py.

Backend-specific behaviour belongs in tests/storage/test_<backend>.py, not here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hps_server.config import VolatileDbConfig
from hps_server.storage.base import StorageError, StorageLevel, UnknownTableError

TABLE = "model.table"
DIM = 8


def rows(keys: np.ndarray, dim: int = DIM, salt: float = 0.0) -> np.ndarray:
    """A vector per key that differs between keys (and between salts)."""
    base = (keys.astype(np.float64) % 1000003).astype(np.float32)
    return (base[:, None] + np.arange(dim, dtype=np.float32)[None, :] * 0.5 + salt).astype(np.float32)


@pytest.fixture
def table(level: StorageLevel) -> str:
    level.create_table(TABLE, DIM)
    return TABLE


def test_create_table_is_idempotent_and_rejects_another_dim(level: StorageLevel) -> None:
    level.create_table(TABLE, DIM)
    keys = np.array([1, 2], dtype=np.int64)
    level.insert(TABLE, keys, rows(keys))
    level.create_table(TABLE, DIM)
    assert level.size(TABLE) == 2
    assert level.dim(TABLE) == DIM
    assert TABLE in level.tables()
    with pytest.raises(StorageError, match="dim"):
        level.create_table(TABLE, DIM + 1)
    assert level.size(TABLE) == 2


def test_tables_are_independent(level: StorageLevel) -> None:
    level.create_table("a.x", 4)
    level.create_table("b.x", 16)
    keys = np.array([7], dtype=np.int64)
    level.insert("a.x", keys, rows(keys, 4))
    assert level.size("a.x") == 1
    assert level.size("b.x") == 0
    assert level.dim("b.x") == 16
    assert not level.contains("b.x", keys)[0]


def test_occupancy_counts_rows_and_bytes_held(level: StorageLevel, table: str) -> None:
    empty_rows, _ = level.occupancy(table)
    keys = np.arange(2_000, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    held, stored = level.occupancy(table)
    assert (empty_rows, held) == (0, level.size(table)) == (0, 2_000)
    # Every backend can tell its bytes; at least the raw keys and vectors, and not wildly more.
    assert stored is not None and 2_000 * (8 + 4 * DIM) <= stored < 2_000 * (8 + 4 * DIM) * 20
    level.evict(table, keys[:500])
    assert level.occupancy(table)[0] == 1_500


def test_fetch_mixes_hits_and_misses(level: StorageLevel, table: str) -> None:
    stored = np.array([10, 20, 30], dtype=np.int64)
    level.insert(table, stored, rows(stored))
    asked = np.array([20, 99, 10, 10, -5, 30], dtype=np.int64)
    vectors, found = level.fetch(table, asked)
    assert vectors.dtype == np.float32 and vectors.shape == (6, DIM)
    np.testing.assert_array_equal(found, [True, False, True, True, False, True])
    np.testing.assert_array_equal(vectors[found], rows(asked[found]))
    assert not vectors[~found].any()


def test_insert_overwrites(level: StorageLevel, table: str) -> None:
    keys = np.arange(100, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    level.insert(table, keys[::2], rows(keys[::2], salt=7.0))
    vectors, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors[::2], rows(keys[::2], salt=7.0))
    np.testing.assert_array_equal(vectors[1::2], rows(keys[1::2]))
    assert level.size(table) == 100


def test_duplicate_keys_in_a_batch_last_row_wins(level: StorageLevel, table: str) -> None:
    keys = np.array([5, 6, 5, 5, 6, 7], dtype=np.int64)
    vectors = np.arange(6, dtype=np.float32)[:, None].repeat(DIM, axis=1)
    level.insert(table, keys, vectors)
    fetched, found = level.fetch(table, np.array([5, 6, 7], dtype=np.int64))
    assert found.all()
    np.testing.assert_array_equal(fetched[:, 0], [3, 4, 5])
    assert level.size(table) == 3


def test_evict_counts_present_keys(level: StorageLevel, table: str) -> None:
    keys = np.arange(50, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    assert level.evict(table, np.array([3, 3, 4, 1000], dtype=np.int64)) == 2
    assert level.size(table) == 48
    assert level.evict(table, np.array([3, 4], dtype=np.int64)) == 0
    vectors, found = level.fetch(table, keys)
    expected = ~np.isin(keys, [3, 4])
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(vectors[expected], rows(keys[expected]))


def test_contains_and_size(level: StorageLevel, table: str) -> None:
    assert level.size(table) == 0
    keys = np.array([1, 3, 5], dtype=np.int64)
    level.insert(table, keys, rows(keys))
    np.testing.assert_array_equal(level.contains(table, np.array([0, 1, 2, 3, 5, 5])), [0, 1, 0, 1, 1, 1])
    assert level.size(table) == 3


def test_dump_round_trips_every_row_in_chunks(level: StorageLevel, table: str) -> None:
    keys = np.arange(-500, 1000, 3, dtype=np.int64)
    level.insert(table, keys, rows(keys))
    chunks = list(level.dump(table, chunk_rows=64))
    assert all(len(k) <= 64 and v.shape == (len(k), DIM) for k, v in chunks)
    assert len(chunks) == -(-len(keys) // 64)
    dumped_keys = np.concatenate([k for k, _ in chunks])
    dumped_vectors = np.concatenate([v for _, v in chunks])
    assert len(np.unique(dumped_keys)) == len(keys)
    order = np.argsort(dumped_keys)
    np.testing.assert_array_equal(dumped_keys[order], keys)
    np.testing.assert_array_equal(dumped_vectors[order], rows(keys))


def test_dump_of_an_empty_table_yields_nothing(level: StorageLevel, table: str) -> None:
    assert list(level.dump(table)) == []


def test_load_writes_every_chunk(level: StorageLevel, table: str) -> None:
    keys = np.arange(1000, dtype=np.int64) * 7919
    chunks = [(keys[i : i + 300], rows(keys[i : i + 300])) for i in range(0, len(keys), 300)]
    assert level.load(table, iter(chunks)) == len(keys)
    vectors, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys))
    assert level.size(table) == len(keys)


def test_empty_batches(level: StorageLevel, table: str) -> None:
    empty = np.array([], dtype=np.int64)
    level.insert(table, empty, np.zeros((0, DIM), dtype=np.float32))
    vectors, found = level.fetch(table, empty)
    assert vectors.shape == (0, DIM) and found.shape == (0,)
    assert level.contains(table, empty).shape == (0,)
    assert level.evict(table, empty) == 0
    assert level.size(table) == 0


@pytest.mark.parametrize(
    ("keys", "vectors", "field"),
    [
        (np.zeros((2, 2), dtype=np.int64), np.zeros((4, DIM), dtype=np.float32), "keys"),
        (np.array([1.5, 2.0]), np.zeros((2, DIM), dtype=np.float32), "keys"),
        (np.array([1, 2], dtype=np.int64), np.zeros((2, DIM + 1), dtype=np.float32), "vectors"),
        (np.array([1, 2], dtype=np.int64), np.zeros((3, DIM), dtype=np.float32), "vectors"),
        (np.array([1, 2], dtype=np.int64), np.zeros(2 * DIM, dtype=np.float32), "vectors"),
        (np.array([1, 2], dtype=np.int64), np.array([["a"] * DIM] * 2), "vectors"),
    ],
)
def test_bad_input_raises_naming_the_field_and_keeps_rows(
    level: StorageLevel, table: str, keys: np.ndarray, vectors: np.ndarray, field: str
) -> None:
    stored = np.array([1, 2], dtype=np.int64)
    level.insert(table, stored, rows(stored))
    with pytest.raises(ValueError, match=field):
        level.insert(table, keys, vectors)
    if field == "keys":
        for call in (level.fetch, level.contains, level.evict):
            with pytest.raises(ValueError, match="keys"):
                call(table, keys)
    fetched, found = level.fetch(table, stored)
    assert found.all()
    np.testing.assert_array_equal(fetched, rows(stored))
    assert level.size(table) == 2


def test_unknown_table_raises(level: StorageLevel) -> None:
    keys = np.array([1], dtype=np.int64)
    calls: list[Callable[[], object]] = [
        lambda: level.fetch("no.such", keys),
        lambda: level.insert("no.such", keys, rows(keys)),
        lambda: level.evict("no.such", keys),
        lambda: level.contains("no.such", keys),
        lambda: level.size("no.such"),
        lambda: level.dim("no.such"),
        lambda: list(level.dump("no.such")),
    ]
    for call in calls:
        with pytest.raises(UnknownTableError, match=r"no\.such"):
            call()


def test_int64_extremes(level: StorageLevel, table: str) -> None:
    keys = np.array(
        [0, -1, 1, 2**63 - 1, -(2**63), 256, 1 << 56, 1 << 40, -(1 << 62), 0x7F00000000000000, 65536],
        dtype=np.int64,
    )
    vectors = np.arange(len(keys) * DIM, dtype=np.float32).reshape(-1, DIM)
    level.insert(table, keys, vectors)
    fetched, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(fetched, vectors)
    # Neighbours of stored keys (same bytes but trailing zeros dropped, sign flipped) stay absent.
    assert not level.contains(table, np.array([2, -2, 2**63 - 2, 1 << 48, 255], dtype=np.int64)).any()
    dumped = np.concatenate([k for k, _ in level.dump(table)])
    np.testing.assert_array_equal(np.sort(dumped), np.sort(keys))
    assert level.evict(table, keys[:5]) == 5
    np.testing.assert_array_equal(level.contains(table, keys), [False] * 5 + [True] * (len(keys) - 5))


def test_large_batch(level: StorageLevel, table: str) -> None:
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=100_000, dtype=np.int64))
    rng.shuffle(keys)
    level.insert(table, keys, rows(keys))
    assert level.size(table) == len(keys)
    asked = np.concatenate([keys[::2], keys[::2] + 1])
    vectors, found = level.fetch(table, asked)
    half = len(keys[::2])
    stored = np.isin(asked, keys)
    np.testing.assert_array_equal(found, stored)
    assert found[:half].all()
    np.testing.assert_array_equal(vectors[found], rows(asked[found]))
    assert level.evict(table, keys[: len(keys) // 2]) == len(keys) // 2
    assert level.size(table) == len(keys) - len(keys) // 2


def test_overflow_evict_oldest_drops_least_recently_accessed(
    bounded_level: Callable[[VolatileDbConfig], StorageLevel],
) -> None:
    level = bounded_level(
        VolatileDbConfig(overflow_margin=100, overflow_policy="evict_oldest", overflow_resolution_target=0.5)
    )
    level.create_table(TABLE, DIM)
    old = np.arange(0, 100, dtype=np.int64)
    level.insert(TABLE, old[:50], rows(old[:50]))
    level.insert(TABLE, old[50:], rows(old[50:]))
    assert level.size(TABLE) == 100
    # Touch the first half again: now the second half is the least recently accessed.
    level.fetch(TABLE, old[:50])
    new = np.arange(1000, 1010, dtype=np.int64)
    level.insert(TABLE, new, rows(new))
    assert level.size(TABLE) == 50
    kept = np.concatenate([old[:40], new])
    assert level.contains(TABLE, new).all()
    assert not level.contains(TABLE, old[50:]).any()
    assert level.contains(TABLE, old[:50]).sum() == 40
    vectors, found = level.fetch(TABLE, kept)
    np.testing.assert_array_equal(vectors[found], rows(kept[found]))


def test_overflow_evict_random_keeps_size_at_target(
    bounded_level: Callable[[VolatileDbConfig], StorageLevel],
) -> None:
    level = bounded_level(
        VolatileDbConfig(overflow_margin=1000, overflow_policy="evict_random", overflow_resolution_target=0.8)
    )
    level.create_table(TABLE, DIM)
    keys = np.arange(1000, dtype=np.int64)
    level.insert(TABLE, keys, rows(keys))
    assert level.size(TABLE) == 1000
    more = np.arange(1000, 1300, dtype=np.int64)
    level.insert(TABLE, more, rows(more))
    assert level.size(TABLE) == 800
    everything = np.concatenate([keys, more])
    vectors, found = level.fetch(TABLE, everything)
    assert found.sum() == 800
    np.testing.assert_array_equal(vectors[found], rows(everything[found]))
    # Random eviction spreads over old and new rows alike rather than clearing one range.
    assert 0 < found[:1000].sum() < 1000
    for _ in range(5):
        level.insert(TABLE, more + 10_000, rows(more + 10_000))
        more += 1000
        assert level.size(TABLE) <= 1000


MANY = ["m.a", "m.b", "m.c", "m.d"]


def many_tables(level: StorageLevel) -> None:
    """Tables of one dim where the same key values hold different rows (salt = the table's position)."""
    for position, name in enumerate(MANY):
        level.create_table(name, DIM)
        keys = np.arange(position * 10, 100, dtype=np.int64)  # m.d has fewer keys than m.a
        level.insert(name, keys, rows(keys, salt=100.0 * position))


def test_fetch_many_equals_fetch_per_table(level: StorageLevel) -> None:
    many_tables(level)
    rng = np.random.default_rng(3)
    keys = rng.integers(-5, 110, size=500).astype(np.int64)
    # Index 2 is left out, so one named table has no keys in the batch.
    index = rng.choice([0, 1, 3], size=500)
    vectors, found = level.fetch_many(MANY, keys, index)
    assert vectors.shape == (500, DIM) and vectors.dtype == np.float32 and found.dtype == bool
    for position, name in enumerate(MANY):
        mine = index == position
        expected_vectors, expected_found = level.fetch(name, keys[mine])
        np.testing.assert_array_equal(found[mine], expected_found)
        np.testing.assert_array_equal(vectors[mine], expected_vectors)
    assert 0 < found.sum() < 500
    assert not vectors[~found].any()
    hit = found & (index == 3)
    np.testing.assert_array_equal(vectors[hit], rows(keys[hit], salt=300.0))


def test_insert_many_writes_each_row_into_its_table(level: StorageLevel) -> None:
    for name in MANY:
        level.create_table(name, DIM)
    keys = np.tile(np.arange(50, dtype=np.int64), 3)
    index = np.repeat([2, 0, 1], 50)
    salts = np.repeat([200.0, 0.0, 100.0], 50).astype(np.float32)
    level.insert_many(MANY, keys, index, rows(keys) + salts[:, None])
    for position, name in enumerate(MANY[:3]):
        fetched, found = level.fetch(name, np.arange(50, dtype=np.int64))
        assert found.all()
        np.testing.assert_array_equal(fetched, rows(np.arange(50, dtype=np.int64), salt=100.0 * position))
        assert level.size(name) == 50
    assert level.size("m.d") == 0
    vectors, found = level.fetch_many(MANY, keys, index)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys) + salts[:, None])


def test_insert_many_last_row_wins_per_table_and_key(level: StorageLevel) -> None:
    for name in MANY:
        level.create_table(name, DIM)
    keys = np.array([5, 5, 5, 6, 6, 5, 7], dtype=np.int64)
    index = np.array([0, 1, 0, 1, 1, 3, 0])
    vectors = np.arange(7, dtype=np.float32)[:, None].repeat(DIM, axis=1)
    level.insert_many(MANY, keys, index, vectors)
    fetched, found = level.fetch_many(MANY, np.array([5, 7, 5, 6, 5, 6]), np.array([0, 0, 1, 1, 3, 3]))
    np.testing.assert_array_equal(found, [True, True, True, True, True, False])
    np.testing.assert_array_equal(fetched[:, 0], [2, 6, 1, 4, 5, 0])
    assert [level.size(name) for name in MANY] == [2, 2, 0, 1]


def test_many_with_an_empty_batch(level: StorageLevel) -> None:
    many_tables(level)
    empty = np.array([], dtype=np.int64)
    level.insert_many(MANY, empty, empty, np.zeros((0, DIM), dtype=np.float32))
    vectors, found = level.fetch_many(MANY, empty, empty)
    assert vectors.shape == (0, DIM) and found.shape == (0,)
    assert level.size("m.a") == 100


@pytest.mark.parametrize(
    ("tables", "table_index", "error", "match"),
    [
        (MANY, np.array([[0, 1, 0]]), ValueError, "table_index"),
        (MANY, np.array([0, 1]), ValueError, "table_index"),
        (MANY, np.array([0.0, 1.0, 1.0]), ValueError, "table_index"),
        (MANY, np.array([0, 4, 1]), ValueError, "table_index"),
        (MANY, np.array([0, -1, 1]), ValueError, "table_index"),
        (["m.a", "no.such"], np.array([0, 0, 0]), UnknownTableError, r"no\.such"),
        (["m.a", "m.wide"], np.array([0, 0, 0]), ValueError, r"m\.wide.*\b16\b"),
        (["m.a", "m.a"], np.array([0, 1, 0]), ValueError, "tables"),
        ([], np.array([0, 0, 0]), ValueError, "tables"),
    ],
)
def test_many_rejects_bad_batches_before_any_write(
    level: StorageLevel, tables: list[str], table_index: np.ndarray, error: type[Exception], match: str
) -> None:
    many_tables(level)
    level.create_table("m.wide", 16)
    keys = np.array([1000, 1001, 1002], dtype=np.int64)
    with pytest.raises(error, match=match):
        level.fetch_many(tables, keys, table_index)
    with pytest.raises(error, match=match):
        level.insert_many(tables, keys, table_index, rows(keys))
    assert [level.size(name) for name in MANY] == [100, 90, 80, 70]
    assert level.size("m.wide") == 0
    for name in MANY:
        assert not level.contains(name, keys).any()


def test_insert_many_rejects_vectors_of_another_shape(level: StorageLevel) -> None:
    many_tables(level)
    keys = np.array([1000, 1001], dtype=np.int64)
    with pytest.raises(ValueError, match="vectors"):
        level.insert_many(MANY, keys, np.array([0, 1]), np.zeros((2, DIM + 1), dtype=np.float32))
    assert [level.size(name) for name in MANY] == [100, 90, 80, 70]
    assert not level.contains("m.a", keys).any()
