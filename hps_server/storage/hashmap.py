"""The in-process volatile level: vectorized NumPy open-addressing hash maps, one pool per dim.

Every table of one dim lives in that dim's pool, its rows keyed by (table id, key), so a batch over several
tables is one probe, one gather and one scatter. Whole batches go through a few NumPy calls per probing
round; it must never loop over keys in Python.

The same code runs over private NumPy memory (one process) or shared-memory segments (every worker of
`hps serve --processes N`; segments.py has the layout): the scalars every process must agree on (rows,
tombstones, clock, generations, capacities, per-table counts) live in the pool's state words, and each call
first re-attaches arrays another process reallocated. Reads hold the pool's lock shared and writes it
exclusive. Readers also write access stamps and the clock under the shared lock, so across processes
recency is approximate (a lost update makes a row look a batch older); it steers evict_oldest only and never
which vectors are returned. New rows are written before `rows` counts them and before the index points at
them, so the index never points past `rows`; a writer that dies inside a batch leaves the pool's dirty
word set, and the next process to lock it empties the pool instead of serving what was half-written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hps_server.config import VolatileDbConfig
from hps_server.storage import segments
from hps_server.storage.base import (
    DEFAULT_CHUNK_ROWS,
    KeyChunk,
    StorageError,
    StorageLevel,
    UnknownTableError,
    as_keys,
    as_vectors,
)
from hps_server.storage.segments import Arena, PoolMemory, RowArrays, SharedArena, SlotArray

log = logging.getLogger(__name__)

EMPTY = -1
TOMBSTONE = -2

# A table's id within its pool, stored next to every row: 2 bytes a row, up to 65536 tables of one dim.
TABLE_ID = np.uint16
MIN_ROWS = 1024
# The slot index is rebuilt at REBUILD_LOAD (live rows + tombstones per slot) to REBUILT_LOAD, which
# keeps linear-probing chains short while costing 4 / load bytes per row.
REBUILD_LOAD = 0.75
REBUILT_LOAD = 0.6
# Most bytes held per stored row, as a multiple of the raw key + vector bytes, for dim >= 16 (smaller
# dims pay more: the index, stamps and table ids are a fixed 12-13 bytes a row). Dense arrays grow by the
# largest factor that stays within it, so wide tables are copied less often.
MEMORY_BUDGET = 1.28
MIN_GROWTH = 1.0625
MAX_GROWTH = 1.5
# Bytes a row holds in the dense arrays besides its key and vector: access stamp and table id.
_ROW_EXTRA = np.dtype(np.uint32).itemsize + np.dtype(TABLE_ID).itemsize


def growth_factor(dim: int) -> float:
    """How much the dense arrays of a `dim` pool grow when full (see MEMORY_BUDGET)."""
    raw = 8 + 4 * dim
    # Worst case just after growing and rebuilding: growth * (raw + extra) + 4 / REBUILT_LOAD bytes a row.
    fitting = (MEMORY_BUDGET * raw - 4 / REBUILT_LOAD) / (raw + _ROW_EXTRA)
    return min(MAX_GROWTH, max(MIN_GROWTH, fitting))


_STAMP_LIMIT = np.iinfo(np.uint32).max
# Slots read per key in a lookup's first probing round, and in later rounds (only long chains get there).
# Large batches read few (gathers dominate); small ones read enough that one round nearly always
# settles every key (the NumPy calls of a second round would dominate).
FIRST_WINDOW = 4
SMALL_BATCH = 256
SMALL_BATCH_WINDOW = 16
LATER_WINDOW = 64
_WINDOW_OFFSETS = np.arange(LATER_WINDOW, dtype=np.int64)


def _rows(n: int) -> np.ndarray:
    return np.arange(n)


def _window(start: np.ndarray, width: int, num_slots: int) -> np.ndarray:
    """The `width` slots from each start slot on, wrapping at the end of the index: int64[len(start), width]."""
    window = start[:, None] + _WINDOW_OFFSETS[:width]
    window[window >= num_slots] -= num_slots
    return window


def home_slots(table_ids: np.ndarray, keys: np.ndarray, num_slots: int) -> np.ndarray:
    """First slot probed for each (table id, key): a 64-bit mix of both mapped onto [0, num_slots)."""
    # The golden-ratio multiple spreads table ids over all 64 bits; table id 0 leaves the key as it is.
    x = keys.view(np.uint64) ^ (table_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    # Multiply-shift range reduction works for any table size, so the index need not be a power of two.
    return (((x >> np.uint64(32)) * np.uint64(num_slots)) >> np.uint64(32)).astype(np.int64)


class _Pool:
    """The tables of one dim: dense rows [0, rows) of (table id, key, stamp, vector) plus an int32 slot
    index pointing into them, and each table's row count, all in `memory` (private or shared).

    Callers hold `reading()` or `writing()`; both first re-attach arrays another process reallocated."""

    def __init__(self, dim: int, memory: PoolMemory) -> None:
        self.dim = dim
        self.growth = growth_factor(dim)
        self.memory = memory
        self.state = memory.state
        # Names of the pool's tables by id, as this process knows them (the level's registry fills it).
        self.names: list[str] = []
        self.counts = memory.counts(0)
        with memory.lock.hold(exclusive=True):
            if self.state[segments.ROWS_GEN]:  # another process made the pool
                self._use_rows(self._open_rows())
                self._use_slots(self._open_slots())
                self.counts = memory.counts(int(self.state[segments.NUM_TABLES]))
                return
            self._use_rows(memory.new_rows(1, MIN_ROWS, dim))
            self._use_slots(self._empty_slots(MIN_ROWS, 1))
            self.state[segments.CAPACITY] = MIN_ROWS
            self.state[segments.NUM_SLOTS] = len(self.slots)
            self.state[segments.ROWS_GEN] = self.state[segments.INDEX_GEN] = 1

    # The scalars every process must agree on live in the state words.
    @property
    def rows(self) -> int:
        return int(self.state[segments.ROWS])

    @rows.setter
    def rows(self, value: int) -> None:
        self.state[segments.ROWS] = value

    @property
    def tombstones(self) -> int:
        return int(self.state[segments.TOMBSTONES])

    @tombstones.setter
    def tombstones(self, value: int) -> None:
        self.state[segments.TOMBSTONES] = value

    @property
    def clock(self) -> int:
        return int(self.state[segments.CLOCK])

    @clock.setter
    def clock(self, value: int) -> None:
        self.state[segments.CLOCK] = value

    def _use_rows(self, arrays: RowArrays) -> None:
        self._rows_arrays = arrays
        self.table_ids, self.keys, self.stamps, self.vectors = (
            arrays.table_ids,
            arrays.keys,
            arrays.stamps,
            arrays.vectors,
        )

    def _use_slots(self, slots: SlotArray) -> None:
        self._slot_array = slots
        self.slots = slots.slots

    def _empty_slots(self, rows: int, generation: int) -> SlotArray:
        fresh = self.memory.new_slots(generation, int(max(rows, MIN_ROWS) / REBUILT_LOAD) + 1)
        fresh.slots.fill(EMPTY)
        return fresh

    def _open_rows(self) -> RowArrays:
        state = self.state
        return self.memory.open_rows(int(state[segments.ROWS_GEN]), int(state[segments.CAPACITY]), self.dim)

    def _open_slots(self) -> SlotArray:
        return self.memory.open_slots(int(self.state[segments.INDEX_GEN]), int(self.state[segments.NUM_SLOTS]))

    def _attach(self) -> None:
        """Maps the arrays of the generations the state names where this process maps older ones (another
        process reallocated or rebuilt them), and counts the tables others added."""
        state = self.state
        if self._rows_arrays.generation != state[segments.ROWS_GEN]:
            self._use_rows(self._open_rows())
        if self._slot_array.generation != state[segments.INDEX_GEN]:
            self._use_slots(self._open_slots())
        if len(self.counts) != state[segments.NUM_TABLES]:
            self.counts = self.memory.counts(int(state[segments.NUM_TABLES]))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """The pool to read (find, gather; access stamps are written too, see the module docstring)."""
        with self.memory.lock.hold(exclusive=False):
            self._attach()
            if not self.state[segments.DIRTY]:
                yield
                return
        # A writer died mid-batch: only a writer may repair it.
        with self.writing():
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The pool to write, alone; a pool a killed writer left half-written is emptied first."""
        with self.memory.lock.hold(exclusive=True):
            self._attach()
            if self.state[segments.DIRTY]:
                log.warning("hash_map: a process died while writing the tables of dim %d; emptying them", self.dim)
                self.clear()
            # Set until the batch is done: only a process that dies inside leaves it set (an exception
            # leaves the pool as consistent as it does in one process).
            self.state[segments.DIRTY] = 1
            try:
                yield
            finally:
                self.state[segments.DIRTY] = 0

    def clear(self) -> None:
        """Drops every row (the level is a cache: they are fetched again from below)."""
        self.rows = 0
        self.counts[:] = 0
        self.reallocate(MIN_ROWS)
        self.rebuild(0)

    def add_table(self, name: str) -> int:
        """The id of a new table in this pool (the next in the level's registry); callers hold writing()."""
        table_id = len(self.names)
        if table_id > np.iinfo(TABLE_ID).max:
            raise StorageError(f"hash_map: at most {np.iinfo(TABLE_ID).max + 1} tables of dim {self.dim}")
        self.counts = self.memory.counts(table_id + 1)
        self.names.append(name)
        # Another process may have counted this table already: it replays the same registry.
        self.state[segments.NUM_TABLES] = max(int(self.state[segments.NUM_TABLES]), table_id + 1)
        return table_id

    def tick(self) -> np.uint32:
        """The stamp for the current batch; renumbers stamps by rank before the counter wraps."""
        if self.clock >= _STAMP_LIMIT:
            ranks = np.unique(self.stamps[: self.rows], return_inverse=True)[1]
            self.stamps[: self.rows] = ranks
            self.clock = int(ranks.max(initial=0)) + 1
        self.clock += 1
        return np.uint32(self.clock)

    def memory_bytes(self) -> int:
        arrays = (self.table_ids, self.keys, self.vectors, self.stamps, self.slots, self.counts)
        return sum(array.nbytes for array in arrays)

    def find(self, table_ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row int64[n], slot int64[n]) of each (table id, key); -1 for both where it is absent."""
        n = len(keys)
        row = np.full(n, -1, dtype=np.int64)
        slot = np.full(n, -1, dtype=np.int64)
        num_slots = len(self.slots)
        # Each round reads a window of slots per key: one round settles most chains, so a small batch
        # costs a few NumPy calls rather than one round per slot of its longest chain.
        start = home_slots(table_ids, keys, num_slots)
        active = np.arange(n)
        width = SMALL_BATCH_WINDOW if n <= SMALL_BATCH else FIRST_WINDOW
        while active.size:
            window = _window(start, width, num_slots)
            entries = self.slots[window]
            stored = np.maximum(entries, 0)
            match = self.keys[stored] == keys[active][:, None]
            match &= self.table_ids[stored] == table_ids[active][:, None]
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
        """Writes rows [first_row, last_row) (known absent from the index) into empty slots: each into the
        first empty slot of its chain, so find() reaches it. While many rows are pending a round reads one
        slot per row; once few are, a window of slots per row (as find() does), so a write-back's few rows
        take a few rounds rather than one per slot of the longest chain."""
        num_slots = len(self.slots)
        pending = np.arange(first_row, last_row)
        pos = home_slots(self.table_ids[first_row:last_row], self.keys[first_row:last_row], num_slots)
        while pending.size:
            width = SMALL_BATCH_WINDOW if pending.size <= SMALL_BATCH else 1
            window = _window(pos, width, num_slots)
            empty = self.slots[window] == EMPTY
            first = empty.argmax(axis=1)
            free = empty[_rows(len(pending)), first]
            target = window[_rows(len(pending)), first]
            # Several rows may claim one slot in a round: the scatter keeps one, the rest probe on from it.
            self.slots[target[free]] = pending[free]
            placed = np.zeros(pending.size, dtype=bool)
            placed[free] = self.slots[target[free]] == pending[free]
            pos = np.where(free, target + 1, pos + width)[~placed]
            pos[pos >= num_slots] -= num_slots
            pending = pending[~placed]

    def rebuild(self, rows: int) -> None:
        """Re-creates the slot index for `rows` rows, dropping tombstones; published once complete."""
        old = self._slot_array
        self._use_slots(self._empty_slots(rows, old.generation + 1))
        self.place(0, rows)
        self.tombstones = 0
        self.state[segments.NUM_SLOTS] = len(self.slots)
        self.state[segments.INDEX_GEN] = self._slot_array.generation
        self.memory.retire(old)

    def reserve(self, rows: int) -> None:
        """Makes room in the dense arrays for `rows` rows."""
        capacity = len(self.keys)
        if rows <= capacity:
            return
        capacity = max(rows, int(capacity * self.growth))
        if capacity > np.iinfo(np.int32).max:
            raise StorageError(f"hash_map: the tables of dim {self.dim} hold at most {np.iinfo(np.int32).max} rows")
        self.reallocate(capacity)

    def reallocate(self, capacity: int) -> None:
        """Moves the dense arrays to new ones of `capacity` rows (at least `rows`), then publishes them."""
        old = self._rows_arrays
        fresh = self.memory.new_rows(old.generation + 1, capacity, self.dim)
        rows = self.rows
        fresh.table_ids[:rows] = old.table_ids[:rows]
        fresh.keys[:rows] = old.keys[:rows]
        fresh.vectors[:rows] = old.vectors[:rows]
        fresh.stamps[:rows] = old.stamps[:rows]
        self._use_rows(fresh)
        self.state[segments.CAPACITY] = capacity
        self.state[segments.ROWS_GEN] = fresh.generation
        self.memory.retire(old)

    def upsert(self, table_ids: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> None:
        # A stable sort of the reversed batch by (table id, key) puts the last occurrence of each pair first.
        n = len(keys)
        order = np.lexsort((keys[::-1], table_ids[::-1]))
        sorted_keys, sorted_ids = keys[::-1][order], table_ids[::-1][order]
        first = np.ones(n, dtype=bool)
        first[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | (sorted_ids[1:] != sorted_ids[:-1])
        source = n - 1 - order[first]
        row, _ = self.find(table_ids[source], keys[source])
        present = row >= 0
        # Batch order for new rows: gathering them in ascending positions is far cheaper than in key order.
        new = np.sort(source[~present])
        start, end = self.rows, self.rows + len(new)
        # Room first, so a pool that cannot grow is left exactly as it was.
        self.reserve(end)
        stamp = self.tick()
        self.vectors[row[present]] = vectors[source[present]]
        self.stamps[row[present]] = stamp
        if not len(new):
            return
        self.table_ids[start:end] = table_ids[new]
        self.keys[start:end] = keys[new]
        self.vectors[start:end] = vectors[new]
        self.stamps[start:end] = stamp
        self.counts += np.bincount(table_ids[new], minlength=len(self.counts))
        self.rows = end
        if end + self.tombstones > REBUILD_LOAD * len(self.slots):
            self.rebuild(end)
        else:
            self.place(start, end)

    def remove(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Deletes distinct rows (at index `slots`), moving tail rows into the holes to stay dense."""
        self.counts -= np.bincount(self.table_ids[rows], minlength=len(self.counts))
        self.slots[slots] = TOMBSTONE
        self.tombstones += len(rows)
        kept = self.rows - len(rows)
        holes = rows[rows < kept]
        in_tail = np.zeros(len(rows), dtype=bool)
        in_tail[rows[rows >= kept] - kept] = True
        movers = np.flatnonzero(~in_tail) + kept
        _, mover_slots = self.find(self.table_ids[movers], self.keys[movers])
        self.table_ids[holes] = self.table_ids[movers]
        self.keys[holes] = self.keys[movers]
        self.vectors[holes] = self.vectors[movers]
        self.stamps[holes] = self.stamps[movers]
        self.slots[mover_slots] = holes
        self.rows = kept
        # Give memory back after large evictions so bytes per row stay within budget.
        if kept < len(self.keys) // 2 and len(self.keys) > MIN_ROWS:
            self.reallocate(max(MIN_ROWS, int(kept * self.growth)))
            self.rebuild(kept)

    def rows_of(self, table_id: int) -> np.ndarray:
        """Positions of every row of one table."""
        return np.flatnonzero(self.table_ids[: self.rows] == table_id)

    def next_rows_of(self, table_id: int, start: int, limit: int) -> tuple[np.ndarray, int]:
        """(positions of the next `limit` rows of one table at or after `start`, where to go on from).

        Reads windows that double in size, so a chunk of a table holding a small share of the pool costs
        a few NumPy calls, not one scan of the whole pool per chunk."""
        found: list[np.ndarray] = []
        span = limit
        while limit and start < self.rows:
            end = min(start + span, self.rows)
            hits = np.flatnonzero(self.table_ids[start:end] == table_id)[:limit] + start
            if len(hits) == limit:
                end = int(hits[-1]) + 1
            found.append(hits)
            limit -= len(hits)
            start = end
            span *= 2
        return (np.concatenate(found) if found else np.empty(0, dtype=np.int64)), start


