"""LookupSession: the walk down the levels for one model (L1 cache -> volatile -> persistent -> default).

This is the only place that knows the hierarchy. It sees arrays, never gRPC messages, and never loops
over keys in Python: every level is asked once per table per request for all the keys that missed above.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hps_server.cache import EmbeddingCache
from hps_server.config import ModelConfig, TableConfig
from hps_server.storage.base import LevelUnavailableError, StorageLevel, as_keys, as_vectors

log = logging.getLogger(__name__)

L1_LEVEL = "l1_cache"
DEFAULT_LEVEL = "default"


@dataclass(frozen=True)
class TableLookup:
    """One vector per key: float32 [n, dim], and which keys some level held."""

    vectors: np.ndarray
    found: np.ndarray


@dataclass
class LevelCounts:
    """Keys answered per level of one table, since the session opened."""

    by_level: dict[str, int] = field(default_factory=dict)
    unavailable: int = 0

    def add(self, level: str, keys: int) -> None:
        self.by_level[level] = self.by_level.get(level, 0) + keys


class LookupSession:
    """Answers lookups for one model; safe to call from many threads."""

    def __init__(
        self,
        model: ModelConfig,
        levels: Sequence[StorageLevel],
        caches: Mapping[str, Sequence[EmbeddingCache]] | None = None,
        write_back: bool = True,
    ) -> None:
        """levels: storage levels top first; caches: per table, one L1 cache per device;
        write_back: insert rows found below into the writable levels above them."""
        self.model = model
        self.levels = tuple(levels)
        self.caches = dict(caches or {})
        self.write_back = write_back
        self._device_turn = itertools.count()
        self._counts = {table.name: LevelCounts() for table in model.tables}
        self._counts_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.model.name

    def level_names(self) -> list[str]:
        return ([L1_LEVEL] if self.caches else []) + [level.kind for level in self.levels]

    def qualified(self, table: TableConfig) -> str:
        """The table's name inside the storage levels, shared by every model of a server."""
        return f"{self.model.name}.{table.name}"

    def table(self, name: str) -> TableConfig:
        """The table's config; raises KeyError naming the model when it has no such table."""
        try:
            return self.model.table(name)
        except KeyError:
            raise KeyError(f"model {self.model.name!r} has no table {name!r}") from None

    # ---------------------------------------------------------------- lookups

    def lookup(self, table_name: str, keys: np.ndarray) -> TableLookup:
        table = self.table(table_name)
        keys = as_keys(keys)
        vectors = np.empty((len(keys), table.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        answered: dict[str, int] = {}
        missing = np.arange(len(keys))

        cache = self._pick_cache(table.name)
        if cache is not None and len(keys):
            cached, hit = cache.query(keys)
            vectors[hit] = cached[hit]
            found[hit] = True
            answered[L1_LEVEL] = int(np.count_nonzero(hit))
            missing = np.flatnonzero(~hit)

        unavailable = 0
        authoritative_down = False
        fetched_from: list[tuple[int, np.ndarray]] = []  # (level index, positions it answered)
        for index, level in enumerate(self.levels):
            if not len(missing):
                break
            try:
                rows, hit = level.fetch(self.qualified(table), keys[missing])
            except LevelUnavailableError as e:
                unavailable += 1
                authoritative_down = index == len(self.levels) - 1
                log.warning("%s level unavailable for %s, falling through: %s", level.kind, table.name, e)
                continue
            positions = missing[hit]
            vectors[positions] = rows[hit]
            found[positions] = True
            answered[level.kind] = answered.get(level.kind, 0) + len(positions)
            fetched_from.append((index, positions))
            missing = missing[~hit]

        if len(missing) and authoritative_down:
            # Only the lowest level can say a key is absent; without it a default could be wrong.
            self._count(table.name, answered, unavailable)
            raise LevelUnavailableError(
                f"{len(missing)} keys missed every reachable level and the {self.levels[-1].kind} level is unavailable"
            )
        if len(missing):
            vectors[missing] = table.default_value
            answered[DEFAULT_LEVEL] = len(missing)
        self._insert_upwards(table, keys, vectors, fetched_from, cache)
        self._count(table.name, answered, unavailable)
        return TableLookup(vectors, found)

    def _pick_cache(self, table: str) -> EmbeddingCache | None:
        devices = self.caches.get(table)
        if not devices:
            return None
        return devices[next(self._device_turn) % len(devices)]

    def _insert_upwards(
        self,
        table: TableConfig,
        keys: np.ndarray,
        vectors: np.ndarray,
        fetched_from: list[tuple[int, np.ndarray]],
        cache: EmbeddingCache | None,
    ) -> None:
        """Copies rows found in a lower level into the levels above it."""
        for index, positions in fetched_from:
            if not len(positions):
                continue
            if cache is not None:
                cache.replace(keys[positions], vectors[positions])
            if not self.write_back:
                continue
            for level in self.levels[:index]:
                if level.read_only:
                    continue
                try:
                    level.insert(self.qualified(table), keys[positions], vectors[positions])
                except LevelUnavailableError as e:
                    # The lower level stays the source of truth; the row is simply fetched again later.
                    log.warning("write-back to %s failed for %s: %s", level.kind, table.name, e)

    def _count(self, table: str, answered: Mapping[str, int], unavailable: int) -> None:
        with self._counts_lock:
            counts = self._counts[table]
            for level, n in answered.items():
                counts.add(level, n)
            counts.unavailable += unavailable

    def counts(self) -> dict[str, LevelCounts]:
        """A snapshot of keys answered per level, per table."""
        with self._counts_lock:
            return {name: LevelCounts(dict(c.by_level), c.unavailable) for name, c in self._counts.items()}

    # ---------------------------------------------------------------- online updates

    def upsert(self, table_name: str, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Writes rows into every writable level, lowest (authoritative) first, then refreshes L1."""
        table = self.table(table_name)
        keys = as_keys(keys)
        vectors = as_vectors(vectors, len(keys), table.dim)
        self._require_writable()
        for level in reversed(self.levels):
            if not level.read_only:
                level.insert(self.qualified(table), keys, vectors)
        for cache in self.caches.get(table.name, ()):
            cache.update(keys, vectors)
        return len(keys)

    def delete(self, table_name: str, keys: np.ndarray) -> int:
        """Removes keys from every writable level and L1; returns how many some level held."""
        table = self.table(table_name)
        keys = np.unique(as_keys(keys))
        self._require_writable()
        present = np.zeros(len(keys), dtype=bool)
        for level in reversed(self.levels):
            if not level.read_only:
                present |= level.contains(self.qualified(table), keys)
                level.evict(self.qualified(table), keys)
        for cache in self.caches.get(table.name, ()):
            cache.invalidate(keys)
        return int(np.count_nonzero(present))

    def _require_writable(self) -> None:
        if not any(not level.read_only for level in self.levels):
            raise PermissionError(f"model {self.model.name} is served read-only: no level accepts writes")

    def rows(self, table_name: str) -> int:
        """Rows in the authoritative (lowest) level, 0 when there is none."""
        table = self.table(table_name)
        return self.levels[-1].size(self.qualified(table)) if self.levels else 0
