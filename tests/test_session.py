"""LookupSession over real levels (in-process hash map over RocksDB): fallthrough, write-back, defaults."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_server.cache import CacheStats, TableL1
from hps_server.cache.reference import ReferenceEmbeddingCache
from hps_server.config import ModelConfig, PersistentDbConfig, TableConfig, VolatileDbConfig
from hps_server.metrics import ServerMetrics
from hps_server.session import SHAPES_KEPT, KeyQuery, LookupSession, TableLookup
from hps_server.storage.base import LevelUnavailableError
from hps_server.storage.hashmap import HashMapLevel
from hps_server.storage.rocksdb import RocksDBLevel

DIM = 4
MODEL = ModelConfig(name="m", tables=(TableConfig(name="t", dim=DIM, default_value=0.25),), gpucache=False)


@pytest.fixture
def levels(tmp_path: Path) -> Iterator[tuple[HashMapLevel, RocksDBLevel]]:
    volatile = HashMapLevel.from_config(VolatileDbConfig())
    persistent = RocksDBLevel.from_config(PersistentDbConfig(path=tmp_path / "db"))
    for level in (volatile, persistent):
        level.create_table("m.t", DIM)
    yield volatile, persistent
    volatile.close()
    persistent.close()


def _rows(keys: np.ndarray) -> np.ndarray:
    return np.repeat(keys.astype(np.float32)[:, None], DIM, axis=1) + np.arange(DIM, dtype=np.float32)


def test_walk_falls_through_writes_back_and_fills_defaults(levels) -> None:
    volatile, persistent = levels
    in_volatile = np.array([1, 2], np.int64)
    in_persistent = np.array([3, 4, 5], np.int64)
    volatile.insert("m.t", in_volatile, _rows(in_volatile))
    persistent.insert("m.t", np.concatenate([in_volatile, in_persistent]), _rows(np.arange(1, 6)))
    session = LookupSession(MODEL, [volatile, persistent])

    keys = np.array([5, 1, 99, 3, 1, -7], np.int64)
    result = session.lookup("t", keys)

    expected = _rows(keys)
    expected[[2, 5]] = 0.25
    np.testing.assert_array_equal(result.vectors, expected)
    np.testing.assert_array_equal(result.found, [True, True, False, True, True, False])
    counts = session.counts()["t"].by_level
    assert counts == {"hash_map": 2, "rocksdb": 2, "default": 2}
    # Rows fetched from RocksDB were written back into the hash map; absent keys were not.
    np.testing.assert_array_equal(volatile.contains("m.t", np.array([3, 5, 99, -7])), [True, True, False, False])

    session.lookup("t", np.array([3, 5], np.int64))
    assert session.counts()["t"].by_level["hash_map"] == 4


def test_without_write_back_the_volatile_level_is_left_alone(levels) -> None:
    volatile, persistent = levels
    persistent.insert("m.t", np.array([8]), _rows(np.array([8])))
    session = LookupSession(MODEL, [volatile, persistent], write_back=False)
    assert session.lookup("t", np.array([8])).found.all()
    assert not volatile.contains("m.t", np.array([8])).any()


def test_empty_batch_and_unknown_table(levels) -> None:
    session = LookupSession(MODEL, list(levels))
    result = session.lookup("t", np.empty(0, np.int64))
    assert result.vectors.shape == (0, DIM) and result.found.shape == (0,)
    with pytest.raises(KeyError, match="model 'm' has no table 'x'"):
        session.lookup("x", np.array([1]))


def test_upsert_and_delete_go_through_every_level(levels) -> None:
    volatile, persistent = levels
    session = LookupSession(MODEL, [volatile, persistent])
    keys = np.array([10, 11], np.int64)
    assert session.upsert("t", keys, _rows(keys)) == 2
    for level in levels:
        np.testing.assert_array_equal(level.fetch("m.t", keys)[0], _rows(keys))
    assert session.delete("t", np.array([10, 10, 12])) == 1
    for level in levels:
        np.testing.assert_array_equal(level.contains("m.t", keys), [False, True])
    with pytest.raises(ValueError, match="vectors: expected shape"):
        session.upsert("t", keys, np.zeros((2, DIM + 1), np.float32))
    assert persistent.size("m.t") == 1


# ---------------------------------------------------------------- with L1


def _l1_session(levels, **options) -> tuple[LookupSession, ReferenceEmbeddingCache]:  # type: ignore[no-untyped-def]
    model = dataclasses.replace(MODEL, gpucache=True, **options)
    cache = ReferenceEmbeddingCache(64, DIM)
    return LookupSession(model, list(levels), {"t": TableL1((cache,))}), cache


def test_a_background_l1_fill_takes_the_rows_of_every_level_it_found_them_in(levels) -> None:  # type: ignore[no-untyped-def]
    """Above the hit-rate threshold L1 is filled in the background, after the walk has gone on to write the
    RocksDB rows back into the hash map: the fill still takes exactly the rows it was given, from both levels."""
    volatile, persistent = levels
    hot, warm, cold = np.arange(1, 9), np.arange(101, 105), np.arange(201, 207)  # L1, hash map, RocksDB only
    every = np.concatenate([hot, warm, cold]).astype(np.int64)
    persistent.insert("m.t", every, _rows(every))
    volatile.insert("m.t", warm, _rows(warm))
    session, cache = _l1_session(levels, hit_rate_threshold=0.3)
    cache.replace(hot, _rows(hot))
    session.lookup("t", every)  # 8 of 18 hits: above 0.3, so the fill of the other 10 runs in the background
    session.close()  # runs the queued fill
    missed = np.concatenate([warm, cold]).astype(np.int64)
    vectors, hit = cache.query(missed)
    assert hit.all()
    np.testing.assert_array_equal(vectors, _rows(missed))


def test_a_float16_lookup_answered_by_l1_and_both_levels_is_rounded_as_numpy_rounds(levels) -> None:  # type: ignore[no-untyped-def]
    """Rows from the levels below L1 are cast into the float16 reply L1 wrote: each exactly as float32's
    astype(float16) rounds it, at its own position, the missing key its table's default."""
    volatile, persistent = levels
    hot, warm, cold = np.arange(1, 9), np.arange(101, 105), np.arange(201, 207)  # L1, hash map, RocksDB only
    every = np.concatenate([hot, warm, cold]).astype(np.int64)
    rows = (_rows(every) / np.float32(3)).astype(np.float32)  # thirds: float16 must round them
    persistent.insert("m.t", every, rows)
    volatile.insert("m.t", warm, rows[8:12])
    session, cache = _l1_session(levels)
    cache.replace(hot, rows[:8])
    asked = np.concatenate([[999], every[::-1]]).astype(np.int64)
    (result,) = session.lookup_many([KeyQuery.of(session.table("t"), asked, np.dtype(np.float16))])
    assert isinstance(result, TableLookup) and result.vectors.dtype == np.float16
    np.testing.assert_array_equal(result.vectors[1:], rows[::-1].astype(np.float16))
    np.testing.assert_array_equal(result.vectors[0], np.full(DIM, 0.25, np.float16))
    assert session.counts()["t"].by_level == {"l1_cache": 8, "hash_map": 4, "rocksdb": 6, "default": 1}
    session.close()