@dataclass(frozen=True)
class _Table:
    """Where a table's rows live: its pool (the one of its dim) and its id there."""

    pool: _Pool
    id: int


class HashMapLevel(StorageLevel):
    """Tables held in this process's memory, bounded to `overflow_margin` rows each.

    The tables of one dim share one pool (one lock, one hash index), so `fetch_many` / `insert_many` over
    them cost one probe, gather and scatter however many tables the batch names.
    """

    kind: ClassVar[str] = "hash_map"

    def __init__(
        self,
        *,
        overflow_margin: int = 2**63 - 1,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        seed: int | None = None,
        arena: Arena | None = None,
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
        # Private memory unless given shared memory (create_shared, or attached by from_config).
        self._arena = arena or Arena()
        self._tables: dict[str, _Table] = {}
        self._pools: dict[int, _Pool] = {}
        # Registry entries this process has turned into _Tables (the registry only grows).
        self._known = 0

    @classmethod
    def from_config(cls, config: VolatileDbConfig) -> HashMapLevel:
        """A level in this process's memory, or attached to the shared one config.shared_memory names."""
        return cls(
            overflow_margin=config.overflow_margin,
            overflow_policy=config.overflow_policy,
            overflow_resolution_target=config.overflow_resolution_target,
            arena=SharedArena(config.shared_memory, owner=False) if config.shared_memory else None,
        )

    @classmethod
    def create_shared(cls, config: VolatileDbConfig) -> HashMapLevel:
        """A new level in shared memory, owned by this process (close() unlinks it); other processes
        attach to it with from_config(replace(config, shared_memory=level.shared_name))."""
        level = cls.from_config(config)
        level._arena = SharedArena(segments.unique_name(), owner=True)
        return level

    @property
    def shared_name(self) -> str:
        """The name other processes attach by; empty for a level in private memory."""
        return self._arena.shared_name

    def _sync_registry(self) -> None:
        """Turns tables other processes registered into _Tables; callers hold the registry lock."""
        entries = self._arena.registry()
        dims = list(dict.fromkeys(dim for _, dim in entries))
        for name, dim in entries[self._known :]:
            pool = self._pools.get(dim)
            if pool is None:
                pool = self._pools[dim] = _Pool(dim, self._arena.pool(dims.index(dim)))
            with pool.writing():
                self._tables[name] = _Table(pool, pool.add_table(name))
        self._known = len(entries)

    def _table(self, table: str) -> _Table:
        found = self._tables.get(table)
        if found is None:
            with self._arena.registry_lock.hold(exclusive=False):
                self._sync_registry()
            found = self._tables.get(table)
        if found is None:
            raise UnknownTableError(f"hash_map: unknown table {table!r}")
        return found

    def create_table(self, table: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be at least 1, got {dim}")
        with self._arena.registry_lock.hold(exclusive=True):
            self._sync_registry()
            existing = self._tables.get(table)
            if existing is not None:
                if existing.pool.dim != dim:
                    raise StorageError(f"hash_map: table {table!r} has dim {existing.pool.dim}, not {dim}")
                return
            entries = [*self._arena.registry(), (table, dim)]
            if len([name for name, d in entries if d == dim]) > np.iinfo(TABLE_ID).max + 1:
                raise StorageError(f"hash_map: at most {np.iinfo(TABLE_ID).max + 1} tables of dim {dim}")
            # Registered first, then its pool made: a process killed in between leaves a table whose pool
            # the next process to read the registry makes. A pool that cannot be made (no memory for it)
            # takes its table out again, so no later call trips over it.
            self._arena.set_registry(entries)
            try:
                self._sync_registry()
            except BaseException:
                self._arena.set_registry(entries[:-1])
                raise

    def dim(self, table: str) -> int:
        return self._table(table).pool.dim

    def tables(self) -> list[str]:
        with self._arena.registry_lock.hold(exclusive=False):
            self._sync_registry()
            return sorted(self._tables)

    def _ids(self, table: str, keys: object) -> tuple[_Pool, np.ndarray, np.ndarray]:
        """(pool, table ids, keys) of a one-table batch."""
        t = self._table(table)
        keys = as_keys(keys)
        return t.pool, np.full(len(keys), t.id, dtype=TABLE_ID), keys

    def _many_ids(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray
    ) -> tuple[_Pool, np.ndarray, np.ndarray]:
        """(pool, table ids, keys) of a several-table batch, checked; tables of one dim share a pool."""
        keys, index, dim = self._table_batch(tables, keys, table_index)
        ids = np.array([self._table(name).id for name in tables], dtype=TABLE_ID)
        return self._pools[dim], ids[index], keys

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._fetch(*self._ids(table, keys))

    def fetch_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._fetch(*self._many_ids(tables, keys, table_index))

    def _fetch(self, pool: _Pool, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with pool.reading():
            row, _ = pool.find(ids, keys)
            found = row >= 0
            # One gather for every key (misses read row 0, which always exists), then misses are zeroed:
            # cheaper than masked copies when most keys hit.
            out = np.take(pool.vectors, np.where(found, row, 0), axis=0)
            hits = row[found]
            if hits.size:
                pool.stamps[hits] = pool.tick()
        out[~found] = 0
        return out, found

    def insert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        pool, ids, keys = self._ids(table, keys)
        self._insert(pool, ids, keys, as_vectors(vectors, len(keys), pool.dim))

    def insert_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray
    ) -> None:
        pool, ids, keys = self._many_ids(tables, keys, table_index)
        self._insert(pool, ids, keys, as_vectors(vectors, len(keys), pool.dim))

    def _insert(self, pool: _Pool, ids: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> None:
        if not len(keys):
            return
        with pool.writing():
            pool.upsert(ids, keys, vectors)
            # Only tables this batch wrote to can be over: every earlier write resolved its own overflow.
            for table_id in np.flatnonzero(pool.counts > self.overflow_margin):
                self._resolve_overflow(pool, int(table_id))

    def _resolve_overflow(self, pool: _Pool, table_id: int) -> None:
        """Evicts rows of one table (never of the others in its pool) down to overflow_target."""
        candidates = pool.rows_of(table_id)
        excess = len(candidates) - self.overflow_target
        if self.overflow_policy == "evict_oldest":
            # overflow_target >= 1, so excess < len(candidates) and the partition index is valid.
            rows = candidates[np.argpartition(pool.stamps[candidates], excess - 1)[:excess]]
        else:
            rows = self._rng.choice(candidates, size=excess, replace=False)
        _, slots = pool.find(pool.table_ids[rows], pool.keys[rows])
        pool.remove(rows, slots)
        log.debug(
            "hash_map: table %d of dim %d overflowed, evicted %d rows (%s)",
            table_id,
            pool.dim,
            excess,
            self.overflow_policy,
        )

    def evict(self, table: str, keys: np.ndarray) -> int:
        t = self._table(table)
        keys = np.unique(as_keys(keys))
        with t.pool.writing():
            row, slot = t.pool.find(np.full(len(keys), t.id, dtype=TABLE_ID), keys)
            present = row >= 0
            t.pool.remove(row[present], slot[present])
        return int(np.count_nonzero(present))

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        pool, ids, keys = self._ids(table, keys)
        with pool.reading():
            row, _ = pool.find(ids, keys)
        return row >= 0

    def size(self, table: str) -> int:
        t = self._table(table)
        return int(t.pool.counts[t.id])

    def memory_bytes(self, table: str) -> int:
        """`table`'s share of its pool's arrays (table ids, keys, vectors, access stamps, slot index, row
        counts; spare capacity included): the pool's bytes times the table's share of the pool's rows, or an
        equal share of each table in an empty pool. The shares of a pool's tables add up to its bytes
        (give or take rounding)."""
        t = self._table(table)
        with t.pool.reading():
            total = t.pool.memory_bytes()
            if t.pool.rows:
                return total * int(t.pool.counts[t.id]) // t.pool.rows
            return total // len(t.pool.names)

    def occupancy(self, table: str) -> tuple[int, int | None]:
        return self.size(table), self.memory_bytes(table)

    def dump(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        """Yields the table's rows in storage order, each chunk copied under the pool lock.

        Rows moved by an eviction running between two chunks may be missed or yielded twice.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be at least 1, got {chunk_rows}")
        t = self._table(table)
        start = 0
        while True:
            with t.pool.reading():
                positions, start = t.pool.next_rows_of(t.id, start, chunk_rows)
                if not len(positions):
                    return
                # Fancy indexing copies, so the chunk stays valid after the lock is let go.
                chunk = (t.pool.keys[positions], t.pool.vectors[positions])
            yield chunk

    def close(self) -> None:
        """Lets go of the tables; the owner of a shared level unlinks its segments (processes still
        attached keep their mappings until they close)."""
        with self._arena.registry_lock.hold(exclusive=False):
            self._tables.clear()
            for pool in self._pools.values():
                pool.memory.close()
            self._pools.clear()
        self._arena.close()
