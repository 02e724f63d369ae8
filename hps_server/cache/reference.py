"""L1 in NumPy: the set-associative LRU embedding cache and the static table, vectorized, no GPU needed.

It is the oracle the CUDA kernels are tested against and the L1 on hosts without a GPU. It must stay
bit-for-bit the same algorithm as gpu.py and never loop over keys or tables in Python.

The algorithm (gpu.py implements the same):

- One cache holds one or several tables of the same dim; every operation takes a table index per key
  (all 0 when omitted). Table t has its own geometry, Geometry.for_capacity(capacity[t], ways): num_sets[t]
  sets of ways[t] slots. The tables' sets are laid end to end (first_set[t] = the sets of the tables
  before t), and a key k of table t lives in global set first_set[t] + set_of(mix(k), num_sets[t]).
  Set ranges are disjoint, so each table behaves exactly as a cache of its own would: only the logical
  clock below is shared.
- Each slot holds a key, a row and a stamp; stamp 0 marks an empty slot. A logical clock counts
  operations: a query stamps the slots it hits with clock+1, a replace stamps the keys it finds with
  clock+1 and those it inserts with clock+2.
- replace(keys, vectors): a (table, key) pair repeated in the batch takes its last row (the same key
  in two tables is two rows). Present keys are overwritten and stamped. Absent keys then go, set by
  set, into the slots not touched by this batch (stamp below the batch's), least recently used first:
  empty slots, then ascending (stamp, key). Where a set gets more absent keys than it has such slots,
  the smallest keys are kept: a rule that does not depend on the order the GPU processes them in.
- update(keys, vectors) overwrites present keys without touching their stamps; invalidate empties slots.
- Where a slot ends up inside its set is not observable: lookups and victims depend on keys and stamps.
- Replies are float32 or float16 rows (the row held, rounded to nearest even where it is narrowed).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from hps_server.cache import CacheStats
from hps_server.cache.layout import (
    MAX_WAYS,
    TableSets,
    as_tables,
    check_dim,
    check_dtype,
    check_table,
    last_occurrences,
    query_destination,
    static_table_count,
)
from hps_server.storage.base import as_keys, as_vectors


def _table_stats(
    hits: np.ndarray, queried: np.ndarray, rows: np.ndarray, capacities: Sequence[int]
) -> list[CacheStats]:
    return [
        CacheStats(hits=int(h), misses=int(q - h), rows=int(r), capacity=int(c))
        for h, q, r, c in zip(hits, queried, rows, capacities, strict=True)
    ]


class ReferenceEmbeddingCache:
    """A bounded LRU cache of one or several tables' rows in host memory; safe to call from several threads."""

    def __init__(
        self, capacity: int | Sequence[int], dim: int, *, ways: int = MAX_WAYS, dtype: str = "float32"
    ) -> None:
        self.layout = TableSets(capacity, ways)
        self.geometries = self.layout.geometries
        self.num_tables = self.layout.num_tables
        self.capacities = tuple(g.capacity for g in self.geometries)
        self.capacity = sum(self.capacities)
        self.dim = check_dim(dim)
        self.dtype = check_dtype(dtype)
        self.clock = 0
        sets, stride = self.layout.total_sets, self.layout.stride
        self._keys = np.zeros((sets, stride), np.int64)
        self._stamps = np.zeros((sets, stride), np.int64)
        self._rows = np.zeros((sets * stride, self.dim), self.dtype)
        self._set_ways = np.repeat(self.layout.ways, self.layout.num_sets)
        self._hits = np.zeros(self.num_tables, np.int64)
        self._queried = np.zeros(self.num_tables, np.int64)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lookups

    def query(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors, hit, _ = self.query_misses(keys, tables, dtype=dtype, out=out)
        return vectors, hit

    def query_misses(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors [n, dim] of `dtype` with zero rows for misses, in `out` when given; hit bool[n]; indices of
        the misses int64)."""
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        vectors = query_destination(out, keys.size, self.dim, check_dtype(dtype))
        if not keys.size:
            return vectors, np.zeros(0, bool), np.zeros(0, np.int64)
        sets = self.layout.sets_of(keys, tables)
        with self._lock:
            self.clock += 1
            slots = self._find(keys, sets)
            hit = slots >= 0
            found = slots[hit]
            self._stamps.reshape(-1)[found] = self.clock
            vectors[hit] = self._rows[found]
            if out is not None:
                vectors[~hit] = 0
            self._hits += np.bincount(tables[hit], minlength=self.num_tables)
            self._queried += np.bincount(tables, minlength=self.num_tables)
        return vectors, hit, np.flatnonzero(~hit)

    def _find(self, keys: np.ndarray, sets: np.ndarray) -> np.ndarray:
        """Flat slot index of each key in its global set, -1 where absent (a set holds one table's keys only)."""
        match = (self._keys[sets] == keys[:, None]) & (self._stamps[sets] != 0)
        way = match.argmax(axis=1)
        return np.where(match.any(axis=1), sets * self.layout.stride + way, -1)

    # ------------------------------------------------------------ writes

    def replace(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        tables = as_tables(tables, keys.size, self.num_tables)
        if not keys.size:
            return
        distinct, owners, last = last_occurrences(keys, tables)
        rows = vectors[last]
        sets = self.layout.sets_of(distinct, owners)
        with self._lock:
            touched = self.clock + 1
            inserted = self.clock + 2
            self.clock += 2
            slots = self._find(distinct, sets)
            present = slots >= 0
            self._rows[slots[present]] = rows[present]
            self._stamps.reshape(-1)[slots[present]] = touched
            self._insert(distinct[~present], sets[~present], rows[~present], touched, inserted)

    def _insert(self, keys: np.ndarray, sets: np.ndarray, rows: np.ndarray, touched: int, inserted: int) -> None:
        if not keys.size:
            return
        stride = self.layout.stride
        order = np.lexsort((keys, sets))  # grouped by set, ascending key inside a set
        keys, rows, sets = keys[order], rows[order], sets[order]
        used, starts, counts = np.unique(sets, return_index=True, return_counts=True)
        group = np.repeat(np.arange(used.size), counts)
        rank = np.arange(keys.size) - starts[group]
        stamps = self._stamps[used]
        # A slot past its table's ways is never a candidate (a table whose capacity is below `ways`).
        free = (stamps < touched) & (np.arange(stride) < self._set_ways[used][:, None])
        victims = np.lexsort((self._keys[used], stamps, ~free), axis=1)
        keep = rank < free.sum(axis=1)[group]
        way = victims[group[keep], rank[keep]]
        self._keys[sets[keep], way] = keys[keep]
        self._stamps[sets[keep], way] = inserted
        self._rows[sets[keep] * stride + way] = rows[keep]

    def update(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        tables = as_tables(tables, keys.size, self.num_tables)
        if not keys.size:
            return
        distinct, owners, last = last_occurrences(keys, tables)
        sets = self.layout.sets_of(distinct, owners)
        with self._lock:
            slots = self._find(distinct, sets)
            present = slots >= 0
            self._rows[slots[present]] = vectors[last[present]]

    def invalidate(self, keys: np.ndarray, tables: np.ndarray | None = None) -> None:
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        if not keys.size:
            return
        sets = self.layout.sets_of(keys, tables)
        with self._lock:
            slots = self._find(keys, sets)
            self._stamps.reshape(-1)[slots[slots >= 0]] = 0

    # ------------------------------------------------------------ inspection

    def dump(self, table: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32, stamps) of every row `table` holds: the whole state that matters."""
        table = check_table(table, self.num_tables)
        first = int(self.layout.first_set[table])
        end = first + int(self.layout.num_sets[table])
        stride = self.layout.stride
        with self._lock:
            stamps = self._stamps[first:end].reshape(-1)
            held = stamps != 0
            keys = self._keys[first:end].reshape(-1)[held]
            order = np.argsort(keys)
            rows = self._rows[first * stride : end * stride][held]
            return keys[order], rows[order].astype(np.float32), stamps[held][order]

    def stats(self) -> CacheStats:
        return CacheStats.total(self.table_stats())

    def table_stats(self) -> list[CacheStats]:
        """Hits, misses, rows held and capacity of each table, in table order."""
        with self._lock:
            rows = self.layout.per_table(np.count_nonzero(self._stamps, axis=1))
            return _table_stats(self._hits, self._queried, rows, self.capacities)


class ReferenceStaticTable:
    """Fixed key sets of one or several tables held whole (use_static_table): a search plus a gather; no eviction.

    replace() rewrites rows of (table, key) pairs in the set (and makes invalidated ones live again);
    pairs outside the set are ignored, as are update()s of dead ones. invalidate() hides pairs until
    replaced. Pairs are found by two binary searches: a key's rank among all the key values held, then
    the exact pair as table * distinct values + rank, a single int64 per pair.
    """

    def __init__(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        *,
        tables: np.ndarray | None = None,
        num_tables: int | None = None,
        dtype: str = "float32",
    ) -> None:
        keys = as_keys(keys)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise ValueError(f"vectors: must be a 2-D array [rows, dim], got shape {array.shape}")
        self.dim = check_dim(array.shape[1])
        vectors = as_vectors(array, keys.size, self.dim)
        self.dtype = check_dtype(dtype)
        self.num_tables = static_table_count(tables, num_tables)
        tables = as_tables(tables, keys.size, self.num_tables)
        distinct, owners, last = last_occurrences(keys, tables)
        self._keys = distinct  # ordered by (table, key): table t's rows are _keys[bounds[t]:bounds[t + 1]]
        self._bounds = np.searchsorted(owners, np.arange(self.num_tables + 1))
        self._values = np.unique(distinct)
        self._pairs = owners.astype(np.int64) * self._values.size + np.searchsorted(self._values, distinct)
        self._rows = vectors[last].astype(self.dtype)
        self._live = np.ones(distinct.size, bool)
        self.capacities = tuple(int(c) for c in np.diff(self._bounds))
        self.capacity = int(distinct.size)
        self._hits = np.zeros(self.num_tables, np.int64)
        self._queried = np.zeros(self.num_tables, np.int64)
        self._lock = threading.Lock()

    def _find(self, keys: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """Row of each (table, key) pair, -1 where the pair is not held."""
        if not self._values.size:
            return np.full(keys.size, -1, np.int64)
        rank = np.minimum(np.searchsorted(self._values, keys), self._values.size - 1)
        pairs = tables.astype(np.int64) * self._values.size + rank
        at = np.minimum(np.searchsorted(self._pairs, pairs), self._pairs.size - 1)
        return np.where((self._values[rank] == keys) & (self._pairs[at] == pairs), at, -1)

    def query(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors, hit, _ = self.query_misses(keys, tables, dtype=dtype, out=out)
        return vectors, hit

    def query_misses(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        vectors = query_destination(out, keys.size, self.dim, check_dtype(dtype))
        rows = self._find(keys, tables)
        with self._lock:
            hit = rows >= 0
            hit[hit] = self._live[rows[hit]]
            vectors[hit] = self._rows[rows[hit]]
            if out is not None:
                vectors[~hit] = 0
            self._hits += np.bincount(tables[hit], minlength=self.num_tables)
            self._queried += np.bincount(tables, minlength=self.num_tables)
        return vectors, hit, np.flatnonzero(~hit)

    def _write(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None, revive: bool) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        tables = as_tables(tables, keys.size, self.num_tables)
        if not keys.size:
            return
        distinct, owners, last = last_occurrences(keys, tables)
        rows = self._find(distinct, owners)
        with self._lock:
            known = rows >= 0
            if not revive:
                known[known] = self._live[rows[known]]
            self._rows[rows[known]] = vectors[last[known]]
            self._live[rows[known]] = True

    def replace(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._write(keys, vectors, tables, revive=True)

    def update(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._write(keys, vectors, tables, revive=False)

    def invalidate(self, keys: np.ndarray, tables: np.ndarray | None = None) -> None:
        keys = as_keys(keys)
        rows = self._find(keys, as_tables(tables, keys.size, self.num_tables))
        with self._lock:
            self._live[rows[rows >= 0]] = False

    def dump(self, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32) of `table`'s live rows."""
        table = check_table(table, self.num_tables)
        first, end = int(self._bounds[table]), int(self._bounds[table + 1])
        with self._lock:
            live = self._live[first:end]
            return self._keys[first:end][live], self._rows[first:end][live].astype(np.float32)

    def stats(self) -> CacheStats:
        return CacheStats.total(self.table_stats())

    def table_stats(self) -> list[CacheStats]:
        """Hits, misses, live rows and rows held of each table, in table order."""
        with self._lock:
            live = np.concatenate([[0], np.cumsum(self._live)])
            rows = live[self._bounds[1:]] - live[self._bounds[:-1]]
            return _table_stats(self._hits, self._queried, rows, self.capacities)
