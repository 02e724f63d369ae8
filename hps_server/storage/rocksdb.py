"""L3 persistent level: local RocksDB through rocksdict, one column family per "<model>.<table>".

Keys are 8-byte little-endian int64, values raw float32 vector bytes. Must not know of models,
sessions or other levels; must not loop over keys in Python beyond the one call per key rocksdict needs.

Layout: the default column family holds metadata only, `dim/<table>` and `rows/<table>` (8-byte
little-endian int64 each). `size` is exact: every write counts the keys it adds or removes (a presence
multi_get before the write) and stores the new count in the same WriteBatch, so a reopened database
knows both the dims and the row counts without scanning. A bulk load into an empty table also
marks `loading/<table>` until its last chunk is in; a database opened with that mark still set
(the loading process died) gets the table emptied, so its next import starts afresh.

A bulk load into a table that has rows replaces them, atomically: the new rows go into a column family
of their own (`<table>#<n>`), and one WriteBatch points `cf/<table>` at it and stores its row count once
the last chunk is in; the old family is dropped after. A load stopped part-way leaves the old rows
served; the half-built family is dropped at the next read-write open.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import rocksdict

from hps_server.config import PersistentDbConfig
from hps_server.log_limits import RateLimitedWarning
from hps_server.storage.base import (
    DEFAULT_CHUNK_ROWS,
    KeyChunk,
    LevelUnavailableError,
    StorageError,
    StorageLevel,
    UnknownTableError,
    as_keys,
    as_vectors,
)

log = logging.getLogger(__name__)

_META_CF = "default"
# Stands for the server's RocksDB folder in every message and log line.
FOLDER_IN_MESSAGES = "<rocksdb folder>"
WARN_INTERVAL_SECONDS = 30
# After a failed write, the next write reopens the database to see whether the fault is gone, at most this often.
RECOVER_SECONDS = 1.0
# Written (to the metadata family) to check that writes reach the disk again after a failure.
_PROBE_KEY = b"probe/writable"
# A column family's bytes, as hps_level_bytes reports them: live data in SST files and the memtables.
_SIZE_PROPERTIES = ("rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables")


def _takes_files(folder: Path) -> bool:
    """Whether a file can be created in (and removed from) the folder now."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hps-probe-"):
            return True
    except OSError:
        return False


def _writable(folder: Path) -> bool:
    """Whether files can be made in `folder` (not a read-only mount, and this user may write it)."""
    return not os.statvfs(folder).f_flag & os.ST_RDONLY and os.access(folder, os.W_OK)


def _view(folder: Path, view: Path) -> Path:
    """A folder of links to the database files in `folder`, for opening it read-only where `folder` takes no
    file: rocksdict writes its config file at every open, and RocksDB its LOG (both made anew in the view).
    It holds the files there now: a database that takes no file has no writer adding any."""
    view.mkdir()
    for entry in folder.iterdir():
        if entry.name not in ("rocksdict-config.json", "LOCK") and not entry.name.startswith("LOG"):
            (view / entry.name).symlink_to(entry.absolute())
    return view


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder, None when it is gone."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _options(num_threads: int) -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.increase_parallelism(num_threads)
    return options


def _key_bytes(keys: np.ndarray) -> list[bytes]:
    """One 8-byte little-endian `bytes` per key, built in one NumPy call (V8 keeps trailing zeros)."""
    return keys.astype("<i8").view("V8").tolist()  # type: ignore[no-any-return]


def _row_bytes(vectors: np.ndarray) -> list[bytes]:
    """One `bytes` per row of raw float32 values."""
    return vectors.view(f"V{vectors.shape[1] * 4}").ravel().tolist()  # type: ignore[no-any-return]


def _bytewise_order(keys: np.ndarray) -> np.ndarray:
    """Keys' little-endian bytes read as big-endian uint64: sorting these sorts the byte strings."""
    return keys.astype("<i8").view(">u8")


