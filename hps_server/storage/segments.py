"""Where the hash map's arrays live: this process's own memory, or POSIX shared-memory segments that every
worker of one supervisor maps, with the locks that order those processes.

It holds no hash-map logic (hashmap.py probes, inserts and evicts over whichever memory it is given) and
knows nothing of tables' contents; it must never copy rows between processes, only map them.

Shared layout, all under /dev/shm (POSIX shared memory on Linux), named from the level's name `<name>`:

- `<name>`: the header, HEADER_BYTES: word 0 MAGIC, word 1 the registry's length in bytes, then the
  registry (REGISTRY_BYTES of UTF-8 JSON `[[table, dim], ...]` in creation order: a table's pool is the
  order of first appearance of its dim, its id the order among the tables of that dim, so every process
  rebuilds the same map from it), then MAX_POOLS pool records of STATE_FIELDS int64 words (STATE below:
  generations, rows, tombstones, clock, capacities, tables, dirty) and MAX_TABLES_PER_POOL row counts.
- `<name>p<pool>r<generation>`: a pool's dense rows, keys int64 | vectors float32[dim] | stamps uint32 |
  table ids uint16, each CAPACITY long; `<name>p<pool>i<generation>`: its int32 slot index, NUM_SLOTS long.
  A reallocation or rebuild writes the next generation's segment, publishes it by bumping the generation in
  the header, then unlinks the old name: a process still mapping the old one keeps its pages until it
  re-attaches at its next call (POSIX unlink semantics), and no process reads it meanwhile (the lock below).
- `<name>.lock` (the registry) and `<name>p<pool>.lock`: `flock` files, shared for reads, exclusive for
  writes; the kernel releases a lock when its process dies, so a SIGKILLed holder wedges no one.

The segments are mapped with `mmap` rather than through `multiprocessing.shared_memory.SharedMemory`: its
resource tracker would unlink a segment when the worker that created it (by growing the map) exits, and its
close() refuses while NumPy views exist. Here a mapping lives exactly as long as an array of it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hps_server.storage.base import StorageError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = 0x3170616D68737068  # "hpshmap1"
REGISTRY_BYTES = 65536
MAX_POOLS = 64
MAX_TABLES_PER_POOL = 1024
# A pool's record in the header: its state words, then its tables' row counts.
STATE_FIELDS = 16
ROWS_GEN, INDEX_GEN, ROWS, TOMBSTONES, CLOCK, CAPACITY, NUM_SLOTS, NUM_TABLES, DIRTY = range(9)
_RECORD_WORDS = STATE_FIELDS + MAX_TABLES_PER_POOL
_REGISTRY_OFFSET = 16
_POOLS_OFFSET = _REGISTRY_OFFSET + REGISTRY_BYTES
HEADER_BYTES = _POOLS_OFFSET + MAX_POOLS * _RECORD_WORDS * 8

_names = itertools.count()
# This process's own part of its names: a supervisor killed outright leaves its segments behind, and in a
# container its successor has the same pid (1), so the pid alone would name them again.
_INCARNATION = secrets.token_hex(3)
_ALIVE = ".alive"
_alive_lock: int | None = None  # the flock this process holds on its names' `.alive` file while it runs
_naming = threading.Lock()


def _own_prefix() -> str:
    return f"hps{os.getpid()}_{_INCARNATION}"


def unique_name() -> str:
    """A level name no other supervisor (its pid, and a random part) nor other level of this process (a
    counter) uses. The first one also removes what processes killed outright left (remove_dead)."""
    global _alive_lock
    with _naming:
        if _alive_lock is None:
            remove_dead()
            fd = os.open(SHM_DIR / f"{_own_prefix()}{_ALIVE}", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel lets go of it when this process ends, however
            _alive_lock = fd
            atexit.register(_unlink, SHM_DIR / f"{_own_prefix()}{_ALIVE}")
        return f"{_own_prefix()}{next(_names)}"


def remove_dead() -> list[str]:
    """Unlinks the segments of every process that named some and ended without unlinking them (SIGKILL,
    an OOM kill): those whose `.alive` file nobody holds locked, wherever that process ran (/dev/shm may be
    shared by other pid namespaces: the lock, not the pid, says it is gone). Returns their prefixes."""
    removed = []
    for alive in SHM_DIR.glob(f"hps*_*{_ALIVE}"):
        try:
            fd = os.open(alive, os.O_RDWR)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process runs
            prefix = alive.name[: -len(_ALIVE)]
            for segment in SHM_DIR.glob(f"{prefix}*"):
                _unlink(segment)
            removed.append(prefix)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed the shared memory of %d processes that ended without removing it", len(removed))
    return removed


@dataclass
class RowArrays:
    """A pool's dense rows; `generation` 0 is private memory."""

    table_ids: np.ndarray
    keys: np.ndarray
    stamps: np.ndarray
    vectors: np.ndarray
    generation: int


@dataclass
class SlotArray:
    slots: np.ndarray
    generation: int