def test_l1_below_the_threshold_is_filled_before_the_reply(levels) -> None:
    _, persistent = levels
    stored = np.arange(1, 9, dtype=np.int64)
    persistent.insert("m.t", stored, _rows(stored))
    session, cache = _l1_session(levels, hit_rate_threshold=0.9)
    keys = np.array([3, 99, 5, 3], np.int64)
    first = session.lookup("t", keys)
    assert cache.dump()[0].tolist() == [3, 5]  # inserted synchronously: hit rate 0 is below 0.9
    second = session.lookup("t", keys)
    np.testing.assert_array_equal(second.vectors, first.vectors)
    np.testing.assert_array_equal(second.found, [True, False, True, True])
    assert session.counts()["t"].by_level == {"l1_cache": 3, "hash_map": 0, "rocksdb": 3, "default": 2}
    assert session.cache_stats()["t"] == CacheStats(hits=3, misses=5, rows=2, capacity=64)
    session.close()


def test_l1_above_the_threshold_is_filled_in_the_background(levels) -> None:
    _, persistent = levels
    stored = np.arange(1, 9, dtype=np.int64)
    persistent.insert("m.t", stored, _rows(stored))
    session, cache = _l1_session(levels, hit_rate_threshold=0.0)
    release = threading.Event()
    assert session._fill is not None
    session._fill.submit(lambda: release.wait(10) and None)  # holds the worker: fills queue behind it
    result = session.lookup("t", np.array([1, 2], np.int64))
    np.testing.assert_array_equal(result.vectors, _rows(np.array([1, 2])))  # the reply carries stored rows
    assert cache.stats().rows == 0  # and did not wait for L1
    release.set()
    assert session._fill.wait_idle(10)
    assert cache.dump()[0].tolist() == [1, 2]
    session.close()


