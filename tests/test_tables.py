"""Table files: HPS and .npy round trips, memory-mapped chunked reads, and every malformed-file error.

Files are written by hand where the point is a malformed one, so the checks do not depend on write_table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hps_server.tables import TableFileError, read_table, write_table


def table(rows: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.choice(2**41, size=rows, replace=False).astype(np.int64) - 2**40
    return keys, rng.random((rows, dim), dtype=np.float32)


def write_hps(path: Path, key_bytes: bytes, vector_bytes: bytes) -> Path:
    path.mkdir()
    (path / "key").write_bytes(key_bytes)
    (path / "emb_vector").write_bytes(vector_bytes)
    return path


@pytest.mark.parametrize("table_format", ["hps", "npy"])
def test_round_trip_in_chunks(tmp_path: Path, table_format: str) -> None:
    keys, vectors = table(100, 6)
    chunks = [(keys[i : i + 30], vectors[i : i + 30]) for i in range(0, 100, 30)]
    assert write_table(tmp_path / "t", chunks, 6, table_format) == 100  # type: ignore[arg-type]
    files = read_table(tmp_path / "t", 6)
    assert (files.format, files.rows, files.dim) == (table_format, 100, 6)
    assert isinstance(files.keys, np.memmap) and isinstance(files.vectors, np.memmap)
    read = list(files.chunks(40))
    assert [len(k) for k, _ in read] == [40, 40, 20]
    np.testing.assert_array_equal(np.concatenate([k for k, _ in read]), keys)
    np.testing.assert_array_equal(np.concatenate([v for _, v in read]), vectors)


def test_hps_files_are_raw_little_endian(tmp_path: Path) -> None:
    keys, vectors = table(3, 2)
    write_table(tmp_path / "t", [(keys, vectors)], 2)
    assert (tmp_path / "t" / "key").read_bytes() == keys.astype("<i8").tobytes()
    assert (tmp_path / "t" / "emb_vector").read_bytes() == vectors.astype("<f4").tobytes()


def test_npy_files_load_with_numpy(tmp_path: Path) -> None:
    keys, vectors = table(1234, 3)
    write_table(tmp_path / "t", [(keys[:1000], vectors[:1000]), (keys[1000:], vectors[1000:])], 3, "npy")
    np.testing.assert_array_equal(np.load(tmp_path / "t" / "keys.npy"), keys)
    np.testing.assert_array_equal(np.load(tmp_path / "t" / "vectors.npy"), vectors)


def test_dim_is_taken_from_hps_files_when_not_given(tmp_path: Path) -> None:
    keys, vectors = table(10, 7)
    path = write_hps(tmp_path / "t", keys.tobytes(), vectors.tobytes())
    assert read_table(path).dim == 7


def test_empty_table_round_trips(tmp_path: Path) -> None:
    write_table(tmp_path / "t", [], 4)
    files = read_table(tmp_path / "t", 4)
    assert files.rows == 0 and files.dim == 4
    assert list(files.chunks()) == []


def test_key_file_not_a_multiple_of_8(tmp_path: Path) -> None:
    path = write_hps(tmp_path / "t", b"\0" * 12, b"\0" * 8)
    with pytest.raises(TableFileError, match=r"key: 12 bytes is not a multiple of 8"):
        read_table(path, 1)


def test_emb_vector_size_mismatch_says_which_dim_fits(tmp_path: Path) -> None:
    keys, vectors = table(4, 3)
    path = write_hps(tmp_path / "t", keys.tobytes(), vectors.tobytes())
    with pytest.raises(TableFileError, match=r"emb_vector: 48 bytes, expected 4 rows .* dim 5 .*; dim 3 would fit"):
        read_table(path, 5)


def test_emb_vector_size_no_dim_fits(tmp_path: Path) -> None:
    keys, _ = table(4, 3)
    path = write_hps(tmp_path / "t", keys.tobytes(), b"\0" * 20)
    with pytest.raises(TableFileError, match=r"emb_vector: 20 bytes.*no dim fits"):
        read_table(path, 3)
    with pytest.raises(TableFileError, match=r"emb_vector: 20 bytes.*for any dim"):
        read_table(path)


def test_npy_dim_mismatch_with_config(tmp_path: Path) -> None:
    keys, vectors = table(5, 3)
    write_table(tmp_path / "t", [(keys, vectors)], 3, "npy")
    with pytest.raises(TableFileError, match=r"vectors.npy: dim 3, but the table's dim is 4"):
        read_table(tmp_path / "t", 4)


def test_npy_wrong_dtype_and_row_count(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.mkdir()
    np.save(path / "keys.npy", np.arange(3, dtype=np.int32))
    np.save(path / "vectors.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(TableFileError, match=r"keys\.npy: expected a 1-D int64 array, got int32"):
        read_table(path)
    np.save(path / "keys.npy", np.arange(4, dtype=np.int64))
    with pytest.raises(TableFileError, match=r"vectors\.npy: 3 rows, but keys\.npy has 4"):
        read_table(path)


@pytest.mark.parametrize("table_format", ["hps", "npy"])
def test_duplicate_keys_are_counted_with_an_example(tmp_path: Path, table_format: str) -> None:
    keys = np.array([5, 9, -1, 9, 9, 5, 3], dtype=np.int64)
    write_table(tmp_path / "t", [(keys, np.zeros((7, 2), np.float32))], 2, table_format)  # type: ignore[arg-type]
    key_file = "key" if table_format == "hps" else "keys.npy"
    with pytest.raises(
        TableFileError, match=rf"{key_file}: 3 duplicate key rows \(2 distinct keys repeat\), e.g. key 5"
    ):
        read_table(tmp_path / "t", 2)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TableFileError, match="table folder does not exist"):
        read_table(tmp_path / "nowhere", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TableFileError, match="no table files; expected key and emb_vector"):
        read_table(tmp_path / "empty", 2)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "key").write_bytes(b"\0" * 8)
    with pytest.raises(TableFileError, match="emb_vector: missing"):
        read_table(tmp_path / "half", 2)
    (tmp_path / "half_npy").mkdir()
    np.save(tmp_path / "half_npy" / "vectors.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(TableFileError, match=r"keys\.npy: missing"):
        read_table(tmp_path / "half_npy", 2)


def test_write_refuses_to_overwrite_and_checks_shapes(tmp_path: Path) -> None:
    keys, vectors = table(3, 2)
    write_table(tmp_path / "t", [(keys, vectors)], 2)
    before = (tmp_path / "t" / "key").read_bytes()
    with pytest.raises(FileExistsError, match="key: exists"):
        write_table(tmp_path / "t", [(keys[:1], vectors[:1])], 2)
    assert (tmp_path / "t" / "key").read_bytes() == before
    with pytest.raises(ValueError, match="vectors: expected shape"):
        write_table(tmp_path / "u", [(keys, vectors)], 3)
    with pytest.raises(ValueError, match="format"):
        write_table(tmp_path / "v", [(keys, vectors)], 2, "csv")  # type: ignore[arg-type]
