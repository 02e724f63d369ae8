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
            if volatile is not None and persistent is not None and not volatile.read_only:
                _warm_volatile(session, table.name, volatile, persistent, rate, stop)
            caches = session.caches.get(table.name)
            if caches:
                _warm_l1(session, table.name, caches, rate, stop)
    log.info("warm-up done in %.1f s", time.monotonic() - started)


def _copies(session: LookupSession, table: str, source: StorageLevel, budget: int) -> Iterator[tuple[int, KeyChunk]]:
    """(epoch, chunk) pairs: each chunk of the first `budget` rows with the table's epoch read before it,
    so a copy can be dropped when an upsert or delete raced it (session.insert_if_unchanged)."""
    chunks = first_rows(source, session.qualified(session.table(table)), budget)
    while True:
        epoch = session.epoch(table)
        chunk = next(chunks, None)
        if chunk is None:
            return
        yield epoch, chunk


def _warm_volatile(
    session: LookupSession,
    table: str,
    volatile: StorageLevel,
    persistent: StorageLevel,
    rate: float,
    stop: threading.Event,
) -> None:
    name = session.qualified(session.table(table))
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


def _warm_l1(
    session: LookupSession, table: str, caches: Sequence[EmbeddingCache], rate: float, stop: threading.Event
) -> None:
    """Fills each device's cache with up to `rate` of the table's rows (never more than it holds)."""
    name = session.qualified(session.table(table))
    levels = session.levels
    source = next((level for level in levels if level.size(name) > 0), None)
    if source is None:
        return
    budget = min(int(levels[-1].size(name) * rate), caches[0].capacity - caches[0].stats().rows)
    copied = 0
    for epoch, (keys, vectors) in _copies(session, table, source, budget):
        if stop.is_set():
            return
        if session.insert_if_unchanged(table, epoch, functools.partial(_replace_all, caches, keys, vectors)):
            copied += len(keys)
    log.info("warmed %s: %d rows in L1 (from %s)", name, copied, source.kind)


def _replace_all(caches: Sequence[EmbeddingCache], keys: np.ndarray, vectors: np.ndarray) -> None:
    for cache in caches:
        cache.replace(keys, vectors)