def test_answer_misses_with_default_replies_at_once_and_fetches_behind(levels) -> None:
    _, persistent = levels
    stored = np.arange(1, 9, dtype=np.int64)
    persistent.insert("m.t", stored, _rows(stored))
    session, _ = _l1_session(levels, hit_rate_threshold=0.0, answer_misses_with_default=True)
    first = session.lookup("t", np.array([4, 6], np.int64))
    np.testing.assert_array_equal(first.vectors, np.full((2, DIM), 0.25, np.float32))
    assert not first.found.any()
    assert session._fill is not None and session._fill.wait_idle(10)
    second = session.lookup("t", np.array([4, 6], np.int64))
    np.testing.assert_array_equal(second.vectors, _rows(np.array([4, 6])))
    assert second.found.all()
    assert session.counts()["t"].by_level == {"default": 2, "l1_cache": 2}
    session.close()


def test_upserts_and_deletes_reach_l1_and_a_fill_fetched_before_them_is_dropped(levels) -> None:
    _, persistent = levels
    keys = np.array([1, 2], np.int64)
    persistent.insert("m.t", keys, _rows(keys))
    session, cache = _l1_session(levels, hit_rate_threshold=0.0)
    release = threading.Event()
    assert session._fill is not None
    session._fill.submit(lambda: release.wait(10) and None)
    session.lookup("t", keys)  # its L1 fill waits behind the held worker with the old rows
    session.upsert("t", keys, _rows(keys) + 100)
    release.set()
    assert session._fill.wait_idle(10)
    assert cache.stats().rows == 0  # the old rows never reached L1
    np.testing.assert_array_equal(session.lookup("t", keys).vectors, _rows(keys) + 100)
    assert session._fill.wait_idle(10)
    session.upsert("t", keys[:1], _rows(keys[:1]) + 200)  # present in L1: updated in place
    np.testing.assert_array_equal(cache.query(keys[:1])[0], _rows(keys[:1]) + 200)
    session.delete("t", keys[1:])
    assert cache.dump()[0].tolist() == [1]
    session.close()


class _PausingRocksDB(RocksDBLevel):
    """Real RocksDB whose fetch waits after reading, so a test can interleave an upsert with a lookup."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fetched = threading.Event()
        self.resume = threading.Event()

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = super().fetch(table, keys)
        self.fetched.set()
        self.resume.wait(timeout=10)
        return result


def test_a_lookup_never_writes_back_rows_older_than_an_upsert(tmp_path: Path) -> None:
    volatile = HashMapLevel()
    persistent = _PausingRocksDB(tmp_path / "db")
    for level in (volatile, persistent):
        level.create_table("m.t", DIM)
    key = np.array([42], np.int64)
    old, new = _rows(key), _rows(key) + 100
    persistent.insert("m.t", key, old)
    session = LookupSession(MODEL, [volatile, persistent])

    looked_up: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: looked_up.append(session.lookup("t", key).vectors))
    reader.start()
    assert persistent.fetched.wait(timeout=10)  # the lookup has read the old row from RocksDB
    session.upsert("t", key, new)
    persistent.resume.set()  # now the lookup goes on to its write-back
    reader.join()

    np.testing.assert_array_equal(looked_up[0], old)  # the reply may carry what was read...
    np.testing.assert_array_equal(volatile.fetch("m.t", key)[0], new)  # ...but the hash map keeps the upsert
    np.testing.assert_array_equal(session.lookup("t", key).vectors, new)
    persistent.close()


# ---------------------------------------------------------------- one pass per batch


class _CountingHashMap(HashMapLevel):
    """The real hash map, counting the batched calls a lookup makes of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def fetch_many(self, tables, keys, table_index):  # type: ignore[no-untyped-def]
        self.calls["fetch_many"] += 1
        return super().fetch_many(tables, keys, table_index)

    def insert_many(self, tables, keys, table_index, vectors):  # type: ignore[no-untyped-def]
        self.calls["insert_many"] += 1
        return super().insert_many(tables, keys, table_index, vectors)


