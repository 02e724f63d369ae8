"""L1 in NumPy: the set-associative LRU embedding cache and the static table, vectorized, no GPU needed.

It is the oracle the CUDA kernels are tested against and the L1 on hosts without a GPU. It must stay
bit-for-bit the same algorithm as gpu.py and never loop over keys in Python.

The algorithm (gpu.py implements the same):

- A key hashes (layout.mix) to one of num_sets sets of `ways` slots. Each slot holds a key, a row and
  a stamp; stamp 0 marks an empty slot. A logical clock counts operations: a query stamps the slots
  it hits with clock+1, a replace stamps the keys it finds with clock+1 and those it inserts with
  clock+2.
- replace(keys, vectors): a key repeated in the batch takes its last row. Present keys are overwritten
  and stamped. Absent keys then go, set by set, into the slots not touched by this batch (stamp below
  the batch's), least recently used first: empty slots, then ascending (stamp, key). Where a set gets
  more absent keys than it has such slots, the smallest keys are kept: a rule that does not depend
  on the order the GPU processes them in.
- update(keys, vectors) overwrites present keys without touching their stamps; invalidate empties slots.
- Where a slot ends up inside its set is not observable: lookups and victims depend on keys and stamps.
"""

from __future__ import annotations

import threading

import numpy as np

from hps_server.cache import CacheStats
from hps_server.cache.layout import (
    MAX_WAYS,
    Geometry,
    check_dim,
    check_dtype,
    last_occurrences,
    mix,
    set_of,
)
from hps_server.storage.base import as_keys, as_vectors


