"""Embedding-table files on disk: read (memory-mapped, validated, in chunks) and write, in two formats.

Formats: "hps", HugeCTR HPS's folder with `key` (little-endian int64) and `emb_vector` (float32, same row
order, no header); "npy", a folder with keys.npy (int64[rows]) and vectors.npy (float32[rows, dim]).
Knows nothing of storage levels; errors name the file at fault and never modify it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from hps_server.storage.base import DEFAULT_CHUNK_ROWS, KeyChunk

TableFormat = Literal["hps", "npy"]

HPS_KEY_FILE = "key"
HPS_VECTOR_FILE = "emb_vector"
NPY_KEY_FILE = "keys.npy"
NPY_VECTOR_FILE = "vectors.npy"
FILES: dict[TableFormat, tuple[str, str]] = {
    "hps": (HPS_KEY_FILE, HPS_VECTOR_FILE),
    "npy": (NPY_KEY_FILE, NPY_VECTOR_FILE),
}
_FILES = frozenset(name for pair in FILES.values() for name in pair)  # every table file's name

# A fixed-size .npy header, so write_table can stream rows first and state the final shape after.
_NPY_HEADER_BYTES = 128


class TableFileError(ValueError):
    """A table file is missing or malformed: `where` (the folder, or a file of it) and what is wrong."""

    def __init__(self, where: Path, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = Path(where)
        self.what = what

    def without_path(self) -> str:
        """The message with the folder's name (and the file's, for a file of it) in place of its path (for
        clients and logs of a server)."""
        where = self.where
        shown = f"{where.parent.name}/{where.name}" if where.name in _FILES else where.name
        return f"{shown}: {self.what}"

    def of_table(self, table: str) -> TableFileError:
        """The same error, saying which table's files they are."""
        return TableFileError(self.where, f"{self.what} (table {table})")


