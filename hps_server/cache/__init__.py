"""L1: the embedding cache in front of the storage levels, per device, holding one or several model tables.

This module states the interface the LookupSession relies on; gpu.py (CuPy kernels) and reference.py
(NumPy, same algorithm) implement it. Nothing here knows of storage levels or gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    rows: int
    capacity: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @classmethod
    def total(cls, stats: Iterable[CacheStats]) -> CacheStats:
        """The sum over several caches (a table's caches on several devices)."""
        items = list(stats)
        return cls(
            hits=sum(s.hits for s in items),
            misses=sum(s.misses for s in items),
            rows=sum(s.rows for s in items),
            capacity=sum(s.capacity for s in items),
        )


@dataclass(frozen=True)
class TableL1:
    """Where a table lives in L1: the caches holding it (one per device; sharded: one ShardedCache over them) and
    its table index inside them."""

    caches: tuple[EmbeddingCache, ...]
    index: int = 0

    def stats(self) -> CacheStats:
        """This table's hits, misses, rows and capacity, summed over its devices."""
        return CacheStats.total(cache.table_stats()[self.index] for cache in self.caches)

    def device_caches(self) -> tuple[EmbeddingCache, ...]:
        """The cache on each device holding the table: a sharded cache's shards (sharded.py), else `caches`."""
        return tuple(part for cache in self.caches for part in getattr(cache, "shards", (cache,)))


class EmbeddingCache(Protocol):
    """A bounded key -> vector cache of one or several tables (same dim) on one device; safe to call from
    several threads.

    Every operation takes an optional per-key table index (int array, values in [0, num_tables); None:
    every key is in table 0), so one call serves a request's keys of all its tables.
    """

    dim: int
    capacity: int
    capacities: tuple[int, ...]
    num_tables: int

    def query(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 or float16 [n, dim] host array with zero rows for misses, hit mask bool[n]); bumps hit rows'
        recency. `out` (a writable C-contiguous [n, dim] array of `dtype`, such as a region of a reply
        buffer) receives the vectors and is returned as them."""
        ...

    def replace(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        """Inserts rows, evicting the least recently used where a set is full."""
        ...

    def update(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        """Overwrites rows that are present; absent keys are ignored."""
        ...

    def invalidate(self, keys: np.ndarray, tables: np.ndarray | None = None) -> None:
        """Drops the keys if present."""
        ...

    def dump(self, table: int = 0) -> tuple[np.ndarray, ...]:
        """(keys ascending, vectors float32, ...) of every row `table` holds."""
        ...

    def stats(self) -> CacheStats:
        """The sum of table_stats()."""
        ...

    def table_stats(self) -> list[CacheStats]:
        """Hits, misses, rows held and capacity of each table, in table order."""
        ...
