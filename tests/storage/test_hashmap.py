"""Behaviour particular to the in-process hash map: growth, probing, tombstones, memory, threads.

The batched contract it shares with other backends is tested in test_contract.py, not here.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hps_server.config import VolatileDbConfig
from hps_server.storage import hashmap, open_volatile
from hps_server.storage.hashmap import HashMapLevel


def rows(keys: np.ndarray, dim: int) -> np.ndarray:
    return (keys[:, None] % 65521 + np.arange(dim)[None, :]).astype(np.float32)


def check_all(level: HashMapLevel, table: str, keys: np.ndarray, dim: int) -> None:
    vectors, found = level.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys, dim))


def test_growth_by_small_batches_keeps_every_row() -> None:
    level = HashMapLevel()
    level.create_table("m.t", 4)
    keys = np.arange(20_000, dtype=np.int64) * 3 - 10_000
    capacities = []
    for start in range(0, len(keys), 997):
        batch = keys[start : start + 997]
        level.insert("m.t", batch, rows(batch, 4))
        capacities.append(len(level._tables["m.t"].pool.keys))
    assert level.size("m.t") == len(keys)
    assert capacities[-1] > hashmap.MIN_ROWS
    steps = np.diff(capacities)
    grown = np.flatnonzero(steps)
    # Each growth is by the modest factor (or exactly to what one batch needed).
    growth = hashmap.growth_factor(4)
    assert all(capacities[i + 1] <= max(capacities[i] * growth + 1, capacities[i] + 997) for i in grown)
    check_all(level, "m.t", keys, 4)


def colliding_keys(num_slots: int, home: int, count: int) -> np.ndarray:
    """`count` keys whose first probed slot is `home`."""
    candidates = np.arange(1, 50_000_000, dtype=np.int64)
    same = candidates[
        hashmap.home_slots(np.zeros(len(candidates), dtype=hashmap.TABLE_ID), candidates, num_slots) == home
    ][:count]
    assert len(same) == count
    return same


def test_long_probe_chains_wrapping_round_the_index() -> None:
    level = HashMapLevel()
    level.create_table("m.t", 2)
    num_slots = len(level._tables["m.t"].pool.slots)
    # All homed on the last slot, so the chain wraps to slot 0 onwards.
    keys = colliding_keys(num_slots, num_slots - 1, 300)
    level.insert("m.t", keys, rows(keys, 2))
    assert len(level._tables["m.t"].pool.slots) == num_slots, "no rebuild: the chain really is 300 long"
    check_all(level, "m.t", keys, 2)
    assert not level.contains("m.t", colliding_keys(num_slots, num_slots - 1, 310)[300:]).any()
    # Deleting from the middle of the chain must not cut off the keys behind it.
    assert level.evict("m.t", keys[100:200]) == 100
    rest = np.concatenate([keys[:100], keys[200:]])
    check_all(level, "m.t", rest, 2)
    assert not level.contains("m.t", keys[100:200]).any()
    level.insert("m.t", keys[150:200], rows(keys[150:200], 2) + 1)
    vectors, found = level.fetch("m.t", keys[150:200])
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys[150:200], 2) + 1)
    check_all(level, "m.t", rest, 2)


def test_delete_then_reinsert_many_times_reclaims_tombstones() -> None:
    level = HashMapLevel()
    level.create_table("m.t", 3)
    keys = np.arange(5000, dtype=np.int64) * 1_000_003
    for round_ in range(12):
        level.insert("m.t", keys, rows(keys, 3))
        check_all(level, "m.t", keys, 3)
        assert level.evict("m.t", keys[round_ % 2 :: 2]) == len(keys[round_ % 2 :: 2])
        assert level.size("m.t") == len(keys) // 2
        t = level._tables["m.t"].pool
        assert t.rows + t.tombstones <= hashmap.REBUILD_LOAD * len(t.slots)
        assert len(t.slots) <= int(len(keys) / hashmap.REBUILT_LOAD) + 1, "tombstones were rebuilt away"
    remaining = keys[::2]  # the last round (11) evicted the odd positions
    check_all(level, "m.t", remaining, 3)
    assert level.evict("m.t", keys) == len(remaining)
    assert level.size("m.t") == 0
    assert not level.contains("m.t", keys).any()


@pytest.mark.parametrize(("dim", "total"), [(16, 300_000), (64, 100_000), (128, 100_000)])
def test_memory_stays_within_1_3x_of_raw_bytes(dim: int, total: int) -> None:
    level = HashMapLevel()
    level.create_table("m.t", dim)
    rng = np.random.default_rng(dim)
    keys = rng.integers(-(2**63), 2**63 - 1, size=total, dtype=np.int64)
    ratios = []
    for start in range(0, total, 20_000):
        batch = keys[start : start + 20_000]
        level.insert("m.t", batch, rng.random((len(batch), dim), dtype=np.float32))
        ratios.append(level.memory_bytes("m.t") / (level.size("m.t") * (8 + 4 * dim)))
    assert level.size("m.t") == total
    assert max(ratios) <= 1.3, ratios


def test_access_stamps_survive_the_counter_wrapping() -> None:
    level = HashMapLevel(overflow_margin=4, overflow_policy="evict_oldest", overflow_resolution_target=0.5)
    level.create_table("m.t", 1)
    keys = np.array([1, 2, 3, 4], dtype=np.int64)
    level.insert("m.t", keys, rows(keys, 1))
    level._tables["m.t"].pool.clock = int(np.iinfo(np.uint32).max) - 1
    level.fetch("m.t", keys[[0]])
    level.fetch("m.t", keys[[1]])  # renumbers stamps here
    level.fetch("m.t", keys[[2]])
    level.insert("m.t", np.array([5], dtype=np.int64), np.ones((1, 1), dtype=np.float32))
    np.testing.assert_array_equal(level.contains("m.t", np.arange(1, 6)), [False, False, True, False, True])


def test_concurrent_inserts_and_fetches_are_exact() -> None:
    level = HashMapLevel()
    dim = 8
    level.create_table("m.t", dim)
    shared = np.arange(-5000, 0, dtype=np.int64)
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        own = np.arange(worker * 100_000, worker * 100_000 + 20_000, dtype=np.int64)
        try:
            for start in range(0, len(own), 2000):
                batch = np.concatenate([own[start : start + 2000], shared[start // 4 : start // 4 + 500]])
                level.insert("m.t", batch, rows(batch, dim))
                vectors, found = level.fetch("m.t", np.concatenate([batch, shared]))
                assert found[: len(batch)].all()
                asked = np.concatenate([batch, shared])
                np.testing.assert_array_equal(vectors[found], rows(asked[found], dim))
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    everything = np.concatenate([np.arange(w * 100_000, w * 100_000 + 20_000) for w in range(4)] + [shared])
    assert level.size("m.t") == len(everything)
    check_all(level, "m.t", everything.astype(np.int64), dim)


def test_opened_from_config_through_the_registry() -> None:
    level = open_volatile(
        VolatileDbConfig(overflow_margin=10, overflow_policy="evict_oldest", overflow_resolution_target=0.5)
    )
    assert isinstance(level, HashMapLevel)
    assert level.kind == "hash_map"
    assert (level.overflow_margin, level.overflow_policy, level.overflow_target) == (10, "evict_oldest", 5)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"overflow_margin": 0}, "overflow_margin"),
        ({"overflow_policy": "evict_newest"}, "overflow_policy"),
        ({"overflow_resolution_target": 0.0}, "overflow_resolution_target"),
        ({"overflow_resolution_target": 1.5}, "overflow_resolution_target"),
    ],
)
def test_bad_overflow_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HashMapLevel(**settings)


def test_create_table_rejects_a_dim_below_one() -> None:
    with pytest.raises(ValueError, match="dim"):
        HashMapLevel().create_table("m.t", 0)


def test_memory_is_given_back_after_large_evictions() -> None:
    level = HashMapLevel()
    dim = 16
    level.create_table("m.t", dim)
    keys = np.arange(100_000, dtype=np.int64) * 7
    level.insert("m.t", keys, rows(keys, dim))
    before = level.memory_bytes("m.t")
    assert level.evict("m.t", keys[10_000:]) == 90_000
    assert level.memory_bytes("m.t") < before / 4
    assert level.memory_bytes("m.t") <= 1.3 * 10_000 * (8 + 4 * dim)
    check_all(level, "m.t", keys[:10_000], dim)
    assert not level.contains("m.t", keys[10_000:]).any()
    level.insert("m.t", keys[10_000:20_000], rows(keys[10_000:20_000], dim))
    check_all(level, "m.t", keys[:20_000], dim)


def test_overflow_eviction_on_a_single_oversized_batch() -> None:
    level = HashMapLevel(overflow_margin=100, overflow_policy="evict_oldest", overflow_resolution_target=0.9)
    level.create_table("m.t", 2)
    keys = np.arange(10_000, dtype=np.int64)
    level.insert("m.t", keys, rows(keys, 2))
    assert level.size("m.t") == 90
    vectors, found = level.fetch("m.t", keys)
    assert found.sum() == 90
    np.testing.assert_array_equal(vectors[found], rows(keys[found], 2))
    assert level.memory_bytes("m.t") < 10_000 * (8 + 8) / 4, "the oversized batch's room was given back"


def test_tables_of_one_dim_share_a_pool_with_exact_sizes_dumps_and_memory_shares() -> None:
    level = HashMapLevel()
    names = ["m.a", "m.b", "m.c"]
    for name in names:
        level.create_table(name, 4)
    level.create_table("m.wide", 8)
    pool = level._tables["m.a"].pool
    assert all(level._tables[name].pool is pool for name in names)
    assert level._tables["m.wide"].pool is not pool
    # Interleaved rows of three tables sharing key values, through both write paths and several growths.
    keys = np.arange(30_000, dtype=np.int64) % 12_000
    index = np.arange(30_000) % 3
    level.insert_many(names, keys, index, rows(keys, 4) + index[:, None])
    level.insert("m.b", np.arange(50_000, 51_000), rows(np.arange(50_000, 51_000), 4) + 1)
    distinct = [len(np.unique(keys[index == i])) for i in range(3)]
    assert [level.size(name) for name in names] == [distinct[0], distinct[1] + 1000, distinct[2]]
    assert level.size("m.wide") == 0
    for position, name in enumerate(names):
        chunks = list(level.dump(name, chunk_rows=1000))
        assert [len(k) for k, _ in chunks[:-1]] == [1000] * (len(chunks) - 1)
        assert len(chunks) == -(-level.size(name) // 1000)
        dumped = np.concatenate([k for k, _ in chunks])
        vectors = np.concatenate([v for _, v in chunks])
        assert len(np.unique(dumped)) == len(dumped) == level.size(name)
        np.testing.assert_array_equal(vectors, rows(dumped, 4) + position)
    shares = [level.memory_bytes(name) for name in names]
    assert abs(sum(shares) - pool.memory_bytes()) <= len(names)
    assert shares[1] > shares[0]


def test_evict_in_one_table_leaves_the_same_keys_in_the_others() -> None:
    level = HashMapLevel()
    names = ["m.a", "m.b"]
    for name in names:
        level.create_table(name, 2)
    keys = np.arange(5000, dtype=np.int64)
    level.insert_many(names, np.concatenate([keys, keys]), np.repeat([0, 1], 5000), np.ones((10_000, 2)))
    # Evicting most of m.a moves m.b's rows (stored after it) into the holes.
    assert level.evict("m.a", keys[:4500]) == 4500
    assert level.size("m.a") == 500 and level.size("m.b") == 5000
    assert level.contains("m.b", keys).all()
    np.testing.assert_array_equal(level.contains("m.a", keys), keys >= 4500)
    vectors, found = level.fetch_many(names, np.concatenate([keys, keys]), np.repeat([0, 1], 5000))
    np.testing.assert_array_equal(found, np.concatenate([keys >= 4500, np.ones(5000, dtype=bool)]))
    assert (vectors[found] == 1).all()
    assert level.evict("m.b", keys) == 5000
    assert level.contains("m.a", keys[4500:]).all()


@pytest.mark.parametrize("policy", ["evict_oldest", "evict_random"])
def test_overflow_evicts_only_rows_of_the_overflowing_table(policy: str) -> None:
    level = HashMapLevel(overflow_margin=100, overflow_policy=policy, overflow_resolution_target=0.5)
    names = ["m.a", "m.b"]
    for name in names:
        level.create_table(name, 2)
    small = np.arange(90, dtype=np.int64)
    level.insert("m.b", small, rows(small, 2))
    big = np.arange(1000, 1150, dtype=np.int64)
    # One batch: m.a goes over its margin, m.b gets 5 more rows and stays under it.
    keys = np.concatenate([big, small[:5] + 500])
    index = np.repeat([0, 1], [150, 5])
    level.insert_many(names, keys, index, rows(keys, 2))
    assert level.size("m.a") == 50
    assert level.size("m.b") == 95
    check_all(level, "m.b", np.concatenate([small, small[:5] + 500]), 2)
    assert level.contains("m.a", big).sum() == 50
    assert not level.contains("m.a", small).any()


def test_many_tables_cost_one_find_like_one_table() -> None:
    level = HashMapLevel()
    names = [f"m.t{i}" for i in range(26)]
    for name in names:
        level.create_table(name, 4)
    pool = level._tables[names[0]].pool
    calls: list[int] = []
    find = pool.find

    def counted_find(table_ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(keys))
        return find(table_ids, keys)

    pool.find = counted_find  # type: ignore[method-assign]
    keys = np.tile(np.arange(1000, dtype=np.int64), 26)
    index = np.repeat(np.arange(26), 1000)

    def work(tables: list[str], batch_index: np.ndarray) -> int:
        calls.clear()
        level.insert_many(tables, keys, batch_index, rows(keys, 4))
        vectors, found = level.fetch_many(tables, keys, batch_index)
        assert found.all()
        np.testing.assert_array_equal(vectors, rows(keys, 4))
        return len(calls)

    one = work(names[:1], np.zeros(len(keys), dtype=np.int64))
    assert one == 2  # the insert's lookup of present rows, and the fetch
    assert work(names, index) == one
    assert calls == [len(keys)] * one
    assert [level.size(name) for name in names] == [1000] * 26
