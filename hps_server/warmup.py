"""Start-time warm-up: copies initial_cache_rate of each table from RocksDB into the volatile level, then
fills each L1 cache from the highest level that has rows, logging progress.

The server runs it in the background after it starts listening and reports SERVING once it is done;
it never runs on a request's path.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from hps_server.cache import TableL1
from hps_server.session import LookupSession, ServedTable
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
        for table in session.tables.values():
            if stop.is_set():
                return
            if volatile is not None and persistent is not None and not volatile.read_only:
                _warm_volatile(session, table, volatile, persistent, rate, stop)
            if table.l1 is not None:
                _warm_l1(session, table, table.l1, rate, stop)
    log.info("warm-up done in %.1f s", time.monotonic() - started)


def _copies(
    session: LookupSession, table: ServedTable, source: StorageLevel, budget: int
) -> Iterator[tuple[int, KeyChunk]]:
    """(epoch, chunk) pairs: each chunk of the first `budget` rows with the table's epoch read before the
    dump began, so a copy is dropped once an upsert or delete came since (session.insert_if_unchanged):
    a dump reads the level as it was when it started, so every later chunk may be older than the write."""
    epoch = table.epoch
    session.follow_writes()  # a group worker's read-only levels: see every write the epoch has counted
    for chunk in first_rows(source, table.storage_name, budget):
        yield epoch, chunk


def _warm_volatile(
    session: LookupSession,
    table: ServedTable,
    volatile: StorageLevel,
    persistent: StorageLevel,
    rate: float,
    stop: threading.Event,
) -> None:
    name = table.storage_name
    budget = int(persistent.size(name) * rate)
    copied = 0
    try:
        for epoch, (keys, vectors) in _copies(session, table, persistent, budget):
            if stop.is_set():
                return
            if session.insert_if_unchanged(table, epoch, functools.partial(volatile.insert, name, keys, vectors)):
                copied += len(keys)
            log.debug("warming %s in %s: %d of %d rows", name, volatile.kind, copied, budget)
    except LevelUnavailableError as e:
        # A cache that is down is no reason not to serve: lookups fall through until it is back.
        log.warning("warming %s stopped after %d rows, %s unavailable: %s", name, copied, volatile.kind, e)
        return
    log.info("warmed %s: %d rows in %s", name, copied, volatile.kind)


def _warm_l1(session: LookupSession, table: ServedTable, l1: TableL1, rate: float, stop: threading.Event) -> None:
    """Fills each device's cache with up to `rate` of the table's rows (never more than it holds)."""
    name = table.storage_name
    levels = session.levels
    source = next((level for level in levels if level.size(name) > 0), None)
    if source is None:
        return
    held = l1.caches[0].table_stats()[l1.index]
    budget = min(int(levels[-1].size(name) * rate), held.capacity - held.rows)
    copied = 0
    for epoch, (keys, vectors) in _copies(session, table, source, budget):
        if stop.is_set():
            return
        if session.insert_if_unchanged(table, epoch, functools.partial(_replace_all, l1, keys, vectors)):
            copied += len(keys)
    log.info("warmed %s: %d rows in L1 (from %s)", name, copied, source.kind)


def _replace_all(l1: TableL1, keys: np.ndarray, vectors: np.ndarray) -> None:
    tables = np.full(len(keys), l1.index, np.int32)
    for cache in l1.caches:
        cache.replace(keys, vectors, tables)