def _last_of_each(keys: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of every distinct key, ordered bytewise by key."""
    reversed_order = _bytewise_order(keys)[::-1]
    _, first_in_reversed = np.unique(reversed_order, return_index=True)
    return len(keys) - 1 - first_in_reversed


def _distinct(sorted_runs: list[np.ndarray]) -> int:
    """Distinct keys over chunks each already in bytewise order (a stable sort merges such runs fast)."""
    ordered = np.sort(np.concatenate([_bytewise_order(run) for run in sorted_runs]), kind="stable")
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1


def _loading_key(table: str) -> bytes:
    return f"loading/{table}".encode()


def _family_key(table: str) -> bytes:
    return f"cf/{table}".encode()


# Separates a table's name from the number of the column family a replacing load builds: storage names
# are `<model>.<table>` of [A-Za-z0-9_-], so it never occurs in one.
_VERSION_MARK = "#"


def _int_bytes(value: int) -> bytes:
    return int(value).to_bytes(8, "little", signed=True)


class RocksDBLevel(StorageLevel):
    """Persistent level on a local RocksDB folder; read-only mode serves replicas of a prepared DB.

    Fetches run concurrently; writes are serialized by a lock so the stored row counts stay exact.
    A read-only instance is a RocksDB secondary: it sees the database as it was when opened, and what a
    writer process committed since once follow_writes() catches it up.
    """

    kind = "rocksdb"

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        num_threads: int = 16,
        max_batch_size: int = 65536,
        sync_writes: bool = False,
    ) -> None:
        """sync_writes: fsync the WAL before a write returns (survives a power loss, not only a crash)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        self.path = Path(path)
        self.read_only = read_only
        self.max_batch_size = max_batch_size
        self._write_lock = threading.Lock()
        self._options = _options(num_threads)
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = sync_writes
        self._outages = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)
        # Why writes fail (set by a failed write, no path in it), and when the database was last reopened.
        self._failure: str | None = None
        self._reopened = 0.0
        if read_only and not (self.path / "CURRENT").exists():
            raise StorageError(f"rocksdb: no database in the folder {self.path.name!r} to open read-only")
        # A secondary keeps its own small log folder; a writer may delete files it still reads, so it keeps
        # every file open (RocksDB's advice for secondaries).
        self._secondary = Path(tempfile.mkdtemp(prefix="hps-rocksdb-secondary-")) if read_only else None
        # The folder RocksDB opens: the database's own, or a view of it where it cannot be written to.
        self._opened = self.path
        try:
            if self._secondary is not None:
                self._options.set_max_open_files(-1)
                if not _writable(self.path):
                    try:
                        self._opened = _view(self.path, self._secondary / "view")
                    except OSError as e:  # its strerror only: no path in messages
                        raise StorageError(
                            f"rocksdb: cannot read the folder at persistent_db.path: {e.strerror}"
                        ) from None
            self._open()
        except BaseException:
            if self._secondary is not None:
                shutil.rmtree(self._secondary, ignore_errors=True)
            raise
        # Which folder this is: writes stop once it is removed or replaced (they would be lost at restart).
        self._folder = _identity(self.path)
        mode = "read-only" if read_only else "read-write"
        log.info("rocksdb: opened %s (%s), tables %s", self.path.name, mode, self.tables())

    def _open(self, writable: bool = True) -> None:
        """Opens the database and reads every table's dim, row count and column family; with `writable`
        False (a reopen that failed for want of room), read-only: the files as they are, nothing written."""
        exists = (self._opened / "CURRENT").exists()
        names = rocksdict.Rdict.list_cf(str(self._opened), self._options) if exists else [_META_CF]
        families = {name: rocksdict.Options(raw_mode=True) for name in names if name != _META_CF}
        if self._secondary is not None:
            access = rocksdict.AccessType.secondary(str(self._secondary))
        else:
            access = rocksdict.AccessType.read_write() if writable else rocksdict.AccessType.read_only()
        try:
            self._db = rocksdict.Rdict(str(self._opened), self._options, column_families=families, access_type=access)
        except Exception as exc:
            reason = self._hidden(exc)
            if "/LOCK:" in reason:  # RocksDB's lock file: another process (or this one) holds it read-write
                raise LevelUnavailableError(
                    "rocksdb: the database at persistent_db.path is held by another opener (a running hps serve?):"
                    " stop it first (only reading opens beside it: hps export, persistent_db.read_only)"
                ) from None
            raise LevelUnavailableError(f"rocksdb: cannot open the database at persistent_db.path: {reason}") from None
        self._meta = self._db.get_column_family_handle(_META_CF)
        self._dims: dict[str, int] = {}
        self._rows: dict[str, int] = {}
        self._families: dict[str, Any] = {}
        # Each table's column family: the table's own name, or the one a replacing load built.
        self._physical: dict[str, str] = {}
        # Column families created by a writer that stopped before recording the dim: not tables yet.
        self._orphans: set[str] = set()
        # A table replaced by a load has no family of its own name any more, only `<table>#<n>` ones.
        tables = dict.fromkeys(name.partition(_VERSION_MARK)[0] for name in families)
        for name in tables:
            dim = self._db.get(f"dim/{name}".encode())
            if dim is None:
                if name in families:
                    self._orphans.add(name)
                continue
            rows = self._db.get(f"rows/{name}".encode()) or _int_bytes(0)
            physical = (self._db.get(_family_key(name)) or name.encode()).decode()
            self._dims[name] = int.from_bytes(dim, "little", signed=True)
            self._rows[name] = int.from_bytes(rows, "little", signed=True)
            self._physical[name] = physical
            self._families[name] = self._db.get_column_family(physical)
            if writable and self._db.get(_loading_key(name)) is not None:
                self._discard_unfinished_load(name)
        in_use = set(self._physical.values())
        for name in (name for name in families if writable and _VERSION_MARK in name and name not in in_use):
            self._discard_unfinished_replacement(name)

    def _hidden(self, error: BaseException) -> str:
        """RocksDB's message without the server's folder path in it (clients and logs never see paths)."""
        paths = sorted({str(self._opened), str(self.path.resolve()), str(self.path)}, key=len, reverse=True)
        return re.sub("|".join(map(re.escape, paths)), FOLDER_IN_MESSAGES, str(error))  # one pass: no path twice

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Every write, under the write lock: refused while the folder is gone or replaced (RocksDB would
        take it into files already unlinked, to be lost at restart); a RocksDB failure becomes
        LevelUnavailableError with no path in it, so nothing is acknowledged that RocksDB did not take."""
        if _identity(self.path) != self._folder:
            raise LevelUnavailableError(
                "rocksdb: the data folder was removed or replaced while serving; writes are refused until a "
                "restart opens it anew (what they wrote would be lost)"
            )
        if self._failure is not None:
            self._recover()
        try:
            yield
        except (StorageError, ValueError):
            raise
        except Exception as e:
            self._failure = self._hidden(e)
            self._outages.warn("%s writes failing: %s", "rocksdb", self._failure)
            raise LevelUnavailableError(f"rocksdb: write failed: {self._failure}") from None

    @property
    def write_failure(self) -> str | None:
        if _identity(self.path) != self._folder:
            return "the data folder was removed or replaced while serving"
        return None if self._failure is None else f"write failed: {self._failure}"

    def retry_writes(self) -> None:
        if self._failure is None or self.read_only:
            return
        with self._write_lock, contextlib.suppress(LevelUnavailableError):
            if self._failure is not None:
                self._recover()

    def follow_writes(self) -> None:
        """A read-only instance catches up with what the writer process committed (its tables' rows
        included); LevelUnavailableError when RocksDB cannot."""
        if self._secondary is None:
            return
        try:
            self._db.try_catch_up_with_primary()
            for name in self._dims:
                rows = self._db.get(f"rows/{name}".encode())
                self._rows[name] = int.from_bytes(rows, "little", signed=True) if rows else 0
        except Exception as exc:
            raise LevelUnavailableError(f"rocksdb: cannot catch up with the writer: {self._hidden(exc)}") from None

    def _recover(self) -> None:
        """After a failed write: RocksDB keeps refusing writes once one failed (its error is sticky), so once
        the folder takes files again the database is closed and opened anew, at most once per
        RECOVER_SECONDS. Callers hold the write lock and no handle of the old database (its file lock goes
        with the last reference to it)."""
        now = time.monotonic()
        if now - self._reopened < RECOVER_SECONDS or not _takes_files(self.path):
            raise LevelUnavailableError(f"rocksdb: writes failing: {self._failure}")
        self._reopened = now
        self._shut(flush=False)
        gc.collect()  # frames of the failed write may still refer to the old database
        try:
            self._open()
        except LevelUnavailableError:
            # Opening replays the log into a new file, which a full disk refuses although it took the
            # probe's empty one: reads go on from a read-only open until a later reopen succeeds.
            self._open(writable=False)
            raise LevelUnavailableError(f"rocksdb: writes failing: {self._failure}") from None
        try:  # a write that reaches the disk: the log and the folder take files again
            self._db.put(_PROBE_KEY, b"", self._write_options)
            self._db.flush()
        except Exception as e:
            self._failure = self._hidden(e)
            raise LevelUnavailableError(f"rocksdb: writes failing: {self._failure}") from None
        self._failure = None
        log.warning("rocksdb: writes work again (the database was reopened)")

    @classmethod
    def from_config(cls, config: PersistentDbConfig) -> RocksDBLevel:
        return cls(
            config.path,
            read_only=config.read_only,
            num_threads=config.num_threads,
            max_batch_size=config.max_batch_size,
            sync_writes=config.sync_writes,
        )

    # -- tables ---------------------------------------------------------------------------------

    def create_table(self, table: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be at least 1, got {dim}")
        if table == _META_CF:
            raise ValueError(f"table: {_META_CF!r} is reserved for the level's metadata")
        known = self._dims.get(table)
        if known is not None:
            if known != dim:
                raise StorageError(f"rocksdb: table {table!r} exists with dim {known}, asked for dim {dim}")
            return
        self._check_writable(table)
        with self._write_lock, self._writing():
            if table in self._dims:
                return
            family = (
                self._db.get_column_family(table)
                if table in self._orphans
                else self._db.create_column_family(table, rocksdict.Options(raw_mode=True))
            )
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(f"dim/{table}".encode(), _int_bytes(dim), self._meta)
            batch.put(f"rows/{table}".encode(), _int_bytes(0), self._meta)
            self._db.write(batch, self._write_options)
            self._families[table] = family
            self._physical[table] = table
            self._rows[table] = 0
            self._dims[table] = dim

    def dim(self, table: str) -> int:
        try:
            return self._dims[table]
        except KeyError:
            raise UnknownTableError(f"rocksdb: unknown table {table!r}") from None

    def tables(self) -> list[str]:
        return sorted(self._dims)

    def size(self, table: str) -> int:
        self.dim(table)
        return self._rows[table]

    def occupancy(self, table: str) -> tuple[int, int | None]:
        """Rows counted exactly (as size()); bytes: RocksDB's estimate of the column family's live data in
        SST files plus its memtables."""
        rows = self.size(table)
        family = self._family(table)
        try:
            stored = sum(family.property_int_value(name) or 0 for name in _SIZE_PROPERTIES)
        except Exception as e:
            raise LevelUnavailableError(f"rocksdb: cannot read its size properties: {self._hidden(e)}") from None
        return rows, stored

    # -- reads ----------------------------------------------------------------------------------

    def _family(self, table: str) -> Any:
        """The table's column family (a table this level holds), or LevelUnavailableError where the database
        is closed: a reopen after write failures could open it neither read-write nor read-only."""
        family = self._families.get(table)
        if family is None:
            raise LevelUnavailableError("rocksdb: closed after failed writes (reopening it failed); tried again later")
        return family

    def _values(self, table: str, keys: np.ndarray) -> list[bytes]:
        """Stored values of `keys` (b'' where absent), one multi_get per max_batch_size keys."""
        values: list[bytes] = []
        family = self._family(table)
        try:
            for start in range(0, len(keys), self.max_batch_size):
                values += family.get(_key_bytes(keys[start : start + self.max_batch_size]), b"")
        except Exception as e:
            raise LevelUnavailableError(f"rocksdb: read of {table} failed: {self._hidden(e)}") from None
        return values

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dim = self.dim(table)
        keys = as_keys(keys)
        values = self._values(table, keys)
        found = np.fromiter(map(len, values), dtype=np.int64, count=len(values)) > 0
        # Missing keys came back as b"", so the join holds exactly the found rows, in key order.
        joined = bytearray().join(values)
        if found.all():  # the common case: a bytearray is writable, so the rows need no second copy
            return np.frombuffer(joined, dtype="<f4").reshape(-1, dim), found
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        vectors[found] = np.frombuffer(joined, dtype="<f4").reshape(-1, dim)
        return vectors, found

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        self.dim(table)
        return self._present(table, as_keys(keys))

    def _present(self, table: str, keys: np.ndarray) -> np.ndarray:
        values = self._values(table, keys)
        return np.fromiter(map(len, values), dtype=np.int64, count=len(values)) > 0

    def dump(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        dim = self.dim(table)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be at least 1, got {chunk_rows}")
        iterator = self._family(table).iter()
        iterator.seek_to_first()
        while iterator.valid():
            keys: list[bytes] = []
            values: list[bytes] = []
            while iterator.valid() and len(keys) < chunk_rows:
                keys.append(iterator.key())
                values.append(iterator.value())
                iterator.next()
            yield (
                np.frombuffer(b"".join(keys), dtype="<i8").copy(),
                np.frombuffer(b"".join(values), dtype="<f4").reshape(-1, dim).copy(),
            )

    # -- writes ---------------------------------------------------------------------------------

    def _check_writable(self, table: str) -> None:
        if self.read_only:
            raise StorageError(f"rocksdb: the database is open read-only; cannot write table {table!r}")

    def insert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        dim = self.dim(table)
        keys = as_keys(keys)
        vectors = as_vectors(vectors, len(keys), dim)
        self._check_writable(table)
        if len(keys) == 0:
            return
        distinct = keys[_last_of_each(keys)]
        with self._write_lock, self._writing():
            handle = self._db.get_column_family_handle(self._physical[table])
            added = int((~self._present(table, distinct)).sum())
            batch = rocksdict.WriteBatch(raw_mode=True)
            # WriteBatch applies puts in order, so a key repeated in the batch keeps its last row.
            deque(map(batch.put, _key_bytes(keys), _row_bytes(vectors), repeat(handle)), maxlen=0)
            batch.put(f"rows/{table}".encode(), _int_bytes(self._rows[table] + added), self._meta)
            self._db.write(batch, self._write_options)
            self._rows[table] += added

    def evict(self, table: str, keys: np.ndarray) -> int:
        self.dim(table)
        keys = as_keys(keys)
        self._check_writable(table)
        distinct = np.unique(keys)
        with self._write_lock, self._writing():
            handle = self._db.get_column_family_handle(self._physical[table])
            present = distinct[self._present(table, distinct)]
            if len(present) == 0:
                return 0
            batch = rocksdict.WriteBatch(raw_mode=True)
            deque(map(batch.delete, _key_bytes(present), repeat(handle)), maxlen=0)
            batch.put(f"rows/{table}".encode(), _int_bytes(self._rows[table] - len(present)), self._meta)
            self._db.write(batch, self._write_options)
            self._rows[table] -= len(present)
            return len(present)

    def load(self, table: str, chunks: Iterable[KeyChunk]) -> int:
        """Bulk import: each chunk becomes one SST file ingested into a column family.

        Into an empty table the rows go into the table's family, marked as loading until the last chunk
        is in. Into a table that has rows they replace those rows, atomically: they are built in a family
        of their own that the table switches to once complete (a load stopped part-way leaves the old rows
        served). A key repeated within a chunk or across chunks keeps its last row, as with `insert`.
        SST files are written in a temporary folder next to the database and removed afterwards. Other
        writes wait for the load to finish, so the row count stays exact; a chunk with bad shapes raises
        ValueError (into an empty table, after the chunks before it were ingested).
        """
        dim = self.dim(table)
        self._check_writable(table)
        ingest = rocksdict.IngestExternalFileOptions()
        ingest.set_move_files(True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}-ingest-", dir=self.path.parent))
        written = 0
        with self._write_lock, self._writing():
            replacing = self._rows[table] > 0
            if replacing:
                target = self._next_family(table)
                family = self._db.create_column_family(target, rocksdict.Options(raw_mode=True))
            else:  # removed once every chunk is in; found at open, it means the load never finished
                family = self._families[table]
                self._db.put(_loading_key(table), b"", self._write_options)
            # The distinct keys of the load are the rows it leaves: counted once at the end (8 bytes per
            # row in memory) rather than by a presence multi_get per chunk, which costs several times
            # the ingest itself.
            loaded: list[np.ndarray] = []
            try:
                for number, (chunk_keys, chunk_vectors) in enumerate(chunks):
                    keys = as_keys(chunk_keys)
                    vectors = as_vectors(chunk_vectors, len(keys), dim)
                    if len(keys) == 0:
                        continue
                    # SST files need strictly increasing keys in bytewise order of the little-endian bytes.
                    last = _last_of_each(keys)
                    keys, vectors = keys[last], vectors[last]
                    sst = staging / f"{number:08d}.sst"
                    writer = rocksdict.SstFileWriter(rocksdict.Options(raw_mode=True))
                    writer.open(str(sst))
                    deque(map(writer.__setitem__, _key_bytes(keys), _row_bytes(vectors)), maxlen=0)
                    writer.finish()
                    loaded.append(keys)
                    family.ingest_external_file([str(sst)], ingest)
                    if not replacing:
                        self._store_rows(table, self._rows[table] + len(keys))  # an upper bound until the end
                    written += len(chunk_keys)
                if replacing:
                    self._switch(table, target, family, _distinct(loaded) if loaded else 0)
                else:
                    self._db.delete(_loading_key(table), self._write_options)
            except BaseException:
                if replacing:
                    del family
                    self._drop_family(target)
                raise
            finally:
                if not replacing and loaded:
                    self._store_rows(table, _distinct(loaded))
                shutil.rmtree(staging, ignore_errors=True)
        return written

    def drop_table(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        """Drops the table's column family and its metadata in one write (a version no longer served)."""
        if table not in self._dims:
            return
        self._check_writable(table)
        with self._write_lock, self._writing():
            batch = rocksdict.WriteBatch(raw_mode=True)
            for prefix in ("dim", "rows", "cf"):
                batch.delete(f"{prefix}/{table}".encode(), self._meta)
            self._db.write(batch, self._write_options)
            physical = self._physical.pop(table)
            del self._dims[table], self._rows[table], self._families[table]
            self._drop_family(physical)

    def _next_family(self, table: str) -> str:
        """The name of the column family a replacing load of `table` builds."""
        current = self._physical[table]
        number = int(current.rpartition(_VERSION_MARK)[2]) + 1 if _VERSION_MARK in current else 1
        return f"{table}{_VERSION_MARK}{number}"

    def _switch(self, table: str, target: str, family: Any, rows: int) -> None:
        """Points the table at the family a replacing load built, with its row count, in one write; then
        drops the family it leaves."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(_family_key(table), target.encode(), self._meta)
        batch.put(f"rows/{table}".encode(), _int_bytes(rows), self._meta)
        self._db.write(batch, self._write_options)
        previous = self._physical[table]
        self._families[table], self._physical[table], self._rows[table] = family, target, rows
        self._drop_family(previous)

    def _drop_family(self, name: str) -> None:
        try:
            self._db.drop_column_family(name)
        except Exception as e:  # what is left is dropped at the next open
            log.warning("rocksdb: could not drop column family %s yet: %s", name, e)

    def _discard_unfinished_replacement(self, family: str) -> None:
        """A replacing load stopped before its table switched to it: its rows were never served."""
        table = family.rpartition(_VERSION_MARK)[0]
        if self.read_only:
            log.warning("rocksdb: an unfinished re-import of %s is left in place (opened read-only)", table)
            return
        log.warning("rocksdb: dropping an unfinished re-import of %s; its previous rows stay served", table)
        self._drop_family(family)

    def _discard_unfinished_load(self, table: str) -> None:
        """A bulk load into the empty table stopped part-way (the process died): the table is dropped, as if
        never created, so that its next import (a server's ingest of a new table) starts afresh instead of
        serving a partial table as complete."""
        if self.read_only:
            log.warning("rocksdb: table %s holds an unfinished import; opened read-only, it is served as is", table)
            return
        log.warning("rocksdb: table %s holds an unfinished import; dropping it for a fresh import", table)
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key in (f"dim/{table}".encode(), f"rows/{table}".encode(), _family_key(table), _loading_key(table)):
            batch.delete(key, self._meta)
        self._db.write(batch, self._write_options)
        physical = self._physical.pop(table)
        del self._dims[table], self._rows[table], self._families[table]
        self._drop_family(physical)

    def _store_rows(self, table: str, rows: int) -> None:
        self._db.put(f"rows/{table}".encode(), _int_bytes(rows), self._write_options)
        self._rows[table] = rows

    def _shut(self, flush: bool) -> str | None:
        """Drops every handle, flushes when asked, closes and forgets the database; what failed (no path in
        it), or None. A database whose writes fail does not flush or close cleanly."""
        # RocksDB shuts down only when no column family object or handle refers to it any more.
        self._families.clear()
        self.__dict__.pop("_meta", None)
        database = self.__dict__.pop("_db", None)
        if database is None:  # gone already: a reopen after write failures did not succeed
            return None
        failure = None
        for step in (database.flush, database.close) if flush else (database.close,):
            try:
                step()
            except Exception as e:
                failure = failure or self._hidden(e)
        return failure

    def close(self) -> None:
        """Flushes and closes; StorageError (no path in it) when the final flush fails, after closing."""
        if "_db" not in self.__dict__:  # a reopen after write failures did not succeed
            raise StorageError(f"rocksdb: closed with writes failing: {self._failure}")
        failure = self._shut(flush=not self.read_only)
        if self._secondary is not None:
            shutil.rmtree(self._secondary, ignore_errors=True)
        if failure is not None:
            raise StorageError(f"rocksdb: the final flush failed, writes since the last one may be lost: {failure}")
