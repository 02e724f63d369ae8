"""The in-process volatile level: one vectorized NumPy open-addressing hash map per table.

Whole batches go through a few NumPy calls per probing round; it must never loop over keys in Python.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from hps_server.config import VolatileDbConfig
from hps_server.storage.base import (
    DEFAULT_CHUNK_ROWS,
    KeyChunk,
    StorageError,
    StorageLevel,
    UnknownTableError,
    as_keys,
    as_vectors,
)

log = logging.getLogger(__name__)

EMPTY = -1
TOMBSTONE = -2

MIN_ROWS = 1024
# The slot index is rebuilt at REBUILD_LOAD (live rows + tombstones per slot) to REBUILT_LOAD, which
# keeps linear-probing chains short while costing 4 / load bytes per row.
REBUILD_LOAD = 0.75
REBUILT_LOAD = 0.6
# Most bytes held per stored row, as a multiple of the raw key + vector bytes, for dim >= 16 (smaller
# dims pay more: the index and stamps are a fixed 8-11 bytes a row). Dense arrays grow by the largest
# factor that stays within it, so wide tables are copied less often.
MEMORY_BUDGET = 1.28
MIN_GROWTH = 1.125
MAX_GROWTH = 1.5


def growth_factor(dim: int) -> float:
    """How much the dense arrays of a `dim` table grow when full (see MEMORY_BUDGET)."""
    raw = 8 + 4 * dim
    # Worst case just after growing and rebuilding: growth * (raw + stamp) + 4 / REBUILT_LOAD bytes a row.
    fitting = (MEMORY_BUDGET * raw - 4 / REBUILT_LOAD) / (raw + 4)
    return min(MAX_GROWTH, max(MIN_GROWTH, fitting))


_STAMP_LIMIT = np.iinfo(np.uint32).max
# Slots read per key in a lookup's first probing round, and in later rounds (only long chains get there).
FIRST_WINDOW = 8
LATER_WINDOW = 64
_WINDOW_OFFSETS = np.arange(LATER_WINDOW, dtype=np.int64)


def _rows(n: int) -> np.ndarray:
    return np.arange(n)


def home_slots(keys: np.ndarray, num_slots: int) -> np.ndarray:
    """First slot probed for each key: a 64-bit mix of the key mapped onto [0, num_slots)."""
    x = keys.view(np.uint64)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    # Multiply-shift range reduction works for any table size, so the index need not be a power of two.
    return (((x >> np.uint64(32)) * np.uint64(num_slots)) >> np.uint64(32)).astype(np.int64)


class _Table:
    """Dense rows [0, rows) plus an int32 slot index pointing into them; callers hold `lock`."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.growth = growth_factor(dim)
        self.lock = threading.RLock()
        self.rows = 0
        self.tombstones = 0
        self.keys = np.empty(MIN_ROWS, dtype=np.int64)
        self.vectors = np.empty((MIN_ROWS, dim), dtype=np.float32)
        # Batch counter value of the last fetch or insert of each row (evict_oldest).
        self.stamps = np.zeros(MIN_ROWS, dtype=np.uint32)
        self.slots = np.full(int(MIN_ROWS / REBUILT_LOAD) + 1, EMPTY, dtype=np.int32)
        self.clock = 0

    def tick(self) -> np.uint32:
        """The stamp for the current batch; renumbers stamps by rank before the counter wraps."""
        if self.clock >= _STAMP_LIMIT:
            ranks = np.unique(self.stamps[: self.rows], return_inverse=True)[1]
            self.stamps[: self.rows] = ranks
            self.clock = int(ranks.max(initial=0)) + 1
        self.clock += 1
        return np.uint32(self.clock)

    def memory_bytes(self) -> int:
        return self.keys.nbytes + self.vectors.nbytes + self.stamps.nbytes + self.slots.nbytes

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row int64[n], slot int64[n]) of each key; -1 for both where the key is absent."""
        n = len(keys)
        row = np.full(n, -1, dtype=np.int64)
        slot = np.full(n, -1, dtype=np.int64)
        num_slots = len(self.slots)
        # Each round reads a window of slots per key: one round settles most chains, so a small batch
        # costs a few NumPy calls rather than one round per slot of its longest chain.
        start = home_slots(keys, num_slots)
        active = np.arange(n)
        width = FIRST_WINDOW
        while active.size:
            window = start[:, None] + _WINDOW_OFFSETS[:width]
            window[window >= num_slots] -= num_slots
            entries = self.slots[window]
            match = self.keys[np.maximum(entries, 0)] == keys[active][:, None]
            match &= entries >= 0
            # A chain ends at its key or at an empty slot; tombstones and other keys continue it.
            stop = match | (entries == EMPTY)
            first = stop.argmax(axis=1)
            settled = stop[_rows(len(active)), first]
            hit = settled & match[_rows(len(active)), first]
            row[active[hit]] = entries[hit, first[hit]]
            slot[active[hit]] = window[hit, first[hit]]
            going = ~settled
            active = active[going]
            start = start[going] + width
            start[start >= num_slots] -= num_slots
            width = LATER_WINDOW
        return row, slot

    def place(self, first_row: int, last_row: int) -> None:
        """Writes rows [first_row, last_row) (keys known absent from the index) into empty slots."""
        num_slots = len(self.slots)
        pending = np.arange(first_row, last_row)
        pos = home_slots(self.keys[first_row:last_row], num_slots)
        while pending.size:
            free = self.slots[pos] == EMPTY
            # Several rows may claim one slot in a round: the scatter keeps one, the rest probe on.
            self.slots[pos[free]] = pending[free]
            placed = np.zeros(pending.size, dtype=bool)
            placed[free] = self.slots[pos[free]] == pending[free]
            pending = pending[~placed]
            pos = pos[~placed] + 1
            pos[pos == num_slots] = 0

    def rebuild(self, rows: int) -> None:
        """Re-creates the slot index for `rows` rows, dropping tombstones."""
        self.slots = np.full(int(max(rows, MIN_ROWS) / REBUILT_LOAD) + 1, EMPTY, dtype=np.int32)
        self.tombstones = 0
        self.place(0, rows)

    def reserve(self, rows: int) -> None:
        """Makes room in the dense arrays for `rows` rows."""
        capacity = len(self.keys)
        if rows <= capacity:
            return
        capacity = max(rows, int(capacity * self.growth))
        if capacity > np.iinfo(np.int32).max:
            raise StorageError(f"hash_map: a table holds at most {np.iinfo(np.int32).max} rows")
        self.reallocate(capacity)

    def reallocate(self, capacity: int) -> None:
        """Moves the dense arrays to new ones of `capacity` rows (at least `rows`)."""
        keys = np.empty(capacity, dtype=np.int64)
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        stamps = np.zeros(capacity, dtype=np.uint32)
        keys[: self.rows] = self.keys[: self.rows]
        vectors[: self.rows] = self.vectors[: self.rows]
        stamps[: self.rows] = self.stamps[: self.rows]
        self.keys, self.vectors, self.stamps = keys, vectors, stamps

    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        # Unique over the reversed batch keeps the last occurrence of each key.
        unique, last = np.unique(keys[::-1], return_index=True)
        source = len(keys) - 1 - last
        row, _ = self.find(unique)
        present = row >= 0
        # Batch order for new rows: gathering them in ascending positions is far cheaper than in key order.
        new = np.sort(source[~present])
        start, end = self.rows, self.rows + len(new)
        # Room first, so a table that cannot grow is left exactly as it was.
        self.reserve(end)
        stamp = self.tick()
        self.vectors[row[present]] = vectors[source[present]]
        self.stamps[row[present]] = stamp
        if not len(new):
            return
        self.keys[start:end] = keys[new]
        self.vectors[start:end] = vectors[new]
        self.stamps[start:end] = stamp
        self.rows = end
        if end + self.tombstones > REBUILD_LOAD * len(self.slots):
            self.rebuild(end)
        else:
            self.place(start, end)

    def remove(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Deletes distinct rows (at index `slots`), moving tail rows into the holes to stay dense."""
        self.slots[slots] = TOMBSTONE
        self.tombstones += len(rows)
        kept = self.rows - len(rows)
        holes = rows[rows < kept]
        in_tail = np.zeros(len(rows), dtype=bool)
        in_tail[rows[rows >= kept] - kept] = True
        movers = np.flatnonzero(~in_tail) + kept
        _, mover_slots = self.find(self.keys[movers])
        self.keys[holes] = self.keys[movers]
        self.vectors[holes] = self.vectors[movers]
        self.stamps[holes] = self.stamps[movers]
        self.slots[mover_slots] = holes
        self.rows = kept
        # Give memory back after large evictions so bytes per row stay within budget.
        if kept < len(self.keys) // 2 and len(self.keys) > MIN_ROWS:
            self.reallocate(max(MIN_ROWS, int(kept * self.growth)))
            self.rebuild(kept)


