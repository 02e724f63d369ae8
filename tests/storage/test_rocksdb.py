"""RocksDBLevel against a real RocksDB in a temporary folder: persistence, read-only replicas, SST ingest.

The behaviour every level shares is in the contract suite; this file covers what only RocksDB does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hps_server.config import PersistentDbConfig
from hps_server.storage import open_persistent
from hps_server.storage import rocksdb as rocksdb_module
from hps_server.storage.base import StorageError, UnknownTableError
from hps_server.storage.rocksdb import RocksDBLevel

TABLE = "model.table"


def rows(keys: list[int] | np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, dtype=np.int64)
    return keys, np.random.default_rng(seed).random((len(keys), dim), dtype=np.float32)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "rocksdb"


def test_from_config_opens_the_configured_folder(db_path: Path) -> None:
    level = open_persistent(PersistentDbConfig(path=db_path, max_batch_size=7))
    assert isinstance(level, RocksDBLevel)
    assert level.max_batch_size == 7
    level.close()
    assert (db_path / "CURRENT").exists()


def test_reopen_keeps_rows_dims_and_sizes(db_path: Path) -> None:
    keys, vectors = rows([1, -5, 2**40], dim=4)
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 4)
    level.create_table("model.other", 9)
    level.insert(TABLE, keys, vectors)
    level.close()

    reopened = RocksDBLevel(db_path)
    assert reopened.tables() == ["model.other", TABLE]
    assert reopened.dim(TABLE) == 4
    assert reopened.dim("model.other") == 9
    assert reopened.size(TABLE) == 3
    assert reopened.size("model.other") == 0
    got, found = reopened.fetch(TABLE, keys)
    assert found.all()
    np.testing.assert_array_equal(got, vectors)
    reopened.close()


def test_create_table_with_another_dim_is_refused(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 4)
    level.create_table(TABLE, 4)
    with pytest.raises(StorageError, match="dim 4"):
        level.create_table(TABLE, 8)
    with pytest.raises(ValueError, match="table: 'default' is reserved"):
        level.create_table("default", 4)
    level.close()


def test_read_only_replica_sees_data_and_rejects_writes(db_path: Path) -> None:
    keys, vectors = rows([3, 4, 5], dim=2)
    writer = RocksDBLevel(db_path)
    writer.create_table(TABLE, 2)
    writer.insert(TABLE, keys, vectors)
    writer.close()

    replica = RocksDBLevel(db_path, read_only=True)
    got, found = replica.fetch(TABLE, np.array([5, 6, 3]))
    np.testing.assert_array_equal(found, [True, False, True])
    np.testing.assert_array_equal(got[[0, 2]], vectors[[2, 0]])
    assert replica.size(TABLE) == 3
    for write in (
        lambda: replica.insert(TABLE, keys, vectors),
        lambda: replica.evict(TABLE, keys),
        lambda: replica.load(TABLE, [(keys, vectors)]),
        lambda: replica.create_table("model.new", 2),
    ):
        with pytest.raises(StorageError, match="read-only"):
            write()
    got_again, _ = replica.fetch(TABLE, keys)
    np.testing.assert_array_equal(got_again, vectors)
    replica.close()


def test_read_only_replica_beside_an_open_writer_sees_rows_as_of_opening(db_path: Path) -> None:
    writer = RocksDBLevel(db_path)
    writer.create_table(TABLE, 2)
    writer.insert(TABLE, *rows([1, 2], dim=2))
    replica = RocksDBLevel(db_path, read_only=True)
    writer.insert(TABLE, *rows([3], dim=2))
    assert replica.contains(TABLE, np.array([1, 2, 3])).tolist() == [True, True, False]
    replica.close()
    writer.close()


def test_concurrent_fetches_agree(db_path: Path) -> None:
    level = RocksDBLevel(db_path, max_batch_size=100)
    level.create_table(TABLE, 8)
    keys, vectors = rows(np.arange(2000), dim=8)
    level.insert(TABLE, keys, vectors)
    queries = [np.random.default_rng(seed).integers(0, 2500, 3000) for seed in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda query: level.fetch(TABLE, query), queries))
    for query, (got, found) in zip(queries, results, strict=True):
        np.testing.assert_array_equal(found, query < 2000)
        np.testing.assert_array_equal(got[found], vectors[query[found]])
    level.close()


def test_read_only_without_a_database_says_so(db_path: Path) -> None:
    with pytest.raises(StorageError, match="no database"):
        RocksDBLevel(db_path, read_only=True)


def test_sst_load_with_unsorted_negative_and_repeated_keys(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 3)
    # Negative keys sort after positive ones bytewise; 256 and 1 differ only in their second byte.
    keys, vectors = rows([256, -1, 7, 1, -(2**63), 2**63 - 1, 7], dim=3, seed=1)
    more_keys, more_vectors = rows([1, 99], dim=3, seed=2)
    written = level.load(TABLE, [(keys, vectors), (more_keys, more_vectors)])
    assert written == 9
    assert level.size(TABLE) == 7  # distinct keys: 256, -1, 7, 1, min, max, 99
    got, found = level.fetch(TABLE, np.array([256, -1, 7, 1, -(2**63), 2**63 - 1, 99, 5]))
    np.testing.assert_array_equal(found, [True] * 7 + [False])
    expected = np.stack([vectors[0], vectors[1], vectors[6], more_vectors[0], vectors[4], vectors[5], more_vectors[1]])
    np.testing.assert_array_equal(got[:7], expected)  # a repeated key keeps its last row
    np.testing.assert_array_equal(got[7], np.zeros(3, np.float32))
    assert not list(db_path.parent.glob(".rocksdb-ingest-*")), "SST staging folder left behind"
    level.close()


def test_a_load_into_a_table_with_rows_replaces_them_and_upserts_still_work(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 2)
    level.insert(TABLE, *rows([1, 2, 3], dim=2))
    new_keys, new_vectors = rows([3, 4, 5, 5], dim=2, seed=3)
    assert level.load(TABLE, [(new_keys[:2], new_vectors[:2]), (new_keys[2:], new_vectors[2:])]) == 4
    assert level.size(TABLE) == 3  # the new version's rows, exactly: 3, 4 and 5
    got, found = level.fetch(TABLE, np.array([1, 3, 5]))
    np.testing.assert_array_equal(found, [False, True, True])
    np.testing.assert_array_equal(got[1:], new_vectors[[0, 3]])
    level.insert(TABLE, *rows([9], dim=2))  # writes go to the table's new column family
    level.evict(TABLE, np.array([4]))
    level.close()
    reopened = RocksDBLevel(db_path)
    assert reopened.size(TABLE) == 3
    np.testing.assert_array_equal(reopened.contains(TABLE, np.array([1, 3, 4, 5, 9])), [False, True, False, True, True])
    assert reopened.load(TABLE, [rows([7], dim=2)]) == 1  # and once more: a second replacement
    assert reopened.size(TABLE) == 1 and reopened.contains(TABLE, np.array([7, 9])).tolist() == [True, False]
    reopened.close()
    assert RocksDBLevel(db_path).size(TABLE) == 1


def test_a_re_import_stopped_part_way_leaves_the_old_rows_served(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table("m.t", 4)
    old_keys, old_vectors = rows(range(1000), 4)
    level.load("m.t", [(old_keys, old_vectors)])

    def dies_after_one_chunk():  # type: ignore[no-untyped-def]
        yield rows(range(500, 1500), 4, seed=9)
        raise KeyboardInterrupt  # the importing process is stopped part-way

    with pytest.raises(KeyboardInterrupt):
        level.load("m.t", dies_after_one_chunk())
    probe = np.arange(0, 1500, 7)
    got, found = level.fetch("m.t", probe)
    np.testing.assert_array_equal(found, probe < 1000)  # no row of the stopped version is served
    np.testing.assert_array_equal(got[found], old_vectors[probe[found]])
    assert level.size("m.t") == 1000
    level.close()
    reopened = RocksDBLevel(db_path)
    got, found = reopened.fetch("m.t", probe)
    np.testing.assert_array_equal(got[found], old_vectors[probe[found]])
    assert reopened.size("m.t") == 1000 and found.sum() == (probe < 1000).sum()
    reopened.close()


def test_load_rejects_a_bad_chunk_naming_the_field(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 2)
    good = rows([1, 2], dim=2)
    with pytest.raises(ValueError, match="vectors"):
        level.load(TABLE, [good, (np.array([3]), np.zeros((1, 5), np.float32))])
    assert level.size(TABLE) == 2
    assert level.contains(TABLE, np.array([1, 2, 3])).tolist() == [True, True, False]
    level.close()


def test_evict_counts_present_keys_and_keeps_size_exact(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 2)
    level.insert(TABLE, *rows([1, 2, 3, 4], dim=2))
    level.insert(TABLE, *rows([4, 4, 5], dim=2, seed=1))  # one new key, repeated in the batch
    assert level.size(TABLE) == 5
    assert level.evict(TABLE, np.array([2, 2, 9, 5])) == 2
    assert level.size(TABLE) == 3
    assert level.contains(TABLE, np.array([1, 2, 3, 4, 5])).tolist() == [True, False, True, True, False]
    assert level.evict(TABLE, np.array([], dtype=np.int64)) == 0
    level.close()
    assert RocksDBLevel(db_path).size(TABLE) == 3


def test_fetch_above_max_batch_size_is_chunked(db_path: Path) -> None:
    level = RocksDBLevel(db_path, max_batch_size=16)
    level.create_table(TABLE, 5)
    keys, vectors = rows(np.arange(0, 200, 2), dim=5)
    level.insert(TABLE, keys, vectors)
    query = np.arange(-3, 201)  # 204 keys: 13 multi_gets, half of them missing
    got, found = level.fetch(TABLE, query)
    present = (query >= 0) & (query % 2 == 0) & (query < 200)
    np.testing.assert_array_equal(found, present)
    np.testing.assert_array_equal(got[present], vectors[query[present] // 2])
    assert not got[~present].any()
    level.close()


def test_dump_yields_every_row_in_chunks(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 3)
    keys, vectors = rows(np.arange(-10, 15), dim=3)
    level.insert(TABLE, keys, vectors)
    chunks = list(level.dump(TABLE, chunk_rows=4))
    assert [len(k) for k, _ in chunks] == [4] * 6 + [1]
    dumped_keys = np.concatenate([k for k, _ in chunks])
    dumped_vectors = np.concatenate([v for _, v in chunks])
    order = np.argsort(dumped_keys)
    np.testing.assert_array_equal(dumped_keys[order], keys)
    np.testing.assert_array_equal(dumped_vectors[order], vectors)
    level.close()


def test_unknown_table_and_bad_shapes(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table(TABLE, 2)
    with pytest.raises(UnknownTableError):
        level.fetch("model.missing", np.array([1]))
    with pytest.raises(UnknownTableError):
        level.size("model.missing")
    with pytest.raises(ValueError, match="keys"):
        level.fetch(TABLE, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="vectors"):
        level.insert(TABLE, np.array([1, 2]), np.zeros((2, 3), np.float32))
    assert level.size(TABLE) == 0
    level.close()


def test_a_load_that_never_finished_is_undone_at_the_next_open(db_path: Path) -> None:
    level = RocksDBLevel(db_path)
    level.create_table("m.t", 4)

    def dies_after_one_chunk():  # type: ignore[no-untyped-def]
        yield rows(range(100), 4)
        raise KeyboardInterrupt  # the loading process is stopped part-way

    with pytest.raises(KeyboardInterrupt):
        level.load("m.t", dies_after_one_chunk())
    assert level.size("m.t") == 100  # the first chunk went in
    level.close()

    reopened = RocksDBLevel(db_path)
    assert "m.t" not in reopened.tables()  # dropped, as if never created: a server ingests it afresh
    reopened.create_table("m.t", 4)
    assert reopened.size("m.t") == 0
    assert not reopened.contains("m.t", np.arange(100)).any()
    assert reopened.load("m.t", [rows(range(300), 4)]) == 300  # a fresh import completes...
    reopened.close()
    again = RocksDBLevel(db_path)
    assert again.size("m.t") == 300  # ...and is kept at the next open
    again.close()


def test_a_database_in_a_folder_that_takes_no_file_opens_read_only_through_a_view(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RocksDBLevel(db_path)
    writer.create_table("m.t", 4)
    writer.insert("m.t", *rows(range(50), 4))
    writer.close()
    before = {entry.name: entry.stat().st_mtime_ns for entry in db_path.iterdir()}
    # As on a read-only mount (a ReadOnlyMany volume): rocksdict and RocksDB write nothing into the folder.
    monkeypatch.setattr(rocksdb_module, "_writable", lambda folder: False)
    reader = RocksDBLevel(db_path, read_only=True)
    try:
        vectors, found = reader.fetch("m.t", np.arange(60))
        assert found[:50].all() and not found[50:].any()
        np.testing.assert_array_equal(vectors[:50], rows(range(50), 4)[1])
        reader.follow_writes()
        assert reader.size("m.t") == 50
    finally:
        reader.close()
    assert {entry.name: entry.stat().st_mtime_ns for entry in db_path.iterdir()} == before