class ReferenceEmbeddingCache:
    """A bounded LRU cache of one table's rows in host memory; safe to call from several threads."""

    def __init__(self, capacity: int, dim: int, *, ways: int = MAX_WAYS, dtype: str = "float32") -> None:
        self.geometry = Geometry.for_capacity(capacity, ways)
        self.dim = check_dim(dim)
        self.dtype = check_dtype(dtype)
        self.capacity = self.geometry.capacity
        self.clock = 0
        sets, ways = self.geometry.num_sets, self.geometry.ways
        self._keys = np.zeros((sets, ways), np.int64)
        self._stamps = np.zeros((sets, ways), np.int64)
        self._rows = np.zeros((sets * ways, self.dim), self.dtype)
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lookups

    def query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors, hit, _ = self.query_misses(keys)
        return vectors, hit

    def query_misses(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors float32[n, dim] with zero rows for misses, hit bool[n], indices of the misses int64)."""
        keys = as_keys(keys)
        vectors = np.zeros((keys.size, self.dim), np.float32)
        if not keys.size:
            return vectors, np.zeros(0, bool), np.zeros(0, np.int64)
        with self._lock:
            self.clock += 1
            slots = self._find(keys)
            hit = slots >= 0
            found = slots[hit]
            self._stamps.reshape(-1)[found] = self.clock
            vectors[hit] = self._rows[found]
            hits = int(np.count_nonzero(hit))
            self._hits += hits
            self._misses += keys.size - hits
        return vectors, hit, np.flatnonzero(~hit)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Flat slot index of each key, -1 where absent."""
        ways = self.geometry.ways
        sets = set_of(mix(keys), self.geometry.num_sets)
        match = (self._keys[sets] == keys[:, None]) & (self._stamps[sets] != 0)
        way = match.argmax(axis=1)
        return np.where(match.any(axis=1), sets * ways + way, -1)

    # ------------------------------------------------------------ writes

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        if not keys.size:
            return
        distinct, last = last_occurrences(keys)
        rows = vectors[last]
        with self._lock:
            touched = self.clock + 1
            inserted = self.clock + 2
            self.clock += 2
            slots = self._find(distinct)
            present = slots >= 0
            self._rows[slots[present]] = rows[present]
            self._stamps.reshape(-1)[slots[present]] = touched
            self._insert(distinct[~present], rows[~present], touched, inserted)

    def _insert(self, keys: np.ndarray, rows: np.ndarray, touched: int, inserted: int) -> None:
        if not keys.size:
            return
        ways = self.geometry.ways
        sets = set_of(mix(keys), self.geometry.num_sets)
        order = np.lexsort((keys, sets))  # grouped by set, ascending key inside a set
        keys, rows, sets = keys[order], rows[order], sets[order]
        used, starts, counts = np.unique(sets, return_index=True, return_counts=True)
        group = np.repeat(np.arange(used.size), counts)
        rank = np.arange(keys.size) - starts[group]
        stamps = self._stamps[used]
        free = stamps < touched
        victims = np.lexsort((self._keys[used], stamps, ~free), axis=1)
        keep = rank < free.sum(axis=1)[group]
        way = victims[group[keep], rank[keep]]
        self._keys[sets[keep], way] = keys[keep]
        self._stamps[sets[keep], way] = inserted
        self._rows[sets[keep] * ways + way] = rows[keep]

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        if not keys.size:
            return
        distinct, last = last_occurrences(keys)
        with self._lock:
            slots = self._find(distinct)
            present = slots >= 0
            self._rows[slots[present]] = vectors[last[present]]

    def invalidate(self, keys: np.ndarray) -> None:
        keys = as_keys(keys)
        if not keys.size:
            return
        with self._lock:
            slots = self._find(keys)
            self._stamps.reshape(-1)[slots[slots >= 0]] = 0

    # ------------------------------------------------------------ inspection

    def dump(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32, stamps) of every row held: the whole cache state that matters."""
        with self._lock:
            held = self._stamps.reshape(-1) != 0
            keys = self._keys.reshape(-1)[held]
            order = np.argsort(keys)
            return keys[order], self._rows[held][order].astype(np.float32), self._stamps.reshape(-1)[held][order]

    def stats(self) -> CacheStats:
        with self._lock:
            rows = int(np.count_nonzero(self._stamps))
            return CacheStats(hits=self._hits, misses=self._misses, rows=rows, capacity=self.capacity)


class ReferenceStaticTable:
    """A fixed key set held whole (use_static_table): lookups are a search plus a gather; nothing is evicted.

    replace() rewrites rows of keys in the set (and makes invalidated ones live again); keys outside
    the set are ignored, as are update()s of dead keys. invalidate() hides keys until replaced.
    """

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, *, dtype: str = "float32") -> None:
        keys = as_keys(keys)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise ValueError(f"vectors: must be a 2-D array [rows, dim], got shape {array.shape}")
        self.dim = check_dim(array.shape[1])
        vectors = as_vectors(array, keys.size, self.dim)
        self.dtype = check_dtype(dtype)
        self._keys, last = last_occurrences(keys)
        self._rows = vectors[last].astype(self.dtype)
        self._live = np.ones(self._keys.size, bool)
        self.capacity = int(self._keys.size)
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def _find(self, keys: np.ndarray) -> np.ndarray:
        if not self._keys.size:
            return np.full(keys.size, -1, np.int64)
        at = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        return np.where(self._keys[at] == keys, at, -1)

    def query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors, hit, _ = self.query_misses(keys)
        return vectors, hit

    def query_misses(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_keys(keys)
        vectors = np.zeros((keys.size, self.dim), np.float32)
        with self._lock:
            rows = self._find(keys)
            hit = rows >= 0
            hit[hit] = self._live[rows[hit]]
            vectors[hit] = self._rows[rows[hit]]
            hits = int(np.count_nonzero(hit))
            self._hits += hits
            self._misses += keys.size - hits
        return vectors, hit, np.flatnonzero(~hit)

    def _write(self, keys: np.ndarray, vectors: np.ndarray, revive: bool) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        if not keys.size:
            return
        distinct, last = last_occurrences(keys)
        with self._lock:
            rows = self._find(distinct)
            known = rows >= 0
            if not revive:
                known[known] = self._live[rows[known]]
            self._rows[rows[known]] = vectors[last[known]]
            self._live[rows[known]] = True

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._write(keys, vectors, revive=True)

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._write(keys, vectors, revive=False)

    def invalidate(self, keys: np.ndarray) -> None:
        keys = as_keys(keys)
        with self._lock:
            rows = self._find(keys)
            self._live[rows[rows >= 0]] = False

    def dump(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32) of the live rows."""
        with self._lock:
            return self._keys[self._live], self._rows[self._live].astype(np.float32)

    def stats(self) -> CacheStats:
        with self._lock:
            rows = int(np.count_nonzero(self._live))
            return CacheStats(hits=self._hits, misses=self._misses, rows=rows, capacity=self.capacity)
