"""LookupSession: the walk down the levels for one model (L1 cache -> volatile -> persistent -> default).

This is the only place that knows the hierarchy. It sees arrays, never gRPC messages, and never loops
over keys in Python: every level is asked once per table per request for all the keys that missed above.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hps_server.cache import CacheStats, EmbeddingCache
from hps_server.cache.background import BackgroundFill
from hps_server.config import ModelConfig, TableConfig
from hps_server.metrics import LevelFetch, ServerMetrics
from hps_server.storage.base import LevelUnavailableError, StorageError, StorageLevel, as_keys, as_vectors

log = logging.getLogger(__name__)

L1_LEVEL = "l1_cache"
WARN_INTERVAL_SECONDS = 30
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
        metrics: ServerMetrics | None = None,
    ) -> None:
        """levels: storage levels top first; caches: per table, one L1 cache per device;
        write_back: insert rows found below into the writable levels above them;
        metrics: where each lookup reports its per-level counts and timings."""
        self.model = model
        self.levels = tuple(levels)
        self.caches = dict(caches or {})
        self.write_back = write_back
        self.metrics = metrics
        self._device_turn = itertools.count()
        self._counts = {table.name: LevelCounts() for table in model.tables}
        self._counts_lock = threading.Lock()
        self._last_warning: dict[str, float] = {}
        # L1 inserts above hit_rate_threshold run here, off the reply's path.
        self._fill = BackgroundFill(f"hps-l1-{model.name}") if self.caches else None
        # Bumped by every upsert/delete of a table: a write-back (into L2 or L1) of rows fetched before
        # it is dropped, so no level above takes a row older than one written since. A table's lock
        # makes check+insert atomic against the upsert/delete that bumps it.
        self._epochs = {table.name: 0 for table in model.tables}
        self._table_locks = {table.name: threading.Lock() for table in model.tables}

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
        found = np.zeros(len(keys), dtype=bool)
        answered: dict[str, int] = {}
        fetches: list[LevelFetch] = []
        # The first level asked about every key lends its reply as the result buffer (no extra copy);
        # `missing` (positions not answered yet) stays None until some level has answered.
        vectors: np.ndarray | None = None
        missing: np.ndarray | None = None

        cache = self._pick_cache(table.name)
        background = False
        if cache is not None and len(keys):
            started = time.perf_counter()
            vectors, hit = cache.query(keys)
            found |= hit
            answered[L1_LEVEL] = int(np.count_nonzero(hit))
            fetches.append(LevelFetch(L1_LEVEL, len(keys), answered[L1_LEVEL], time.perf_counter() - started))
            missing = np.flatnonzero(~hit)
            background = answered[L1_LEVEL] >= self.model.hit_rate_threshold * len(keys)
            if background and self.model.answer_misses_with_default and len(missing):
                vectors[missing] = table.default_value
                answered[DEFAULT_LEVEL] = len(missing)
                fetches.append(LevelFetch(DEFAULT_LEVEL, len(missing), len(missing)))
                self._count(table.name, answered, 0)
                self._report(table.name, len(keys), fetches)
                self._fetch_later(table, keys[missing], cache)
                return TableLookup(vectors, found)
        return self._walk(table, keys, vectors, found, missing, answered, fetches, cache, background)

    def _walk(
        self,
        table: TableConfig,
        keys: np.ndarray,
        vectors: np.ndarray | None,
        found: np.ndarray,
        missing: np.ndarray | None,
        answered: dict[str, int],
        fetches: list[LevelFetch],
        cache: EmbeddingCache | None,
        background: bool,
        report: bool = True,
    ) -> TableLookup:
        """Fills the `missing` positions from the levels below L1, then defaults; inserts what it fetched above.

        report: the walk answers a reply, so it is counted and reported to metrics."""
        epoch = self.epoch(table.name)
        unavailable = 0
        authoritative_down = False
        fetched_from: list[tuple[int, np.ndarray]] = []  # (level index, positions it answered)
        for index, level in enumerate(self.levels):
            if missing is not None and not len(missing):
                break
            started = time.perf_counter()
            try:
                rows, hit = level.fetch(self.qualified(table), keys if missing is None else keys[missing])
            except LevelUnavailableError as e:
                unavailable += 1
                authoritative_down = index == len(self.levels) - 1
                self._warn_unavailable(level.kind, f"lookups of {table.name} fall through", e)
                if self.metrics is not None:
                    self.metrics.record_level_failure(level.kind, "fetch")
                continue
            seconds = time.perf_counter() - started
            if missing is None:
                vectors = rows if rows.flags.writeable else rows.copy()
                positions = np.flatnonzero(hit)
                missing = np.flatnonzero(~hit)
            else:
                assert vectors is not None
                positions = missing[hit]
                vectors[positions] = rows[hit]
                missing = missing[~hit]
            found[positions] = True
            answered[level.kind] = answered.get(level.kind, 0) + len(positions)
            fetches.append(LevelFetch(level.kind, len(hit), len(positions), seconds))
            fetched_from.append((index, positions))

        if vectors is None or missing is None:  # no level could be asked
            vectors = np.empty((len(keys), table.dim), dtype=np.float32)
            missing = np.arange(len(keys))
        if len(missing) and authoritative_down:
            # Only the lowest level can say a key is absent; without it a default could be wrong.
            if report:
                self._count(table.name, answered, unavailable)
                self._report(table.name, len(keys), fetches)
            raise LevelUnavailableError(
                f"table {table.name}: {len(missing)} keys missed every reachable level and the "
                f"{self.levels[-1].kind} level is unavailable"
            )
        if len(missing):
            vectors[missing] = table.default_value
            answered[DEFAULT_LEVEL] = len(missing)
            fetches.append(LevelFetch(DEFAULT_LEVEL, len(missing), len(missing)))
        self._insert_upwards(table, keys, vectors, fetched_from, cache, background, epoch)
        if report:
            self._count(table.name, answered, unavailable)
            self._report(table.name, len(keys), fetches)
        return TableLookup(vectors, found)

    def _report(self, table: str, keys: int, fetches: list[LevelFetch]) -> None:
        if self.metrics is not None:
            self.metrics.record_lookup(self.model.name, table, keys, fetches)

    def _fetch_later(self, table: TableConfig, keys: np.ndarray, cache: EmbeddingCache) -> None:
        """answer_misses_with_default: the true rows of L1 misses are fetched and cached in the background."""

        def fetch() -> None:
            self._walk(table, keys, None, np.zeros(len(keys), bool), None, {}, [], cache, False, report=False)

        assert self._fill is not None  # a session with caches has a fill worker
        self._fill.submit(fetch)

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
        background: bool,
        epoch: int,
    ) -> None:
        """Copies rows found in a lower level into the levels above it."""
        for index, positions in fetched_from:
            if not len(positions):
                continue
            if cache is not None:
                self._fill_l1(table.name, cache, keys[positions], vectors[positions], background, epoch)
            if not self.write_back:
                continue
            for level in self.levels[:index]:
                if level.read_only:
                    continue
                try:
                    copy = functools.partial(level.insert, self.qualified(table), keys[positions], vectors[positions])
                    if not self.insert_if_unchanged(table.name, epoch, copy):
                        return  # an upsert/delete came after these rows were read: they are stale
                except StorageError as e:
                    # Best effort: the lower level stays the source of truth, the row is fetched again later.
                    self._warn_unavailable(level.kind, f"write-back of {table.name} skipped", e)
                    if self.metrics is not None:
                        self.metrics.record_level_failure(level.kind, "insert")

    def _warn_unavailable(self, level: str, consequence: str, error: Exception) -> None:
        """Logs a level outage at most once per WARN_INTERVAL_SECONDS per level: an outage must not flood the log."""
        now = time.monotonic()
        with self._counts_lock:
            due = now - self._last_warning.get(level, -WARN_INTERVAL_SECONDS) >= WARN_INTERVAL_SECONDS
            if due:
                self._last_warning[level] = now
        if due:
            log.warning(
                "%s level unavailable, %s (repeats silenced for %d s): %s",
                level,
                consequence,
                WARN_INTERVAL_SECONDS,
                error,
            )

    def _fill_l1(
        self, table: str, cache: EmbeddingCache, keys: np.ndarray, vectors: np.ndarray, background: bool, epoch: int
    ) -> None:
        def fill() -> None:
            self.insert_if_unchanged(table, epoch, lambda: cache.replace(keys, vectors))

        if background and self._fill is not None:
            self._fill.submit(fill)
        else:
            fill()

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
        with self._writing(table.name, lambda cache: cache.update(keys, vectors)):
            for level in reversed(self.levels):
                if not level.read_only:
                    level.insert(self.qualified(table), keys, vectors)
        return len(keys)

    def delete(self, table_name: str, keys: np.ndarray) -> int:
        """Removes keys from every writable level and L1; returns how many distinct keys the lowest
        writable level held (the persistent level holds every row, so that is the table's count)."""
        table = self.table(table_name)
        keys = np.unique(as_keys(keys))
        self._require_writable()
        writable = [level for level in reversed(self.levels) if not level.read_only]
        with self._writing(table.name, lambda cache: cache.invalidate(keys)):
            removed = [level.evict(self.qualified(table), keys) for level in writable]
        return removed[0]

    def epoch(self, table_name: str) -> int:
        """Counts the table's upserts and deletes; read it before reading rows to copy upwards."""
        return self._epochs[table_name]

    def insert_if_unchanged(self, table_name: str, epoch: int, insert: Callable[[], None]) -> bool:
        """Runs `insert` (a copy of rows into a level above) unless an upsert or delete of the table came
        since `epoch` was read, in which case the rows may be stale and nothing is written."""
        with self._table_locks[table_name]:
            if self._epochs[table_name] != epoch:
                return False
            insert()
            return True

    @contextlib.contextmanager
    def _writing(self, table: str, refresh_l1: Callable[[EmbeddingCache], None]) -> Iterator[None]:
        """Holds the table against write-backs while the levels are written; L1 is refreshed even when
        a level fails part-way, since the levels below it may already hold the new rows."""
        with self._table_locks[table]:
            self._epochs[table] += 1
            try:
                yield
            finally:
                for cache in self.caches.get(table, ()):
                    refresh_l1(cache)

    def _require_writable(self) -> None:
        if not any(not level.read_only for level in self.levels):
            raise PermissionError(f"model {self.model.name} is served read-only: no level accepts writes")

    def cache_stats(self) -> dict[str, CacheStats]:
        """L1 hits, misses, rows held and capacity per table, summed over the table's devices."""
        return {name: CacheStats.total(cache.stats() for cache in caches) for name, caches in self.caches.items()}

    def close(self) -> None:
        """Runs the L1 fills still queued; call before the levels close."""
        if self._fill is not None:
            self._fill.close()

    def rows(self, table_name: str) -> int:
        """Rows in the authoritative (lowest) level, 0 when there is none."""
        table = self.table(table_name)
        return self.levels[-1].size(self.qualified(table)) if self.levels else 0
