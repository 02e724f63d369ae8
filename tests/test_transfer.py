"""Import and export between table files and a real RocksDB level (SST ingest), byte-identical round trips.

Uses a RocksDB in a temporary folder; the files are the HPS and .npy formats of tables.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hps_server.storage.rocksdb import RocksDBLevel
from hps_server.tables import TableFileError, read_table, write_table
from hps_server.transfer import export_table, import_table

TABLE = "model.table"


@pytest.fixture
def level(tmp_path: Path) -> RocksDBLevel:
    return RocksDBLevel(tmp_path / "db")


def source(path: Path, rows: int, dim: int, table_format: str = "hps") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(rows)
    keys = rng.choice(np.arange(-5000, 5000), size=rows, replace=False).astype(np.int64)
    vectors = rng.random((rows, dim), dtype=np.float32)
    write_table(path, [(keys, vectors)], dim, table_format)  # type: ignore[arg-type]
    return keys, vectors


@pytest.mark.parametrize("table_format", ["hps", "npy"])
def test_import_loads_every_row_in_chunks(level: RocksDBLevel, tmp_path: Path, table_format: str) -> None:
    keys, vectors = source(tmp_path / "src", 500, 4, table_format)
    assert import_table(level, TABLE, tmp_path / "src", 4, progress=False, chunk_rows=64) == 500
    assert level.size(TABLE) == 500
    got, found = level.fetch(TABLE, keys)
    assert found.all()
    np.testing.assert_array_equal(got, vectors)


def test_an_empty_folder_does_not_replace_a_table_that_has_rows(level: RocksDBLevel, tmp_path: Path) -> None:
    keys, vectors = source(tmp_path / "src", 200, 4)
    import_table(level, TABLE, tmp_path / "src", 4, progress=False)
    write_table(tmp_path / "empty", [(np.zeros(0, np.int64), np.zeros((0, 4), np.float32))], 4)
    with pytest.raises(TableFileError, match=rf"empty: holds no rows; importing it would empty {TABLE} \(200 rows\)"):
        import_table(level, TABLE, tmp_path / "empty", 4, progress=False)
    got, found = level.fetch(TABLE, keys)
    assert found.all()
    np.testing.assert_array_equal(got, vectors)
    assert import_table(level, "model.fresh", tmp_path / "empty", 4, progress=False) == 0  # nothing to lose


def test_export_then_import_is_byte_identical(level: RocksDBLevel, tmp_path: Path) -> None:
    keys, vectors = source(tmp_path / "src", 300, 3)
    import_table(level, TABLE, tmp_path / "src", 3, progress=False)
    assert export_table(level, TABLE, tmp_path / "out1", progress=False, chunk_rows=70) == 300

    second = RocksDBLevel(tmp_path / "db2")
    import_table(second, TABLE, tmp_path / "out1", 3, progress=False, chunk_rows=50)
    export_table(second, TABLE, tmp_path / "out2", progress=False)
    for name in ("key", "emb_vector"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()

    exported = read_table(tmp_path / "out1", 3)
    order, exported_order = np.argsort(keys), np.argsort(exported.keys)
    np.testing.assert_array_equal(np.asarray(exported.keys)[exported_order], keys[order])
    np.testing.assert_array_equal(np.asarray(exported.vectors)[exported_order], vectors[order])
    second.close()


def test_export_to_npy_reads_back(level: RocksDBLevel, tmp_path: Path) -> None:
    keys, vectors = source(tmp_path / "src", 50, 2)
    import_table(level, TABLE, tmp_path / "src", 2, progress=False)
    export_table(level, TABLE, tmp_path / "out", format="npy", progress=False)
    exported_keys = np.load(tmp_path / "out" / "keys.npy")
    exported_vectors = np.load(tmp_path / "out" / "vectors.npy")
    order = np.argsort(keys)
    np.testing.assert_array_equal(np.sort(exported_keys), keys[order])
    np.testing.assert_array_equal(exported_vectors[np.argsort(exported_keys)], vectors[order])


def test_bad_source_stores_nothing(level: RocksDBLevel, tmp_path: Path) -> None:
    source(tmp_path / "src", 10, 4)
    with pytest.raises(TableFileError, match="emb_vector"):
        import_table(level, TABLE, tmp_path / "src", 5, progress=False)
    assert level.tables() == []