@dataclass(frozen=True)
class TableFiles:
    """A validated table on disk: keys and vectors memory-mapped, read in chunks."""

    path: Path
    format: TableFormat
    keys: np.ndarray
    """int64[rows], memory-mapped."""
    vectors: np.ndarray
    """float32[rows, dim], memory-mapped."""

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        """(keys, vectors) copies of at most chunk_rows rows each, in file order."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be at least 1, got {chunk_rows}")
        for start in range(0, self.rows, chunk_rows):
            stop = start + chunk_rows
            yield (
                np.array(self.keys[start:stop], dtype=np.int64),
                np.array(self.vectors[start:stop], dtype=np.float32),
            )


def detect_format(path: Path) -> TableFormat:
    """Which format the folder holds, or TableFileError naming the files that are missing."""
    if not path.is_dir():
        raise TableFileError(path, "not a folder" if path.exists() else "table folder does not exist")
    for table_format, names in FILES.items():
        present = [(path / name).is_file() for name in names]
        if all(present):
            return table_format
        if any(present):
            missing = next(name for name, there in zip(names, present, strict=True) if not there)
            raise TableFileError(path / missing, f"missing ({table_format} format needs {' and '.join(names)})")
    hps, npy = (" and ".join(names) for names in FILES.values())
    raise TableFileError(path, f"no table files; expected {hps} (HPS format) or {npy}")


def read_table(path: str | Path, dim: int | None = None) -> TableFiles:
    """Opens and validates the table folder at `path`; `dim` None means take it from the files.

    Checks sizes, dtypes and shapes, the dim against `dim`, and that no key repeats (sorting a copy of
    the keys: 8 bytes of memory per row; the vectors stay on disk).
    """
    path = Path(path)
    if dim is not None and dim < 1:
        raise ValueError(f"dim: must be at least 1, got {dim}")
    try:
        table_format = detect_format(path)
        if table_format == "hps":
            keys, vectors = _read_hps(path, dim)
        else:
            keys, vectors = _read_npy(path, dim)
        _check_unique(path / FILES[table_format][0], keys)
    except OSError as e:  # not readable by this user, a name too long, ...: the error, without its path
        raise TableFileError(Path(e.filename or path), f"cannot be read: {e.strerror or type(e).__name__}") from None
    return TableFiles(path, table_format, keys, vectors)


def _map(file: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if 0 in shape:  # mmap cannot map an empty file
        return np.empty(shape, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


def _read_hps(path: Path, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    key_file, vector_file = path / HPS_KEY_FILE, path / HPS_VECTOR_FILE
    key_bytes, vector_bytes = key_file.stat().st_size, vector_file.stat().st_size
    if key_bytes % 8:
        raise TableFileError(key_file, f"{key_bytes} bytes is not a multiple of 8 (little-endian int64 keys)")
    rows = key_bytes // 8
    fitting = vector_bytes // (rows * 4) if rows and vector_bytes % (rows * 4) == 0 else None
    if dim is None:
        if rows == 0:
            raise TableFileError(key_file, "no rows, so the dim cannot be taken from the files; give it")
        if not fitting:
            raise TableFileError(
                vector_file,
                f"{vector_bytes} bytes is not {rows} rows (from {HPS_KEY_FILE}) x dim x 4 bytes for any dim",
            )
        dim = fitting
    elif vector_bytes != rows * dim * 4:
        fits = f"dim {fitting} would fit" if fitting else "no dim fits"
        raise TableFileError(
            vector_file,
            f"{vector_bytes} bytes, expected {rows} rows (from {HPS_KEY_FILE}) x dim {dim} x 4 "
            f"= {rows * dim * 4}; {fits}",
        )
    return _map(key_file, "<i8", (rows,)), _map(vector_file, "<f4", (rows, dim))


def _load_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise TableFileError(file, f"not a readable .npy array ({exc})") from exc


def _read_npy(path: Path, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    key_file, vector_file = path / NPY_KEY_FILE, path / NPY_VECTOR_FILE
    keys, vectors = _load_npy(key_file), _load_npy(vector_file)
    if keys.dtype.kind != "i" or keys.dtype.itemsize != 8 or keys.ndim != 1:
        raise TableFileError(key_file, f"expected a 1-D int64 array, got {keys.dtype} of shape {keys.shape}")
    if vectors.dtype.kind != "f" or vectors.dtype.itemsize != 4 or vectors.ndim != 2:
        raise TableFileError(vector_file, f"expected a 2-D float32 array, got {vectors.dtype} of shape {vectors.shape}")
    if len(vectors) != len(keys):
        raise TableFileError(vector_file, f"{len(vectors)} rows, but {NPY_KEY_FILE} has {len(keys)}")
    if dim is not None and vectors.shape[1] != dim:
        raise TableFileError(vector_file, f"dim {vectors.shape[1]}, but the table's dim is {dim}")
    return keys, vectors


def _check_unique(key_file: Path, keys: np.ndarray) -> None:
    ordered = np.sort(keys)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        raise TableFileError(
            key_file,
            f"{len(repeated)} duplicate key rows ({len(np.unique(repeated))} distinct keys repeat), "
            f"e.g. key {int(repeated[0])}",
        )


def write_table(path: str | Path, chunks: Iterable[KeyChunk], dim: int, format: TableFormat = "hps") -> int:
    """Streams (keys, vectors) chunks into a new table folder at `path`; returns rows written.

    Refuses to overwrite existing table files. Rows keep the chunks' order.
    """
    path = Path(path)
    if format not in FILES:
        raise ValueError(f"format: must be one of {sorted(FILES)}, got {format!r}")
    if dim < 1:
        raise ValueError(f"dim: must be at least 1, got {dim}")
    files = [path / name for name in FILES[format]]
    path.mkdir(parents=True, exist_ok=True)
    for file in files:
        if file.exists():
            raise FileExistsError(f"{file}: exists; not overwriting a table")
    rows = 0
    with files[0].open("xb") as key_out, files[1].open("xb") as vector_out:
        if format == "npy":
            key_out.write(_npy_header("<i8", (0,)))
            vector_out.write(_npy_header("<f4", (0, dim)))
        for keys, vectors in chunks:
            keys = np.ascontiguousarray(keys, dtype="<i8")
            vectors = np.ascontiguousarray(vectors, dtype="<f4")
            if keys.ndim != 1 or vectors.shape != (len(keys), dim):
                raise ValueError(f"vectors: expected shape ({len(keys)}, {dim}), got {vectors.shape}")
            key_out.write(keys.tobytes())
            vector_out.write(vectors.tobytes())
            rows += len(keys)
        if format == "npy":
            key_out.seek(0)
            key_out.write(_npy_header("<i8", (rows,)))
            vector_out.seek(0)
            vector_out.write(_npy_header("<f4", (rows, dim)))
    return rows


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to a fixed size, whatever the shape's digits."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape})
    prefix = b"\x93NUMPY\x01\x00"
    body_bytes = _NPY_HEADER_BYTES - len(prefix) - 2
    return prefix + struct.pack("<H", body_bytes) + text.ljust(body_bytes - 1).encode("latin1") + b"\n"
