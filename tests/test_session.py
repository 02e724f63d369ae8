"""LookupSession over real levels (in-process hash map over RocksDB): fallthrough, write-back, defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hps_server.storage.hashmap import HashMapLevel
from hps_server.storage.rocksdb import RocksDBLevel

from hps_server.config import ModelConfig, PersistentDbConfig, TableConfig, VolatileDbConfig
from hps_server.session import LookupSession

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
