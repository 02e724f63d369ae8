"""The storage contract every level below the L1 cache implements: batched, array in, array out.

Keys are 1-D int64 arrays, vectors 2-D float32 arrays (rows x dim). Backends know nothing of models,
sessions, gRPC or each other, and never loop over keys in Python.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np

KeyChunk = tuple[np.ndarray, np.ndarray]
"""(keys int64[n], vectors float32[n, dim]): the unit of bulk transfer."""

DEFAULT_CHUNK_ROWS = 65536


class StorageError(RuntimeError):
    """A backend could not complete a call; the message says which table and why."""


class LevelUnavailableError(StorageError):
    """The backend cannot be reached right now; a lookup may fall through to the next level."""


class UnknownTableError(StorageError, KeyError):
    """The table was never created in this backend."""


class StorageLevel(ABC):
    """One level of the hierarchy. Every method takes a table name and a whole batch.

    Implementations are safe to call from several threads at once.
    """

    kind: ClassVar[str]
    """Registry name of the backend, e.g. "hash_map"; also its level name in stats."""

    read_only: bool = False
    shared: ClassVar[bool] = False
    """Whether other hps servers read and write the same rows (Redis): a write one of them made there is
    not made again by the others when they apply it from the update stream."""
    missed_updates: bool = False
    """Set on this server's authoritative level when it fell behind its trimmed update stream: it may hold
    rows older than those other servers wrote, so rows read from it are no longer copied into shared levels
    (where every server would read them)."""

    @abstractmethod
    def create_table(self, table: str, dim: int) -> None:
        """Makes `table` ready for rows of `dim` float32; a no-op when it exists with that dim."""

    @abstractmethod
    def dim(self, table: str) -> int:
        """Elements per vector of `table`; raises UnknownTableError."""

    @abstractmethod
    def tables(self) -> list[str]:
        """Names of the tables this backend holds."""

    @abstractmethod
    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (vectors float32[len(keys), dim], found bool[len(keys)]); rows not found are zero."""

    @abstractmethod
    def insert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Upserts rows; for a key repeated in the batch the last row wins."""

    @abstractmethod
    def evict(self, table: str, keys: np.ndarray) -> int:
        """Removes the keys; returns how many were present."""

    @abstractmethod
    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        """bool[len(keys)]: which keys are present."""

    @abstractmethod
    def size(self, table: str) -> int:
        """Rows held in `table`."""

    @abstractmethod
    def dump(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        """Yields every row of `table` in chunks of at most chunk_rows rows."""

    def fetch_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """keys[i] belongs to tables[table_index[i]]; all those tables have one dim.

        Returns (vectors float32[len(keys), dim], found bool[len(keys)]); rows not found are zero. This
        default asks `fetch` once per distinct table; backends that can do better in one pass override it.
        """
        keys, index, dim = self._table_batch(tables, keys, table_index)
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for position, rows in _rows_by_table(index, len(tables)):
            vectors[rows], found[rows] = self.fetch(tables[position], keys[rows])
        return vectors, found

    def insert_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray
    ) -> None:
        """Upserts rows of several tables of one dim; a (table, key) repeated in the batch: the last row wins.

        This default asks `insert` once per distinct table (each table's rows keep their batch order).
        """
        keys, index, dim = self._table_batch(tables, keys, table_index)
        vectors = as_vectors(vectors, len(keys), dim)
        for position, rows in _rows_by_table(index, len(tables)):
            self.insert(tables[position], keys[rows], vectors[rows])

    def copy_many(self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray) -> None:
        """Copies rows read from a level below (a warm-up, a write-back) into this one: insert_many, except
        that a shared level keeps the rows it holds, which another server may have written since (a copy
        never overwrites a write). This default, for levels no other server writes, is insert_many."""
        self.insert_many(tables, keys, table_index, vectors)

    def _table_batch(
        self, tables: Sequence[str], keys: object, table_index: object
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(keys, table_index as intp, the tables' one dim) of a several-table batch, checked before any work:
        ValueError naming the bad argument, UnknownTableError for a table this level lacks."""
        keys = as_keys(keys)
        index = np.asarray(table_index)
        if index.size and index.dtype.kind not in "iu":
            raise ValueError(f"table_index: must be integers, got dtype {index.dtype}")
        if index.ndim != 1 or len(index) != len(keys):
            raise ValueError(f"table_index: must be 1-D with one entry per key ({len(keys)}), got shape {index.shape}")
        if not len(tables):
            raise ValueError("tables: must name at least one table")
        if len(set(tables)) != len(tables):
            raise ValueError(f"tables: each table may be named once, got {list(tables)}")
        if index.size and (int(index.min()) < 0 or int(index.max()) >= len(tables)):
            raise ValueError(
                f"table_index: values must be in [0, {len(tables)}), got {int(index.min())}..{int(index.max())}"
            )
        dims = {table: self.dim(table) for table in tables}
        if len(set(dims.values())) != 1:
            raise ValueError(f"tables: must share one dim, got dims {dims}")
        return keys, index.astype(np.intp, copy=False), dims[tables[0]]

    def follow_writes(self) -> None:  # noqa: B027 - levels every process writes itself need not override
        """Makes what another process (a group's writer) committed to this level visible here: a
        read-only view of a database catches up. Levels shared live (memory, Redis) need nothing."""

    def serve_as_cache(self) -> None:  # noqa: B027 - levels that never hold stale rows need not override
        """Tells the level that a level below holds every row (it is a cache of it). An insert or evict
        that raised LevelUnavailableError is then acknowledged all the same by the session once the level
        below has it, so the level must not serve those keys again until it has dropped them; nor rows it
        may have lost writes of (a restart). Dropped rows are fetched from below again."""

    def share_staleness(  # noqa: B027 - levels that never hold stale rows need not override
        self, marked: Callable[[], bool] | None, mark: Callable[[bool], None] | None
    ) -> None:
        """In a worker group sharing this level: the writer's level calls `mark` whenever it starts or stops
        holding rows a failed write may have left stale (serve_as_cache); a worker's level refuses to serve
        rows (LevelUnavailableError: reads go below) while `marked()` says so, since the record of which
        keys are stale is the writer's."""

    def load(self, table: str, chunks: Iterable[KeyChunk]) -> int:
        """Bulk-inserts chunks (faster paths may override); returns rows written."""
        rows = 0
        for keys, vectors in chunks:
            self.insert(table, keys, vectors)
            rows += len(keys)
        return rows

    def occupancy(self, table: str) -> tuple[int, int | None]:
        """(rows held, bytes taken) of `table`, bytes an estimate where the level can only estimate and None
        where it cannot tell; cheap enough for every metrics scrape, and never called on a request's path."""
        return self.size(table), None

    @property
    def write_failure(self) -> str | None:
        """Why the level's writes fail now (no server path in it), None while they work: a level that can
        tell (RocksDB after a failed write, until it recovered) overrides this."""
        return None

    def drop_table(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        """Removes every row of `table` (a table version no longer served), chunk_rows at a time; levels that
        can free the table itself override this. A table the level lacks is a no-op."""
        if table not in self.tables():
            return
        # Every key first (8 bytes a row), so no eviction runs under a dump in progress.
        keys = np.concatenate([np.zeros(0, np.int64), *(chunk for chunk, _ in self.dump(table, chunk_rows))])
        for start in range(0, len(keys), chunk_rows):
            self.evict(table, keys[start : start + chunk_rows])

    @property
    def writes_failing(self) -> bool:
        """Whether write_failure is set; exported as hps_level_writes_failing."""
        return self.write_failure is not None

    def retry_writes(self) -> None:  # noqa: B027 - levels that cannot tell that writes fail need not override
        """While writes fail: checks whether the fault is gone and writes work again (without a write
        asking), so the state clients see recovers on its own. The server calls it about once a second."""

    def close(self) -> None:  # noqa: B027 - levels without resources need not override
        """Releases connections and files; the level is unusable afterwards."""


def _rows_by_table(table_index: np.ndarray, num_tables: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position in `tables`, batch rows of that table in batch order) for each table present, from one
    stable argsort."""
    order = np.argsort(table_index, kind="stable")
    bounds = np.searchsorted(table_index[order], np.arange(num_tables + 1))
    for position in np.flatnonzero(np.diff(bounds)):
        yield int(position), order[bounds[position] : bounds[position + 1]]


def as_keys(keys: object) -> np.ndarray:
    """Keys as a contiguous 1-D little-endian int64 array (no copy when already so), or ValueError."""
    array = np.asarray(keys)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"keys: must be integers, got dtype {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) >= 2**63:
        raise ValueError("keys: uint64 values above 2**63 - 1 do not fit int64")
    if array.ndim != 1:
        raise ValueError(f"keys: must be 1-D, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype="<i8")


def as_vectors(vectors: object, rows: int, dim: int) -> np.ndarray:
    """Vectors as a contiguous float32 [rows, dim] array, or ValueError naming the mismatch."""
    array = np.asarray(vectors)
    if array.size and array.dtype.kind not in "fiu":
        raise ValueError(f"vectors: must be numbers, got dtype {array.dtype}")
    if array.shape != (rows, dim):
        raise ValueError(f"vectors: expected shape ({rows}, {dim}), got {array.shape}")
    return np.ascontiguousarray(array, dtype="<f4")