class PoolLock:
    """Orders one pool's users: a thread lock within this process (flock is per open file, so it cannot
    tell this process's threads apart), and across processes an flock on the pool's lock file, if any."""

    def __init__(self, path: Path | None) -> None:
        self._thread = threading.RLock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path is not None else None
        self._depth = 0

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        """Holds the lock; nested holds keep the outermost mode (so never nest exclusive in shared)."""
        with self._thread:
            if self._fd is not None and self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._fd is not None and self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PoolMemory:
    """One pool's memory in this process: its state words, row counts and arrays (private NumPy memory)."""

    def __init__(self, state: np.ndarray, lock: PoolLock) -> None:
        self.state = state
        self.lock = lock
        self._counts = np.zeros(0, dtype=np.int64)

    def counts(self, tables: int) -> np.ndarray:
        """The row counts of the pool's first `tables` tables (kept when it grows)."""
        if tables > len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros(tables - len(self._counts), dtype=np.int64)])
        return self._counts[:tables]

    def new_rows(self, generation: int, capacity: int, dim: int) -> RowArrays:
        return RowArrays(
            np.empty(capacity, dtype=np.uint16),
            np.empty(capacity, dtype=np.int64),
            np.zeros(capacity, dtype=np.uint32),
            np.empty((capacity, dim), dtype=np.float32),
            generation,
        )

    def open_rows(self, generation: int, capacity: int, dim: int) -> RowArrays:
        raise AssertionError("private memory is never stale")

    def new_slots(self, generation: int, num_slots: int) -> SlotArray:
        return SlotArray(np.empty(num_slots, dtype=np.int32), generation)

    def open_slots(self, generation: int, num_slots: int) -> SlotArray:
        raise AssertionError("private memory is never stale")

    def retire(self, arrays: RowArrays | SlotArray) -> None:
        """The arrays were replaced by a newer generation."""

    def close(self) -> None:
        self.lock.close()


