"""Start-time warm-up: copies initial_cache_rate of each table from RocksDB into the volatile level, then
fills each L1 cache from the highest level that has rows, logging progress.

The server runs it in the background after it starts listening and reports SERVING once it is done;
it never runs on a request's path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

from hps_server.cache import EmbeddingCache
from hps_server.session import LookupSession
from hps_server.storage.base import KeyChunk, LevelUnavailableError, StorageLevel

log = logging.getLogger(__name__)


def first_rows(level: StorageLevel, table: str, budget: int) -> Iterator[KeyChunk]:
    """Up to `budget` rows of `table`, in the level's dump order."""
    left = budget
    for keys, vectors in level.dump(table):
        if left <= 0:
            return
        yield keys[:left], vectors[:left]
        left -= min(len(keys), left)


def warm(
    sessions: Sequence[LookupSession],
    volatile: StorageLevel | None,
    persistent: StorageLevel | None,
    rate: float,
    stop: threading.Event,
) -> None:
    """Warms every table of every session; returns early once `stop` is set."""
    if rate <= 0:
        return
    started = time.monotonic()
    for session in sessions:
        for table in session.model.tables:
            if stop.is_set():
                return
            name = session.qualified(table)
            if volatile is not None and persistent is not None and not volatile.read_only:
                _warm_volatile(volatile, persistent, name, rate, stop)
            caches = session.caches.get(table.name)
            if caches:
                _warm_l1(caches, session.levels, name, rate, stop)
    log.info("warm-up done in %.1f s", time.monotonic() - started)


def _warm_volatile(
    volatile: StorageLevel, persistent: StorageLevel, table: str, rate: float, stop: threading.Event
) -> None:
    budget = int(persistent.size(table) * rate)
    copied = 0
    try:
        for keys, vectors in first_rows(persistent, table, budget):
            if stop.is_set():
                return
            volatile.insert(table, keys, vectors)
            copied += len(keys)
            log.debug("warming %s in %s: %d of %d rows", table, volatile.kind, copied, budget)
    except LevelUnavailableError as e:
        # A cache that is down is no reason not to serve: lookups fall through until it is back.
        log.warning("warming %s stopped after %d rows, %s unavailable: %s", table, copied, volatile.kind, e)
        return
    log.info("warmed %s: %d rows in %s", table, copied, volatile.kind)


def _warm_l1(
    caches: Sequence[EmbeddingCache], levels: Sequence[StorageLevel], table: str, rate: float, stop: threading.Event
) -> None:
    """Fills each device's cache with up to `rate` of the table's rows (never more than it holds)."""
    source = next((level for level in levels if level.size(table) > 0), None)
    if source is None:
        return
    budget = min(int(levels[-1].size(table) * rate), caches[0].capacity - caches[0].stats().rows)
    copied = 0
    for keys, vectors in first_rows(source, table, budget):
        if stop.is_set():
            return
        for cache in caches:
            cache.replace(keys, vectors)
        copied += len(keys)
    log.info("warmed %s: %d rows in L1 (from %s)", table, copied, source.kind)
