"""L1 sharded over devices: the route, the gathered replies against unsharded references, placement, config,
and a real server (gRPC on loopback) serving a sharded model over two pretend devices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from hps_client import Client
from hps_server import config as config_module
from hps_server.cache.layout import mix, set_of
from hps_server.cache.placement import build_caches, gpus_available
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable
from hps_server.cache.sharded import Route, ShardedCache, shard_of, split_rows
from hps_server.server import HpsServer
from tests.cache.test_placement import MODEL, levels  # noqa: F401  (a fixture)
from tests.conftest import sample_raw_config, write_sample_tables

DIM = 6


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, DIM), dtype=np.float32)


def test_route_is_balanced_deterministic_and_apart_from_the_set_hash() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**62), 2**62, size=200_000)
    tables = rng.integers(0, 3, size=keys.size).astype(np.int32)
    for shards in (2, 3, 4):
        shard = shard_of(keys, tables, shards)
        counts = np.bincount(shard, minlength=shards)
        assert counts.size == shards and np.all(np.abs(counts / keys.size - 1 / shards) < 0.01)
        np.testing.assert_array_equal(shard, shard_of(keys.copy(), tables.copy(), shards))
    # The table is part of the route: the same keys of another table land elsewhere about half the time.
    moved = np.mean(shard_of(keys, np.zeros_like(tables), 2) != shard_of(keys, np.ones_like(tables), 2))
    assert 0.45 < moved < 0.55
    # One shard's keys still fill every set of a cache (the route does not pick sets).
    sets = set_of(mix(keys[shard_of(keys, tables, 2) == 0]), 64)
    assert np.bincount(sets, minlength=64).min() > 0.8 * sets.size / 64


def test_route_keeps_batch_order_inside_each_shard() -> None:
    keys = np.array([5, 9, 5, 1, 9, 5, 7], np.int64)
    route = Route.of(keys, np.zeros(keys.size, np.int32), 2)
    parts = [route.positions(s) for s in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(keys.size))
    assert all(np.all(np.diff(p) > 0) for p in parts)
    assert len({int(shard_of(keys[[i]], np.zeros(1, np.int32), 2)[0]) for i in (0, 2, 5)}) == 1


def _static_pair(rng: np.random.Generator, shards: int) -> tuple[ReferenceStaticTable, ShardedCache]:
    keys = rng.choice(10_000, size=3_000, replace=False).astype(np.int64)
    tables = rng.integers(0, 2, size=keys.size).astype(np.int32)
    vectors = _rows(rng, keys.size)
    whole = ReferenceStaticTable(keys, vectors, tables=tables, num_tables=2)
    parts = split_rows(keys, vectors, tables, shards)
    sharded = ShardedCache([ReferenceStaticTable(k, v, tables=t, num_tables=2) for k, v, t in parts])
    return whole, sharded


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_static_table_answers_exactly_as_one_whole_table(shards: int) -> None:
    rng = np.random.default_rng(1)
    whole, sharded = _static_pair(rng, shards)
    assert sharded.capacities == whole.capacities and sharded.capacity == whole.capacity == 3_000
    assert all(0 < shard.capacity < whole.capacity for shard in sharded.shards)
    for step in range(4):
        keys = rng.integers(0, 12_000, size=4_000)  # held and unheld keys, repeats, both tables
        tables = rng.integers(0, 2, size=keys.size).astype(np.int32)
        for dtype in (np.float32, np.float16):
            got, hit = sharded.query(keys, tables, dtype=dtype)
            want, want_hit = whole.query(keys, tables, dtype=dtype)
            np.testing.assert_array_equal(hit, want_hit)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == dtype
        written = rng.integers(0, 12_000, size=500)
        written_tables = rng.integers(0, 2, size=written.size).astype(np.int32)
        rows = _rows(rng, written.size)
        for cache in (whole, sharded):
            if step % 2:
                cache.invalidate(written, written_tables)
            else:
                cache.replace(written, rows, written_tables)
            cache.update(written[::3], rows[::3] + 1, written_tables[::3])
    for table in (0, 1):
        for got, want in zip(sharded.dump(table), whole.dump(table), strict=True):
            np.testing.assert_array_equal(got, want)
    assert sharded.table_stats() == whole.table_stats() and sharded.stats() == whole.stats()


def test_sharded_lru_cache_serves_what_was_written_and_keeps_each_shard_in_bounds() -> None:
    rng = np.random.default_rng(2)
    shards = [ReferenceEmbeddingCache([256, 64], DIM) for _ in range(3)]
    cache = ShardedCache(shards)
    assert cache.capacities == (768, 192) and cache.num_tables == 2 and cache.dim == DIM
    truth: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(6):
        keys = rng.integers(0, 2_000, size=600)  # repeats inside a batch: the last row wins
        tables = rng.integers(0, 2, size=keys.size).astype(np.int32)
        rows = _rows(rng, keys.size)
        cache.replace(keys, rows, tables)
        for key, table, row in zip(keys.tolist(), tables.tolist(), rows, strict=True):
            truth[(table, key)] = row
        asked = rng.integers(0, 4_000, size=1_000)
        asked_tables = rng.integers(0, 2, size=asked.size).astype(np.int32)
        vectors, hit = cache.query(asked, asked_tables)
        assert hit.any() and not hit.all()
        for key, table, row, found in zip(asked.tolist(), asked_tables.tolist(), vectors, hit, strict=True):
            if found:
                np.testing.assert_array_equal(row, truth[(table, key)])  # every hit is the last row written
            else:
                assert not row.any()
            if key >= 2_000:
                assert not found  # never inserted
        for shard in shards:
            assert all(s.rows <= s.capacity for s in shard.table_stats())
    dumped_keys, dumped_rows, _ = cache.dump(1)
    assert np.all(np.diff(dumped_keys) > 0)
    assert dumped_keys.size == cache.table_stats()[1].rows == sum(s.table_stats()[1].rows for s in shards)
    for key, row in zip(dumped_keys.tolist(), dumped_rows, strict=True):
        np.testing.assert_array_equal(row, truth[(1, key)])
    # update touches present rows only; invalidate drops them.
    present = dumped_keys[:50]
    absent = np.arange(5_000, 5_050)
    cache.update(np.concatenate([present, absent]), np.full((100, DIM), 7, np.float32), np.ones(100, np.int32))
    vectors, hit = cache.query(np.concatenate([present, absent]), np.ones(100, np.int32))
    assert hit[:50].all() and not hit[50:].any() and np.all(vectors[:50] == 7)
    cache.invalidate(present, np.ones(50, np.int32))
    assert not cache.query(present, np.ones(50, np.int32))[1].any()
    stats = cache.stats()
    assert stats.hits == sum(s.stats().hits for s in shards) and stats.misses > 0


def test_sharded_lru_cache_below_capacity_matches_one_cache() -> None:
    rng = np.random.default_rng(3)
    whole = ReferenceEmbeddingCache(4_096, DIM)
    sharded = ShardedCache([ReferenceEmbeddingCache(2_048, DIM) for _ in range(2)])
    keys = rng.choice(100_000, size=300, replace=False).astype(np.int64)  # far from filling any set
    rows = _rows(rng, keys.size)
    for cache in (whole, sharded):
        cache.replace(keys, rows)
    asked = np.concatenate([keys, keys[::-1], np.arange(100_000, 100_100)])
    for got, want in zip(sharded.query(asked), whole.query(asked), strict=True):
        np.testing.assert_array_equal(got, want)


def test_shards_must_agree_and_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="shards"):
        ShardedCache([])
    with pytest.raises(ValueError, match="shards"):
        ShardedCache([ReferenceEmbeddingCache(64, 4), ReferenceEmbeddingCache(64, 5)])
    with pytest.raises(ValueError, match="gather: must be host or device"):
        ShardedCache([ReferenceEmbeddingCache(64, 4)], gather="peer")  # type: ignore[arg-type]  # a bad value on purpose
    with pytest.raises(ValueError, match="gather: device needs GPU shards"):
        ShardedCache([ReferenceEmbeddingCache(64, 4)], gather="device")
    cache = ShardedCache([ReferenceEmbeddingCache([64, 64], 4) for _ in range(2)])
    with pytest.raises(ValueError, match="tables"):
        cache.query(np.arange(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="vectors"):
        cache.replace(np.arange(3), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="table"):
        cache.dump(5)


@pytest.mark.skipif(gpus_available((0, 1)), reason="checks the GPU-less path")
def test_sharded_placement_without_gpus_builds_a_reference_shard_per_listed_device(levels) -> None:  # noqa: F811
    model = dataclasses.replace(MODEL, gpu_placement="sharded", deployed_device_list=(0, 1))
    caches = build_caches(model, levels)
    (a,) = caches["a"].caches
    assert isinstance(a, ShardedCache) and len(a.shards) == 2
    assert all(isinstance(s, ReferenceEmbeddingCache) and s.capacities == (96,) for s in a.shards)  # 224 / 2
    assert caches["a"].device_caches() == a.shards
    static = build_caches(dataclasses.replace(model, use_static_table=True), levels)["b"].caches[0]
    assert isinstance(static, ShardedCache) and static.capacity == 40
    assert all(0 < s.capacity < 40 for s in static.shards)
    keys = np.arange(40, dtype=np.int64) * 7
    vectors, hit = static.query(np.concatenate([keys, [3]]), np.zeros(41, np.int32))
    assert hit.tolist() == [True] * 40 + [False]
    np.testing.assert_array_equal(vectors[:40], np.repeat(keys[:, None], 3, axis=1))


def test_gpu_placement_is_parsed_and_checked(tmp_path: Path) -> None:
    raw = sample_raw_config()
    assert config_module.parse(raw, tmp_path).models[0].gpu_placement == "replicated"
    raw["models"][0].update(gpu_placement="sharded", deployed_device_list=[0, 1])
    assert config_module.parse(raw, tmp_path).models[0].gpu_placement == "sharded"
    raw["models"][0]["gpu_placement"] = "striped"
    with pytest.raises(config_module.ConfigError, match=r"models\[0\]\.gpu_placement: must be one of replicated"):
        config_module.parse(raw, tmp_path)
    raw["models"][0].update(gpu_placement="sharded", deployed_device_list=[1, 1])
    with pytest.raises(config_module.ConfigError, match=r"models\[0\]\.deployed_device_list: must not name a device"):
        config_module.parse(raw, tmp_path)


@pytest.mark.skipif(gpus_available((0, 1)), reason="serves the reference shards of a GPU-less host")
def test_server_serves_a_sharded_model_exactly_and_upserts_reach_its_shards(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(initial_cache_rate=1.0)
    raw["models"][0].update(gpucache=True, gpucacheper=1.0, gpu_placement="sharded", deployed_device_list=[0, 1])
    server = HpsServer(config_module.parse(raw, tmp_path))
    port = server.start()
    try:
        assert server.wait_ready(30)
        l1 = server.models.sessions["ctr"].tables["user"].l1
        assert l1 is not None
        (cache,) = l1.caches
        assert isinstance(cache, ShardedCache) and all(s.table_stats()[l1.index].rows > 1_000 for s in cache.shards)
        occupancy = [o for o in server.models.cache_occupancy() if o.table == "user"]
        assert sorted(o.device for o in occupancy) == ["host:0", "host:1"]  # one series per shard
        assert sum(o.stats.rows for o in occupancy) == cache.table_stats()[l1.index].rows
        keys, vectors = truth["user"]
        with Client(f"127.0.0.1:{port}") as client:
            asked = np.concatenate([keys[:200], [10**7], keys[:50]])  # a key no table has, repeats
            got = client.lookup("ctr", "user", asked)
            np.testing.assert_array_equal(got[:200], vectors[:200])
            np.testing.assert_array_equal(got[200], np.zeros(16, np.float32))  # user's default is 0
            np.testing.assert_array_equal(got[201:], vectors[:50])
            hits_before = cache.table_stats()[l1.index].hits
            assert hits_before > 200  # warm-up filled both shards (a few sets overflowed)
            fresh = np.full((20, 16), 3.5, np.float32)
            assert client.upsert("ctr", "user", keys[:20], fresh) == 20
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys[:40])[:20], fresh)
            assert cache.table_stats()[l1.index].hits > hits_before + 30  # answered from the shards
            # Every copy L1 holds of an upserted key is the new row, whichever shard holds it.
            rows, held = cache.query(keys[:20], np.full(20, l1.index, np.int32))
            assert held.sum() > 10 and np.all(rows[held] == 3.5)
    finally:
        server.stop(grace=1)