class SharedPoolMemory(PoolMemory):
    """One pool's memory in shared segments (see the module docstring for names and layout)."""

    def __init__(self, state: np.ndarray, counts: np.ndarray, lock: PoolLock, prefix: str) -> None:
        super().__init__(state, lock)
        self._all_counts = counts
        self._prefix = prefix

    def counts(self, tables: int) -> np.ndarray:
        if tables > MAX_TABLES_PER_POOL:
            raise StorageError(f"hash_map: a shared pool holds at most {MAX_TABLES_PER_POOL} tables of one dim")
        return self._all_counts[:tables]

    def _rows_layout(self, capacity: int, dim: int) -> tuple[int, list[tuple[np.dtype, tuple[int, ...], int]]]:
        parts: list[tuple[np.dtype, tuple[int, ...]]] = [
            (np.dtype(np.int64), (capacity,)),
            (np.dtype(np.float32), (capacity, dim)),
            (np.dtype(np.uint32), (capacity,)),
            (np.dtype(np.uint16), (capacity,)),
        ]
        placed, offset = [], 0
        for dtype, shape in parts:
            placed.append((dtype, shape, offset))
            offset += dtype.itemsize * int(np.prod(shape))
        return offset, placed

    def _rows(self, generation: int, capacity: int, dim: int, create: bool) -> RowArrays:
        size, layout = self._rows_layout(capacity, dim)
        buffer = _map(SHM_DIR / f"{self._prefix}r{generation}", size, create)
        keys, vectors, stamps, table_ids = (
            np.ndarray(shape, dtype, buffer=buffer, offset=offset) for dtype, shape, offset in layout
        )
        return RowArrays(table_ids, keys, stamps, vectors, generation)

    def new_rows(self, generation: int, capacity: int, dim: int) -> RowArrays:
        return self._rows(generation, capacity, dim, create=True)

    def open_rows(self, generation: int, capacity: int, dim: int) -> RowArrays:
        return self._rows(generation, capacity, dim, create=False)

    def new_slots(self, generation: int, num_slots: int) -> SlotArray:
        buffer = _map(SHM_DIR / f"{self._prefix}i{generation}", 4 * num_slots, create=True)
        return SlotArray(np.ndarray(num_slots, np.int32, buffer=buffer), generation)

    def open_slots(self, generation: int, num_slots: int) -> SlotArray:
        buffer = _map(SHM_DIR / f"{self._prefix}i{generation}", 4 * num_slots, create=False)
        return SlotArray(np.ndarray(num_slots, np.int32, buffer=buffer), generation)

    def retire(self, arrays: RowArrays | SlotArray) -> None:
        kind = "r" if isinstance(arrays, RowArrays) else "i"
        _unlink(SHM_DIR / f"{self._prefix}{kind}{arrays.generation}")


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    """Maps a segment, creating it (zero-filled) or attaching to it."""
    if create:
        # A segment of a generation never published: left by a process killed while growing the pool.
        _unlink(path)
        _check_room(path.parent, size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    else:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise StorageError(f"hash_map: shared segment {path} is gone (was its supervisor stopped?)") from None
    try:
        if create:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size < size:
            raise StorageError(f"hash_map: shared segment {path} is smaller than its header says")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _check_room(folder: Path, size: int) -> None:
    """StorageError unless `folder` (tmpfs: its pages are taken as they are written) has room for `size` bytes
    and for the pages this process's segments may still take (their size less what they hold); a full
    /dev/shm is then an error here, not a SIGBUS at a write past it."""
    stat = os.statvfs(folder)
    unwritten = 0
    for segment in folder.glob(f"{_own_prefix()}*"):
        with contextlib.suppress(FileNotFoundError):
            held = segment.stat()
            unwritten += max(0, held.st_size - held.st_blocks * 512)
    if stat.f_bavail * stat.f_frsize < size + unwritten:
        raise StorageError(
            f"hash_map: /dev/shm has {stat.f_bavail * stat.f_frsize >> 20} MiB free, the shared hash map needs "
            f"{size >> 20} MiB more: give it room (a memory-backed emptyDir's sizeLimit) or lower "
            "volatile_db.overflow_margin"
        )


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Arena:
    """Where one level's pools live: the registry of its tables and each pool's memory (private here)."""

    shared_name = ""

    def __init__(self) -> None:
        self.registry_lock = PoolLock(None)
        self._registry: list[tuple[str, int]] = []

    def registry(self) -> list[tuple[str, int]]:
        """(table, dim) of every table, in creation order; callers hold registry_lock."""
        return list(self._registry)

    def set_registry(self, entries: list[tuple[str, int]]) -> None:
        self._registry = list(entries)

    def pool(self, index: int) -> PoolMemory:
        return PoolMemory(np.zeros(STATE_FIELDS, dtype=np.int64), PoolLock(None))

    def close(self) -> None:
        """Lets go of this process's mappings (the arrays go when the last view of them does)."""
        self.registry_lock.close()


class SharedArena(Arena):
    """A level's pools in shared memory: `owner` created the header (and unlinks everything at close),
    the others attached to it by name."""

    def __init__(self, name: str, owner: bool) -> None:
        if not SHM_DIR.is_dir():
            raise StorageError(f"hash_map: shared memory needs {SHM_DIR} (POSIX shared memory on Linux)")
        self.shared_name = name
        self._owner = owner
        self._header = np.ndarray(HEADER_BYTES // 8, np.int64, buffer=_map(SHM_DIR / name, HEADER_BYTES, owner))
        if owner:
            self._header[0] = MAGIC
        elif self._header[0] != MAGIC:
            raise StorageError(f"hash_map: {SHM_DIR / name} is not a shared hash map")
        self.registry_lock = PoolLock(SHM_DIR / f"{name}.lock")

    def _registry_bytes(self) -> np.ndarray:
        return self._header[_REGISTRY_OFFSET // 8 : _POOLS_OFFSET // 8].view(np.uint8)

    def registry(self) -> list[tuple[str, int]]:
        length = int(self._header[1])
        if not length:
            return []
        return [(str(name), int(dim)) for name, dim in json.loads(self._registry_bytes()[:length].tobytes())]

    def set_registry(self, entries: list[tuple[str, int]]) -> None:
        encoded = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
        if len(encoded) > REGISTRY_BYTES:
            raise StorageError(f"hash_map: a shared level's table names fit in {REGISTRY_BYTES} bytes")
        if len({dim for _, dim in entries}) > MAX_POOLS:
            raise StorageError(f"hash_map: a shared level holds tables of at most {MAX_POOLS} dims")
        self._registry_bytes()[: len(encoded)] = encoded
        # The length last: a writer killed before it leaves the previous registry in force.
        self._header[1] = len(encoded)

    def pool(self, index: int) -> PoolMemory:
        start = _POOLS_OFFSET // 8 + index * _RECORD_WORDS
        record = self._header[start : start + _RECORD_WORDS]
        prefix = f"{self.shared_name}p{index}"
        return SharedPoolMemory(
            record[:STATE_FIELDS], record[STATE_FIELDS:], PoolLock(SHM_DIR / f"{prefix}.lock"), prefix
        )

    def segment_paths(self) -> list[Path]:
        """Every path this level may have under SHM_DIR, published or left by a killed writer."""
        pools = len({dim for _, dim in self.registry()})
        paths = [SHM_DIR / self.shared_name, SHM_DIR / f"{self.shared_name}.lock"]
        for index in range(pools):
            start = _POOLS_OFFSET // 8 + index * _RECORD_WORDS
            prefix = f"{self.shared_name}p{index}"
            paths.append(SHM_DIR / f"{prefix}.lock")
            for kind, field in (("r", ROWS_GEN), ("i", INDEX_GEN)):
                generation = int(self._header[start + field])
                paths += [SHM_DIR / f"{prefix}{kind}{generation}", SHM_DIR / f"{prefix}{kind}{generation + 1}"]
        return paths

    def close(self) -> None:
        if self._owner:
            for path in self.segment_paths():
                _unlink(path)
        super().close()
