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
from dataclasses import dataclass

import numpy as np

from hps_server.cache import TableL1
from hps_server.session import LookupSession, ServedTable, takes_copies
from hps_server.storage.base import DEFAULT_CHUNK_ROWS, KeyChunk, LevelUnavailableError, StorageError, StorageLevel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pace:
    """How a warm-up copies: rows per chunk, and seconds of pause before each chunk."""

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    pause_seconds: float = 0.0


def first_rows(
    level: StorageLevel, table: str, budget: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[KeyChunk]:
    """Up to `budget` rows of `table`, in the level's dump order, chunk_rows at a time."""
    left = budget
    for keys, vectors in level.dump(table, chunk_rows):
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
    pace: Pace | None = None,
) -> None:
    """Warms every table of every session; returns early once `stop` is set. `pace`: smaller chunks with a
    pause after each, for a warm-up beside served requests (a reload), which then wait less for the locks."""
    if rate <= 0:
        return
    pace = pace or Pace()
    started = time.monotonic()
    for session in sessions:
        for table in session.tables.values():
            if stop.is_set():
                return
            if volatile is not None and persistent is not None and takes_copies(volatile, persistent):
                _warm_volatile(session, table, volatile, persistent, rate, stop, pace)
            if table.l1 is not None:
                _warm_l1(session, table, table.l1, rate, stop, pace)
    if stop.is_set():
        log.info("warm-up stopped after %.1f s", time.monotonic() - started)
    else:
        log.info("warm-up done in %.1f s", time.monotonic() - started)


def carry_hot_keys(previous: LookupSession, session: LookupSession, stop: threading.Event, pace: Pace) -> None:
    """Fills each L1 of `session` (a reload's, not served yet) with its own rows of the keys the L1 of
    `previous` (the session it replaces) holds now: the keys hot at the switch, read from the lowest level
    at the new session's versions, up to the room its L1 has."""
    for table in session.tables.values():
        before = previous.tables.get(table.name)
        if table.l1 is None or before is None or before.l1 is None or not session.levels:
            continue
        held = table.l1.caches[0].table_stats()[table.l1.index]
        keys = before.l1.caches[0].dump(before.l1.index)[0][: max(held.capacity - held.rows, 0)]
        source, copied = session.levels[-1], 0
        for start in range(0, len(keys), pace.chunk_rows):
            if stop.is_set():
                return
            time.sleep(pace.pause_seconds)
            epoch = table.epoch
            chunk = keys[start : start + pace.chunk_rows]
            rows, found = source.fetch(table.storage_name, chunk)
            fill = functools.partial(_replace_all, table.l1, chunk[found], rows[found])
            if session.insert_if_unchanged(table, epoch, fill):
                copied += int(found.sum())
        log.info("warmed %s: %d rows hot before the switch in L1 (from %s)", table.storage_name, copied, source.kind)


def _copies(
    session: LookupSession, table: ServedTable, source: StorageLevel, budget: int, pace: Pace
) -> Iterator[tuple[int, KeyChunk]]:
    """(epoch, chunk) pairs: each chunk of the first `budget` rows with the table's epoch read before the
    dump began, so a copy is dropped once an upsert or delete came since (session.insert_if_unchanged):
    a dump reads the level as it was when it started, so every later chunk may be older than the write."""
    epoch = table.epoch
    session.follow_writes()  # a group worker's read-only levels: see every write the epoch has counted
    for chunk in first_rows(source, table.storage_name, budget, pace.chunk_rows):
        if pace.pause_seconds:
            time.sleep(pace.pause_seconds)
        yield epoch, chunk


def _warm_volatile(
    session: LookupSession,
    table: ServedTable,
    volatile: StorageLevel,
    persistent: StorageLevel,
    rate: float,
    stop: threading.Event,
    pace: Pace,
) -> None:
    name = table.storage_name
    budget = int(persistent.size(name) * rate)
    copied = 0
    try:
        for epoch, (keys, vectors) in _copies(session, table, persistent, budget, pace):
            if stop.is_set():
                return
            copy = functools.partial(volatile.copy_many, [name], keys, np.zeros(len(keys), np.intp), vectors)
            if session.insert_if_unchanged(table, epoch, copy):
                copied += len(keys)
            log.debug("warming %s in %s: %d of %d rows", name, volatile.kind, copied, budget)
    except StorageError as e:
        # A cache that is down (or refuses the copy) is no reason not to serve: lookups fall through to below.
        log.warning("warming %s stopped after %d rows, %s failing: %s", name, copied, volatile.kind, e)
        return
    log.info("warmed %s: %d rows in %s", name, copied, volatile.kind)


def _warm_l1(
    session: LookupSession, table: ServedTable, l1: TableL1, rate: float, stop: threading.Event, pace: Pace
) -> None:
    """Fills each device's cache with up to `rate` of the table's rows (never more than it holds), from the
    first level that holds rows; a level that is down (or goes down meanwhile) is passed over for the next."""
    name = table.storage_name
    levels = session.levels
    held = l1.caches[0].table_stats()[l1.index]
    try:
        budget = min(int(levels[-1].size(name) * rate), held.capacity - held.rows)
    except LevelUnavailableError as e:
        log.warning("not warming %s in L1: %s unavailable: %s", name, levels[-1].kind, e)
        return
    copied = skipped = 0
    for source in levels:
        try:
            if copied >= budget or source.size(name) == 0:
                continue
            for epoch, (keys, vectors) in _copies(session, table, source, budget - copied, pace):
                if stop.is_set():
                    return
                if session.insert_if_unchanged(table, epoch, functools.partial(_replace_all, l1, keys, vectors)):
                    copied += len(keys)
                else:
                    skipped += len(keys)
        except LevelUnavailableError as e:
            log.warning("warming %s in L1: %s unavailable, trying the next level: %s", name, source.kind, e)
            continue
        # Rows read while the table was written may be older than the write: left for lookups to fill.
        written = f"; {skipped} skipped, the table was written meanwhile" if skipped else ""
        log.info("warmed %s: %d rows in L1 (from %s)%s", name, copied, source.kind, written)
        return


def _replace_all(l1: TableL1, keys: np.ndarray, vectors: np.ndarray) -> None:
    tables = np.full(len(keys), l1.index, np.int32)
    for cache in l1.caches:
        cache.replace(keys, vectors, tables)
