"""L1 sharded over devices (gpu_placement: sharded): each (table, key) pair lives in one shard, picked by a
hash of the pair, so a table as large as the shards' sum is held; a request's keys go to their shards and
come back as one reply in the caller's order.

It routes and gathers only: the shards (GPU caches or the NumPy reference, one per device) hold the rows
and do the lookups. Routing is one vectorized pass per call, never a per-key loop.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from hps_server.cache import CacheStats, EmbeddingCache
from hps_server.cache.layout import as_tables, check_dtype, check_table, mix, query_destination
from hps_server.storage.base import as_keys, as_vectors

# Mixed into each key with its table before hashing, so a shard is not a function of the key's set hash
# (mix(key) alone): the keys of one shard still spread over all of the shard's sets.
_ROUTE_SEED = np.uint64(0x9E3779B97F4A7C15)


def shard_of(keys: np.ndarray, tables: np.ndarray, shards: int) -> np.ndarray:
    """The shard (uint8 or wider, in [0, shards)) of each (table, key) pair."""
    salted = keys.astype(np.int64, copy=False).view(np.uint64) ^ (tables.astype(np.uint64) + np.uint64(1)) * _ROUTE_SEED
    shard = mix(salted.view(np.int64)) % np.uint64(shards)
    # A narrow type makes the stable sort below a radix sort.
    return shard.astype(np.uint8 if shards <= 256 else np.uint32)


@dataclass(frozen=True)
class Route:
    """Where a batch's keys go: shard s gets the batch positions order[bounds[s]:bounds[s + 1]], in batch order."""

    order: np.ndarray
    bounds: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray, tables: np.ndarray, shards: int) -> Route:
        shard = shard_of(keys, tables, shards)
        order = np.argsort(shard, kind="stable")  # stable: a pair's repeats keep their order (last one wins)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=shards))])
        return cls(order, bounds)

    def positions(self, shard: int) -> np.ndarray:
        return self.order[self.bounds[shard] : self.bounds[shard + 1]]


Gather = Literal["host", "device"]


class ShardedCache:
    """One EmbeddingCache over several shards of the same tables and dim, one per device; thread-safe as its
    shards are. Shards with keys in a call are asked concurrently (a thread per extra shard).

    gather: how a query's rows reach the one reply. host: each shard replies into its own pinned buffer
    and its thread copies the rows into place; device (GPU shards only, gpu_gather.py): each shard's
    device writes its rows into place in the pinned reply itself. `hps bench cache --devices` measures both.
    """

    def __init__(self, shards: Sequence[EmbeddingCache], gather: Gather = "host") -> None:
        if not shards:
            raise ValueError("shards: needs at least one shard")
        first = shards[0]
        if any(s.dim != first.dim or s.num_tables != first.num_tables for s in shards):
            raise ValueError("shards: must all hold the same number of tables of the same dim")
        if gather not in ("host", "device"):
            raise ValueError(f"gather: must be host or device, got {gather!r}")
        if gather == "device" and not all(hasattr(s, "query_device") for s in shards):
            raise ValueError("gather: device needs GPU shards (a query_device on each)")
        self.gather = gather
        self.shards = tuple(shards)
        self.dim = first.dim
        self.num_tables = first.num_tables
        self.capacities = tuple(int(c) for c in np.sum([s.capacities for s in shards], axis=0))
        self.capacity = sum(self.capacities)
        self._pool = concurrent.futures.ThreadPoolExecutor(len(shards) - 1, "hps-l1-shard") if len(shards) > 1 else None

    def _each(self, route: Route, call: Callable[[EmbeddingCache, np.ndarray], None]) -> None:
        """call(shard, its batch positions) for every shard given keys, at the same time; the first in this thread."""
        asked = [(shard, route.positions(i)) for i, shard in enumerate(self.shards)]
        asked = [(shard, positions) for shard, positions in asked if positions.size]
        if self._pool is None or len(asked) < 2:
            for shard, positions in asked:
                call(shard, positions)
            return
        later = [self._pool.submit(call, shard, positions) for shard, positions in asked[1:]]
        try:
            call(*asked[0])
        finally:
            for future in later:
                future.result()

    # ------------------------------------------------------------ lookups

    def query(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        wanted = check_dtype(dtype)
        vectors = query_destination(out, keys.size, self.dim, wanted)
        route = Route.of(keys, tables, len(self.shards))
        if self.gather == "device" and keys.size:
            from hps_server.cache import gpu_gather

            reply = gpu_gather.MappedReply(keys.size, self.dim, wanted)
            self._each(route, lambda shard, at: gpu_gather.query_into(shard, reply, keys, tables, at))
            if out is None:
                return reply.vectors, reply.hit
            vectors[...] = reply.vectors
            return vectors, reply.hit
        hit = np.empty(keys.size, bool)

        def answer(shard: EmbeddingCache, at: np.ndarray) -> None:
            # Every position belongs to exactly one shard, whose reply (zero rows for misses) fills it; each
            # shard's thread copies its own rows in (NumPy lets go of the GIL there), so copies overlap.
            vectors[at], hit[at] = shard.query(keys[at], tables[at], dtype=wanted)

        self._each(route, answer)
        return vectors, hit

    # ------------------------------------------------------------ writes

    def replace(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._write("replace", keys, vectors, tables)

    def update(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._write("update", keys, vectors, tables)

    def invalidate(self, keys: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._write("invalidate", keys, None, tables)

    def _write(self, op: str, keys: np.ndarray, vectors: np.ndarray | None, tables: np.ndarray | None) -> None:
        keys = as_keys(keys)
        rows = None if vectors is None else as_vectors(vectors, keys.size, self.dim)
        tables = as_tables(tables, keys.size, self.num_tables)
        if not keys.size:
            return
        route = Route.of(keys, tables, len(self.shards))

        def write(shard: EmbeddingCache, at: np.ndarray) -> None:
            if rows is None:
                shard.invalidate(keys[at], tables[at])
            else:
                getattr(shard, op)(keys[at], rows[at], tables[at])

        self._each(route, write)

    # ------------------------------------------------------------ inspection

    def dump(self, table: int = 0) -> tuple[np.ndarray, ...]:
        """The shards' dumps of `table` joined, ordered by key as one cache's (a pair is in one shard only)."""
        table = check_table(table, self.num_tables)
        parts = [shard.dump(table) for shard in self.shards]
        joined = [np.concatenate(column) for column in zip(*parts, strict=True)]
        order = np.argsort(joined[0], kind="stable")
        return tuple(column[order] for column in joined)

    def stats(self) -> CacheStats:
        return CacheStats.total(self.table_stats())

    def table_stats(self) -> list[CacheStats]:
        """Each table's hits, misses, rows and capacity, summed over the shards."""
        per_shard = [shard.table_stats() for shard in self.shards]
        return [CacheStats.total(column) for column in zip(*per_shard, strict=True)]


def split_rows(
    keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray, shards: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A static table's rows (keys, vectors, table of each) split as ShardedCache routes them."""
    route = Route.of(as_keys(keys), tables, shards)
    return [(keys[at], vectors[at], tables[at]) for at in map(route.positions, range(shards))]