class HashMapLevel(StorageLevel):
    """Tables held in this process's memory, bounded to `overflow_margin` rows each."""

    kind: ClassVar[str] = "hash_map"

    def __init__(
        self,
        *,
        overflow_margin: int = 2**63 - 1,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        seed: int | None = None,
    ) -> None:
        if overflow_margin < 1:
            raise ValueError(f"overflow_margin: must be at least 1, got {overflow_margin}")
        if overflow_policy not in ("evict_oldest", "evict_random"):
            raise ValueError(f"overflow_policy: must be evict_oldest or evict_random, got {overflow_policy!r}")
        if not 0 < overflow_resolution_target <= 1:
            raise ValueError(f"overflow_resolution_target: must be in (0, 1], got {overflow_resolution_target}")
        self.overflow_margin = overflow_margin
        self.overflow_policy = overflow_policy
        self.overflow_target = max(1, int(overflow_resolution_target * overflow_margin))
        self._rng = np.random.default_rng(seed)
        self._tables: dict[str, _Table] = {}
        self._tables_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: VolatileDbConfig) -> HashMapLevel:
        return cls(
            overflow_margin=config.overflow_margin,
            overflow_policy=config.overflow_policy,
            overflow_resolution_target=config.overflow_resolution_target,
        )

    def _table(self, table: str) -> _Table:
        try:
            return self._tables[table]
        except KeyError:
            raise UnknownTableError(f"hash_map: unknown table {table!r}") from None

    def create_table(self, table: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be at least 1, got {dim}")
        with self._tables_lock:
            existing = self._tables.get(table)
            if existing is None:
                self._tables[table] = _Table(dim)
            elif existing.dim != dim:
                raise StorageError(f"hash_map: table {table!r} has dim {existing.dim}, not {dim}")

    def dim(self, table: str) -> int:
        return self._table(table).dim

    def tables(self) -> list[str]:
        with self._tables_lock:
            return sorted(self._tables)

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self._table(table)
        keys = as_keys(keys)
        with t.lock:
            row, _ = t.find(keys)
            found = row >= 0
            # One gather for every key (misses read row 0, which always exists), then misses are zeroed:
            # cheaper than masked copies when most keys hit.
            out = np.take(t.vectors, np.where(found, row, 0), axis=0)
            hits = row[found]
            if hits.size:
                t.stamps[hits] = t.tick()
        out[~found] = 0
        return out, found

    def insert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        t = self._table(table)
        keys = as_keys(keys)
        vectors = as_vectors(vectors, len(keys), t.dim)
        if not len(keys):
            return
        with t.lock:
            t.upsert(keys, vectors)
            if t.rows > self.overflow_margin:
                self._resolve_overflow(table, t)

    def _resolve_overflow(self, table: str, t: _Table) -> None:
        excess = t.rows - self.overflow_target
        if self.overflow_policy == "evict_oldest":
            # overflow_target >= 1, so excess < rows and the partition index is valid.
            rows = np.argpartition(t.stamps[: t.rows], excess - 1)[:excess]
        else:
            rows = self._rng.choice(t.rows, size=excess, replace=False)
        rows = rows.astype(np.int64)
        _, slots = t.find(t.keys[rows])
        t.remove(rows, slots)
        log.debug("hash_map: table %r overflowed, evicted %d rows (%s)", table, excess, self.overflow_policy)

    def evict(self, table: str, keys: np.ndarray) -> int:
        t = self._table(table)
        keys = np.unique(as_keys(keys))
        with t.lock:
            row, slot = t.find(keys)
            present = row >= 0
            t.remove(row[present], slot[present])
        return int(np.count_nonzero(present))

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        t = self._table(table)
        keys = as_keys(keys)
        with t.lock:
            row, _ = t.find(keys)
        return row >= 0

    def size(self, table: str) -> int:
        return self._table(table).rows

    def memory_bytes(self, table: str) -> int:
        """Bytes held by `table`'s arrays (keys, vectors, access stamps, slot index), spare capacity included."""
        t = self._table(table)
        with t.lock:
            return t.memory_bytes()

    def dump(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        """Yields rows in storage order, each chunk copied under the table lock.

        Rows moved by an eviction running between two chunks may be missed or yielded twice.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be at least 1, got {chunk_rows}")
        t = self._table(table)
        start = 0
        while True:
            with t.lock:
                end = min(start + chunk_rows, t.rows)
                if start >= end:
                    return
                chunk = (t.keys[start:end].copy(), t.vectors[start:end].copy())
            yield chunk
            start = end

    def close(self) -> None:
        with self._tables_lock:
            self._tables.clear()