class _CountingRocksDB(RocksDBLevel):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: Counter[str] = Counter()

    def fetch_many(self, tables, keys, table_index):  # type: ignore[no-untyped-def]
        self.calls["fetch_many"] += 1
        return super().fetch_many(tables, keys, table_index)


class _CountingCache(ReferenceEmbeddingCache):
    def __init__(self, capacities: list[int], dim: int) -> None:
        super().__init__(capacities, dim)
        self.calls: Counter[str] = Counter()

    def query(self, keys, tables=None, dtype=np.float32, out=None):  # type: ignore[no-untyped-def]
        self.calls["query"] += 1
        return super().query(keys, tables, dtype=dtype, out=out)

    def replace(self, keys, vectors, tables=None):  # type: ignore[no-untyped-def]
        self.calls["replace"] += 1
        return super().replace(keys, vectors, tables)


class _CountingMetrics(ServerMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.level_timings = 0

    def record_level_seconds(self, model: str, level: str, seconds: float) -> None:
        self.level_timings += 1
        super().record_level_seconds(model, level, seconds)


def _one_pass(tmp_path: Path, tables: int) -> tuple[dict[str, int], list[TableLookup]]:
    """Serves `tables` tables of one dim from a counting L1, hash map and RocksDB; looks every table up
    once in one batch (keys held by each level, and absent ones) and returns the calls it made."""
    names = [f"t{i}" for i in range(tables)]
    model = ModelConfig(name="m", tables=tuple(TableConfig(name=n, dim=DIM, default_value=-1.0) for n in names))
    volatile, persistent = _CountingHashMap(), _CountingRocksDB(tmp_path / f"db{tables}")
    cache = _CountingCache([64] * tables, DIM)
    for i, name in enumerate(names):
        for level in (volatile, persistent):
            level.create_table(f"m.{name}", DIM)
        stored = np.arange(10) + 100 * i
        persistent.insert(f"m.{name}", stored, _rows(stored))
        volatile.insert(f"m.{name}", stored[:3], _rows(stored[:3]))
        cache.replace(stored[:1], _rows(stored[:1]), np.full(1, i))
    cache.calls.clear()
    metrics = _CountingMetrics()
    tally_adds = Counter[str]()
    session = LookupSession(
        model, [volatile, persistent], {n: TableL1((cache,), i) for i, n in enumerate(names)}, metrics=metrics
    )
    real_add = session.tally.add
    session.tally.add = lambda *args: (tally_adds.update(["add"]), real_add(*args))[1]  # type: ignore[method-assign]
    queries = [
        KeyQuery.of(session.table(n), np.array([100 * i, 100 * i + 1, 100 * i + 5, 999_999], np.int64))
        for i, n in enumerate(names)
    ]
    outcomes = session.lookup_many(queries)
    session.close()
    persistent.close()
    calls = {f"hash_map.{k}": v for k, v in volatile.calls.items()}
    calls |= {f"rocksdb.{k}": v for k, v in persistent.calls.items()}
    calls |= {f"l1.{k}": v for k, v in cache.calls.items()} | tally_adds
    calls["level timings"] = metrics.level_timings
    return calls, [o for o in outcomes if isinstance(o, TableLookup)]


def test_a_batch_asks_each_level_once_however_many_tables_it_names(tmp_path: Path) -> None:
    one, _ = _one_pass(tmp_path, 1)
    many, results = _one_pass(tmp_path, 26)
    # L1 queried once and filled once, the hash map asked once and written back once, RocksDB asked
    # once, one tally update and one timing per level: the same for 26 tables as for one.
    assert many == one
    assert one == {
        "l1.query": 1,
        "l1.replace": 1,
        "hash_map.fetch_many": 1,
        "hash_map.insert_many": 1,
        "rocksdb.fetch_many": 1,
        "add": 1,
        "level timings": 3,
    }
    assert len(results) == 26
    for i, result in enumerate(results):
        keys = np.array([100 * i, 100 * i + 1, 100 * i + 5])
        np.testing.assert_array_equal(result.vectors[:3], _rows(keys))
        np.testing.assert_array_equal(result.vectors[3], np.full(DIM, -1.0, np.float32))
        np.testing.assert_array_equal(result.found, [True, True, True, False])


def test_a_batch_of_tables_of_several_widths_and_dtypes_is_answered_exactly(levels) -> None:
    volatile, persistent = levels
    model = ModelConfig(
        name="m", tables=(TableConfig(name="t", dim=DIM), TableConfig(name="wide", dim=2 * DIM)), gpucache=False
    )
    for level in levels:
        level.create_table("m.wide", 2 * DIM)
    keys = np.arange(1, 6, dtype=np.int64)
    persistent.insert("m.t", keys, _rows(keys))
    persistent.insert("m.wide", keys, np.hstack([_rows(keys), -_rows(keys)]))
    session = LookupSession(model, [volatile, persistent])
    t, wide = session.table("t"), session.table("wide")
    queries = [
        KeyQuery.of(t, keys[:2]),
        KeyQuery.of(wide, keys[::-1], np.dtype(np.float16)),
        KeyQuery.of(t, keys[3:], np.dtype(np.float16)),
    ]
    first, second, third = session.lookup_many(queries)
    assert isinstance(first, TableLookup) and isinstance(second, TableLookup) and isinstance(third, TableLookup)
    np.testing.assert_array_equal(first.vectors, _rows(keys[:2]))
    assert first.vectors.dtype == np.float32 and second.vectors.dtype == third.vectors.dtype == np.float16
    np.testing.assert_array_equal(second.vectors, np.hstack([_rows(keys[::-1]), -_rows(keys[::-1])]).astype(np.float16))
    np.testing.assert_array_equal(third.vectors, _rows(keys[3:]).astype(np.float16))
    assert session.counts()["t"].by_level["rocksdb"] == 4 and session.counts()["wide"].by_level["rocksdb"] == 5


def test_queries_of_a_kept_shape_are_answered_for_their_own_keys_and_counted(levels) -> None:  # type: ignore[no-untyped-def]
    """A lone query's batch shape (its tables and key counts) is kept for the next query of that shape: a
    second query of the same shape with other keys gets its own rows and counts, and the session keeps no
    more than SHAPES_KEPT shapes however many its clients send (the others are still answered)."""
    volatile, persistent = levels
    model = ModelConfig(
        name="m", tables=(TableConfig(name="t", dim=DIM), TableConfig(name="u", dim=DIM, default_value=-1.0)),
        gpucache=False,
    )  # fmt: skip
    persistent.create_table("m.u", DIM)
    volatile.create_table("m.u", DIM)
    keys = np.arange(1, 1001, dtype=np.int64)
    persistent.insert("m.t", keys, _rows(keys))
    persistent.insert("m.u", keys, -_rows(keys))
    session = LookupSession(model, [volatile, persistent])
    tables = (session.table("t"), session.table("u"))
    for start in (0, 10):  # the same shape twice: 3 keys of t, then 2 of u (one of them absent)
        asked = np.array([start + 1, start + 2, start + 3, start + 4, 5000 + start], np.int64)
        (result,) = session.lookup_many([KeyQuery(tables, asked, np.array([3, 2]))])
        assert isinstance(result, TableLookup)
        expected = np.vstack([_rows(asked[:3]), -_rows(asked[3:4]), np.full((1, DIM), -1.0, np.float32)])
        np.testing.assert_array_equal(result.vectors, expected)
        np.testing.assert_array_equal(result.found, [True, True, True, True, False])
    counts = session.counts()
    assert counts["t"].by_level == {"hash_map": 0, "rocksdb": 6}
    assert counts["u"].by_level == {"hash_map": 0, "rocksdb": 2, "default": 2}
    for n in range(1, SHAPES_KEPT + 20):
        (result,) = session.lookup_many([KeyQuery.of(tables[0], keys[:n])])
        assert isinstance(result, TableLookup) and result.found.all()
    assert len(session._shapes) == SHAPES_KEPT


class _UnreachableRocksDB(RocksDBLevel):
    """Real RocksDB that answers as if the disk were gone: every fetch is a LevelUnavailableError."""

    def fetch_many(self, tables, keys, table_index):  # type: ignore[no-untyped-def]
        raise LevelUnavailableError("rocksdb: unreachable in this test")


def test_without_the_authoritative_level_only_the_queries_it_was_needed_for_fail(tmp_path: Path) -> None:
    volatile = HashMapLevel()
    persistent = _UnreachableRocksDB(tmp_path / "db")
    for level in (volatile, persistent):
        level.create_table("m.t", DIM)
    volatile.insert("m.t", np.array([1, 2]), _rows(np.array([1, 2])))
    session = LookupSession(MODEL, [volatile, persistent])
    table = session.table("t")
    held, needs_rocksdb = session.lookup_many(
        [KeyQuery.of(table, np.array([2, 1])), KeyQuery.of(table, np.array([1, 3]))]
    )
    assert isinstance(held, TableLookup)
    np.testing.assert_array_equal(held.vectors, _rows(np.array([2, 1])))
    assert isinstance(needs_rocksdb, LevelUnavailableError) and "rocksdb level is unavailable" in str(needs_rocksdb)
    with pytest.raises(LevelUnavailableError):
        session.lookup("t", np.array([3]))
    persistent.close()


def test_a_replacing_session_shares_write_epochs_only_with_tables_of_the_same_storage_name() -> None:
    model = ModelConfig("m", (TableConfig("a", 4), TableConfig("b", 4)), gpucache=False)
    level = HashMapLevel()
    level.create_table("m.a", 4)
    old = LookupSession(model, [level])
    same = LookupSession(model, [level], previous=old)
    b_v2 = dataclasses.replace(model, tables=(model.tables[0], dataclasses.replace(model.tables[1], version="v2")))
    versioned = LookupSession(b_v2, [level], previous=old)
    same.upsert("a", np.array([1]), np.ones((1, 4), np.float32))  # write-backs of the old one's are now stale
    assert old.tables["a"].epoch == 2 and same.tables["a"].lock is old.tables["a"].lock
    assert versioned.tables["a"].epoch == 2
    assert versioned.tables["b"].lock is not old.tables["b"].lock and versioned.tables["b"].epoch == 0
    assert same.tally is old.tally


def test_the_epoch_moves_only_once_a_write_is_done(levels) -> None:  # type: ignore[no-untyped-def]
    """A walk that read its epoch while a write was under way may have read the levels before the write
    reached them: its write-back must be refused afterwards."""
    session, _ = _l1_session(levels)
    table = session.table("t")
    keys = np.arange(8, dtype=np.int64)
    seen_during: list[int] = []
    session.announce = lambda *written: seen_during.append(table.epoch)  # runs inside the write, levels written
    session.upsert("t", keys, _rows(keys))
    (during,) = seen_during
    assert not session.insert_if_unchanged(table, during, lambda: None)
    assert session.insert_if_unchanged(table, table.epoch, lambda: None)
    session.close()


def test_a_write_from_the_stream_reaches_l1_in_place_and_the_levels(levels) -> None:  # type: ignore[no-untyped-def]
    session, cache = _l1_session(levels, hit_rate_threshold=1.0)
    volatile, persistent = levels
    keys = np.arange(16, dtype=np.int64)
    persistent.insert("m.t", keys, _rows(keys))
    session.lookup("t", keys)  # into L1
    announced: list[object] = []
    session.announce = lambda *written: announced.append(written)
    session.apply_update("t", "upsert", keys, _rows(keys) + 100, skip_shared=True)
    hits = cache.stats().hits
    np.testing.assert_array_equal(session.lookup("t", keys).vectors, _rows(keys) + 100)
    assert cache.stats().hits == hits + len(keys)
    np.testing.assert_array_equal(persistent.fetch("m.t", keys)[0], _rows(keys) + 100)
    np.testing.assert_array_equal(volatile.fetch("m.t", keys)[0], _rows(keys) + 100)  # not shared: written
    session.apply_update("t", "drop", keys[:0], None, skip_shared=True)
    assert cache.stats().rows == 0 and volatile.size("m.t") == 0 and persistent.size("m.t") == len(keys)
    assert not announced  # a write from the stream is not published again
    session.close()
