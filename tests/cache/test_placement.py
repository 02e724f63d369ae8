"""Building a model's L1 from its config over real levels (in-process hash map over RocksDB)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hps_server.cache.placement import build_caches, gpus_available
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable
from hps_server.config import ModelConfig, PersistentDbConfig, TableConfig, VolatileDbConfig
from hps_server.storage.base import StorageLevel
from hps_server.storage.hashmap import HashMapLevel
from hps_server.storage.rocksdb import RocksDBLevel

MODEL = ModelConfig(
    name="m",
    tables=(TableConfig(name="a", dim=4), TableConfig(name="b", dim=3)),
    max_batch_size=8,
    gpucacheper=0.25,
    deployed_device_list=(0, 1),
)
ROWS = {"a": 1000, "b": 40}


@pytest.fixture
def levels(tmp_path: Path) -> Iterator[list[StorageLevel]]:
    volatile = HashMapLevel.from_config(VolatileDbConfig())
    persistent = RocksDBLevel.from_config(PersistentDbConfig(path=tmp_path / "db"))
    for table in MODEL.tables:
        keys = np.arange(ROWS[table.name], dtype=np.int64) * 7
        vectors = np.repeat(keys[:, None], table.dim, axis=1).astype(np.float32)
        for level in (volatile, persistent):
            level.create_table(f"m.{table.name}", table.dim)
        persistent.insert(f"m.{table.name}", keys, vectors)
    yield [volatile, persistent]
    volatile.close()
    persistent.close()


def test_gpucache_off_builds_nothing(levels) -> None:
    assert build_caches(dataclasses.replace(MODEL, gpucache=False), levels) == {}


@pytest.mark.skipif(gpus_available((0, 1)), reason="checks the GPU-less fallback")
def test_without_gpus_each_table_gets_one_reference_cache(levels) -> None:
    caches = build_caches(MODEL, levels)
    assert set(caches) == {"a", "b"}
    (a,) = caches["a"].caches
    (b,) = caches["b"].caches
    assert isinstance(a, ReferenceEmbeddingCache) and isinstance(b, ReferenceEmbeddingCache)
    assert a.capacities == (224,) and a.dim == 4  # a quarter of 1000 rows, in whole 32-way sets
    assert b.capacities == (32,)  # a quarter of 40 rows is below one request (8 keys) and one set: one set
    assert a.dump()[0].size == 0  # filled by warm-up or lookups, not here


def test_tables_of_one_dim_share_one_cache_each_with_its_own_capacity(levels) -> None:
    model = dataclasses.replace(MODEL, tables=(*MODEL.tables, TableConfig(name="c", dim=4)))
    levels[1].create_table("m.c", 4)
    caches = build_caches(model, levels)
    assert caches["a"].caches is caches["c"].caches and caches["b"].caches is not caches["a"].caches
    assert (caches["a"].index, caches["c"].index, caches["b"].index) == (0, 1, 0)
    (shared,) = caches["a"].caches
    assert shared.capacities == (224, 32)  # c is empty: one request's keys, one set


def test_static_mode_holds_every_row(levels) -> None:
    caches = build_caches(dataclasses.replace(MODEL, use_static_table=True), levels)
    table = caches["b"].caches[0]
    assert table.capacity == 40
    vectors, hit = table.query(np.array([0, 7, 273, 3], np.int64), np.zeros(4, np.int32))
    assert hit.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(vectors[2], [273, 273, 273])
    if not gpus_available((0, 1)):
        assert isinstance(table, ReferenceStaticTable)


def test_float16_storage_is_passed_on(levels) -> None:
    caches = build_caches(dataclasses.replace(MODEL, gpucache_dtype="float16"), levels)
    cache = caches["a"].caches[0]
    assert getattr(cache, "dtype", None) == np.float16
