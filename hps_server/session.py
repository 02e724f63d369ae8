"""LookupSession: the walk down the levels for one model (L1 cache -> volatile -> persistent -> default).

This is the only place that knows the hierarchy. It sees arrays, never gRPC messages, and never loops
over keys in Python. A batch of table queries (one request's, or many requests' coalesced) is answered
in one pass: the keys of all tables of one vector width go down together, so each level is asked once
per width, however many tables the batch names.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hps_server.cache import CacheStats, EmbeddingCache, TableL1
from hps_server.cache.background import BackgroundFill
from hps_server.config import ModelConfig, TableConfig, shown
from hps_server.log_limits import RateLimitedWarning
from hps_server.metrics import DEFAULT_LEVEL, L1_LEVEL, LevelCounts, LookupTally, PassShape, ServerMetrics
from hps_server.reply_buffers import Pin
from hps_server.storage.base import LevelUnavailableError, StorageError, StorageLevel, as_keys, as_vectors
from hps_server.write_epochs import WriteEpochs
from hps_wire.update_message import Op

log = logging.getLogger(__name__)

WARN_INTERVAL_SECONDS = 30
FLOAT32 = np.dtype(np.float32)
# A prefetch walks down in chunks of this many keys (a fraction of a millisecond each); before each, it waits
# (at most PREFETCH_MAX_WAIT_S) for the lookups in flight, and after each it pauses half as long as the chunk took,
# so it costs them little. Past PREFETCH_BACKLOG queued prefetches, more are dropped.
PREFETCH_CHUNK_KEYS = 64
PREFETCH_MAX_WAIT_S = 0.05
PREFETCH_BACKLOG = 16
# Batch shapes of lone queries a session keeps (distinct table lists and key counts its clients send).
SHAPES_KEPT = 256


def takes_copies(target: StorageLevel, source: StorageLevel) -> bool:
    """Whether rows read from `source` may be copied into `target` (a write-back, a warm-up): a writable level,
    and not a shared one where the source missed update messages (its rows may be older than what other
    servers wrote there, and every server would then read them)."""
    return not target.read_only and not (target.shared and source.missed_updates)


class ServedTable:
    """One table of a served model, resolved once when the model loads: its config, its name in the
    storage levels, its place in L1, and the epoch and lock that keep write-backs behind upserts."""

    def __init__(
        self,
        model: ModelConfig,
        config: TableConfig,
        index: int,
        l1: TableL1 | None,
        epochs: WriteEpochs,
        epoch_slot: int,
        previous: ServedTable | None = None,
    ) -> None:
        """epochs, epoch_slot: where the table's write epoch lives; previous: the table a reload replaces. When
        it names the same storage table, the two share its epoch and lock, so a write-back of the old one's
        stays behind an upsert of the new one's."""
        self.config = config
        self.name = config.name
        self.dim = config.dim
        # Column of this table in the model's tally, and its id in the model's per-key table arrays.
        self.index = index
        self.storage_name = model.storage_name(config)
        self.l1 = l1
        # What tables walking down together must share: the vector width and the L1 caches.
        self.group = (self.dim, l1.caches if l1 else ())
        # Bumped by every upsert/delete (write_epochs.py): a write-back (into L2 or L1) of rows read before
        # is dropped, so no level above takes a row older than one written since. The lock makes
        # check+insert atomic against the upsert/delete (or, in a group worker, the L1 refresh) of the table.
        shared = previous if previous is not None and previous.storage_name == self.storage_name else None
        self.epochs: WriteEpochs = shared.epochs if shared else epochs
        self.epoch_slot: int = shared.epoch_slot if shared else epoch_slot
        self.lock: threading.Lock = shared.lock if shared else threading.Lock()

    @property
    def epoch(self) -> int:
        return self.epochs.of(self.epoch_slot)


@dataclass(frozen=True)
class WriteBack:
    """Rows a group worker found in its `levels[source]`, below `levels[level]`, for the group's writer to
    copy into that level unless a write of their tables came since the worker read `epochs` (one per name
    in `tables`)."""

    level: int
    source: int
    tables: list[str]
    epochs: list[int]
    keys: np.ndarray
    table_of: np.ndarray  # index into `tables` per key
    rows: np.ndarray


@dataclass(frozen=True)
class PrefetchKeys:
    """A prefetch's keys for the group's writer, by table name: segment i holds counts[i] keys of tables[i]."""

    tables: list[str]
    keys: np.ndarray
    counts: np.ndarray


class WriteRoute(Protocol):
    """Where a group worker sends its writes instead of writing its levels: the group's one writer
    (group_writes.py), which writes every level and refreshes every worker's L1 before it answers."""

    def upsert(self, model: str, table: str, keys: np.ndarray, vectors: np.ndarray) -> int: ...

    def delete(self, model: str, table: str, keys: np.ndarray) -> int: ...

    def write_refusal(self, model: str) -> str:
        """The writer's LookupSession.write_refusal() of the model."""
        ...

    def write_back(self, model: str, rows: WriteBack) -> None: ...

    def holds_l1(self, model: str) -> bool:
        """Whether the writer holds the model's L1, the one cache every worker maps (GPUs); else each
        worker's L1 is its own."""
        ...

    def prefetch(self, model: str, keys: list[PrefetchKeys]) -> None:
        """Queues a prefetch in the writer (where it holds_l1): its walk fills the shared L1 there, off the
        GIL of the workers serving lookups."""
        ...


WrittenHook = Callable[["ServedTable", np.ndarray, "np.ndarray | None"], None]
"""Called by the writer once a write reached every level: (table, keys, new vectors or None for a delete)."""


@dataclass(frozen=True)
class KeyQuery:
    """Keys to look up: segment i holds counts[i] keys of tables[i], segments end to end (all of one width
    and one L1 placement); `dtype` is the element type the caller wants the vectors in. `out`, when given,
    is where the vectors go ([keys, dim] of `dtype`: a region of the reply); a walk writes into it directly
    when the query walks alone, else its vectors are copied there."""

    tables: tuple[ServedTable, ...]
    keys: np.ndarray
    counts: np.ndarray
    dtype: np.dtype = FLOAT32
    out: np.ndarray | None = None

    @classmethod
    def of(cls, table: ServedTable, keys: np.ndarray, dtype: np.dtype = FLOAT32) -> KeyQuery:
        """A query of one table."""
        return cls((table,), keys, np.array([len(keys)], np.int64), dtype)

    @property
    def group(self) -> tuple[int, tuple[EmbeddingCache, ...]]:
        """What queries walking down together must share (all its tables share it)."""
        return self.tables[0].group


@dataclass(frozen=True)
class TableLookup:
    """One vector per key ([n, dim], float32 or the dtype asked for), and which keys some level held."""

    vectors: np.ndarray
    found: np.ndarray


Outcome = TableLookup | StorageError
"""What a batch gives each query: its vectors, or the storage error that stopped it (the others stand)."""

Announce = Callable[[str, str, str, Op, np.ndarray, np.ndarray | None, bool], None]
"""Called with (model, table, the table's version, op, keys, vectors or None, whether every shared level took
it) once a write is acknowledged, under the table's lock."""


class _Shape:
    """What a batch's walk needs that depends on its queries' tables and key counts, not on their keys:
    each key's table (an index into `tables`) and query, the tables' names, tally columns, defaults and
    L1 indices. A lone query's is kept by the session (a client asks the same shape call after call)."""

    def __init__(self, queries: Sequence[KeyQuery]) -> None:
        local: dict[ServedTable, int] = {}
        segment_tables = [local.setdefault(table, len(local)) for q in queries for table in q.tables]
        self.tables = tables = list(local)
        self.segment_counts = queries[0].counts if len(queries) == 1 else np.concatenate([q.counts for q in queries])
        self.table_of = np.repeat(np.array(segment_tables, np.int64), self.segment_counts)
        lengths = np.fromiter((len(q.keys) for q in queries), np.int64, len(queries))
        self.starts = np.concatenate(([0], np.cumsum(lengths)))
        self.query_of = np.repeat(np.arange(len(queries)), lengths)
        self.names = [table.storage_name for table in tables]
        self.tally = PassShape.of(
            np.fromiter((table.index for table in tables), np.int64, len(tables)), self.table_of, self.segment_counts
        )
        self.defaults = np.fromiter((table.config.default_value for table in tables), np.float32, len(tables))
        self.dim = tables[0].dim
        self.l1 = tables[0].l1
        self.l1_tables = (
            None if self.l1 is None else np.fromiter((t.l1.index for t in tables if t.l1), np.int32, len(tables))
        )
        # Each key's table index in L1.
        self.l1_table_of = None if self.l1_tables is None else self.l1_tables[self.table_of]


class _Batch:
    """The keys of several queries of one width laid end to end, with their shape (_Shape: each key's table
    and query, resolved once); everything the walk needs."""

    def __init__(self, queries: Sequence[KeyQuery], shape: _Shape | None = None) -> None:
        self.queries = queries
        self.shape = shape = shape or _Shape(queries)
        self.keys = queries[0].keys if len(queries) == 1 else np.concatenate([q.keys for q in queries])
        # The shape's fields the walk reads most, at hand.
        self.tables, self.table_of, self.names = shape.tables, shape.table_of, shape.names
        self.defaults, self.dim, self.l1, self.l1_tables = shape.defaults, shape.dim, shape.l1, shape.l1_tables
        # float16 straight from L1 when every query wants it; a mixed batch is cast per query at the end.
        wanted = {q.dtype for q in queries}
        self.dtype = wanted.pop() if len(wanted) == 1 else FLOAT32
        # Where the walk writes the batch's vectors: a lone query's own destination, else arrays of its own.
        self.out = queries[0].out if len(queries) == 1 else None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, positions: np.ndarray) -> _Batch:
        """The same tables, only the keys at `positions`, as one query (for fetches behind a reply)."""
        positions = positions[np.argsort(self.table_of[positions], kind="stable")]
        counts = np.bincount(self.table_of[positions], minlength=len(self.tables))
        return _Batch([KeyQuery(tuple(self.tables), self.keys[positions], counts)])


def _first_rows(rows: np.ndarray, batch: _Batch) -> np.ndarray:
    """The batch's vectors from the first level's reply (no L1 answered): in batch.out when it has one,
    else the reply itself where it can be written and has the batch's dtype."""
    if batch.out is not None:
        batch.out[...] = rows
        return batch.out
    return rows if rows.flags.writeable and rows.dtype == batch.dtype else rows.astype(batch.dtype)


@dataclass(frozen=True)
class _Fetched:
    """What one level answered in a walk: the batch positions it held, from its reply rows[hit]."""

    level: int
    positions: np.ndarray
    rows: np.ndarray
    hit: np.ndarray

    def found_rows(self) -> np.ndarray:
        """The float32 rows it held, in the order of `positions` (copied only when a level above takes them)."""
        return self.rows[self.hit]


class LookupSession:
    """Answers lookups for one model; safe to call from many threads."""

    def __init__(
        self,
        model: ModelConfig,
        levels: Sequence[StorageLevel],
        caches: Mapping[str, TableL1] | None = None,
        write_back: bool = True,
        metrics: ServerMetrics | None = None,
        writes_refused: str = "",
        previous: LookupSession | None = None,
        *,
        epochs: WriteEpochs | None = None,
        first_epoch_slot: int = 0,
        route: WriteRoute | None = None,
        on_written: WrittenHook | None = None,
    ) -> None:
        """levels: storage levels top first; caches: each table's place in L1 (placement.build_caches);
        write_back: insert rows found below into the writable levels above them;
        metrics: where each pass reports its per-level counts and timings;
        writes_refused: why Upsert and Delete are refused although a level would take them (empty: they are not);
        previous: the session of the model this one replaces (a reload): its counts go on when the tables and
        levels are the same, and a table of the same storage name shares its write epoch and lock;
        epochs: the tables' write epochs from `first_epoch_slot` on (shared by a worker group; default private);
        route: a group worker's writer (writes and write-backs go there); on_written: the writer's hook that
        refreshes the workers' L1 before a write is acknowledged."""
        self.model = model
        self.writes_refused = writes_refused
        self.levels = tuple(levels)
        caches = dict(caches or {})
        self.epochs = epochs or WriteEpochs(len(model.tables))
        self.route = route
        self._on_written = on_written
        self._seen_commits = self.epochs.commits
        self._follow_lock = threading.Lock()
        self.tables: dict[str, ServedTable] = {
            config.name: ServedTable(
                model,
                config,
                index,
                caches.get(config.name),
                self.epochs,
                first_epoch_slot + index,
                previous.tables.get(config.name) if previous else None,
            )
            for index, config in enumerate(model.tables)
        }
        self.has_l1 = bool(caches)
        # How reply buffers get page-locked for its GPU caches' copies (gpu.pin_host); None off the GPU.
        self.pin_host: Pin | None = next(
            (
                pin
                for l1 in caches.values()
                for cache in l1.device_caches()
                if (pin := getattr(cache, "pin_host", None)) is not None
            ),
            None,
        )
        self.write_back = write_back
        self.metrics = metrics
        level_names = [*self.level_names(), DEFAULT_LEVEL]
        tally: LookupTally | None = previous.tally if previous is not None else None
        if tally is None or tally.tables != tuple(self.tables) or tally.levels != tuple(level_names):
            new_tally = metrics.tally if metrics is not None else LookupTally
            tally = new_tally(model.name, list(self.tables), level_names)
        self.tally: LookupTally = tally
        self._level_rows = {name: row for row, name in enumerate(level_names)}
        self._device_turn = itertools.count()
        self._shapes: dict[tuple[tuple[ServedTable, ...], bytes], _Shape] = {}
        self._outages = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)
        # L1 inserts above hit_rate_threshold run here, off the reply's path.
        self._fill = BackgroundFill(f"hps-l1-{model.name}") if self.has_l1 else None
        # Prefetches walk down here, one at a time, in the gaps between lookups, never on a reply's path.
        self._prefetch = BackgroundFill(f"hps-prefetch-{model.name}", max_pending=PREFETCH_BACKLOG)
        self._lookups_running = 0
        self._lookups_idle = threading.Condition()
        # Told of every acknowledged Upsert and Delete, in the order they were written (the update stream).
        self.announce: Announce | None = None

    @property
    def name(self) -> str:
        return self.model.name

    def level_names(self) -> list[str]:
        return ([L1_LEVEL] if self.has_l1 else []) + [level.kind for level in self.levels]

    def table(self, name: str) -> ServedTable:
        """The served table; raises KeyError naming the model when it has no such table."""
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"model {self.model.name!r} has no table {shown(name)}") from None

    # ---------------------------------------------------------------- lookups

    def lookup(self, table_name: str, keys: np.ndarray) -> TableLookup:
        """One table's lookup (a batch of one query); raises the storage error that stopped it."""
        outcome = self.lookup_many([KeyQuery.of(self.table(table_name), as_keys(keys))])[0]
        if isinstance(outcome, StorageError):
            raise outcome
        return outcome

    def lookup_many(self, queries: Sequence[KeyQuery]) -> list[Outcome]:
        """Answers every query in one pass per vector width (and L1 placement); outcomes in query order.

        A level failing for one width fails only the queries that needed it; the others are answered."""
        with self._lookups_idle:
            self._lookups_running += 1
        try:
            return self._lookup_groups(queries)
        finally:
            with self._lookups_idle:
                self._lookups_running -= 1
                self._lookups_idle.notify_all()

    def _lookup_groups(self, queries: Sequence[KeyQuery]) -> list[Outcome]:
        groups: dict[tuple[int, tuple[EmbeddingCache, ...]], list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.group, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(queries)
        for members in groups.values():
            group = [queries[i] for i in members]
            batch = _Batch(group, self._shape(group))
            try:
                answered = self._walk(batch, report=True)
            except StorageError as e:
                answered = [e] * len(group)
            for i, outcome in zip(members, answered, strict=True):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  # every slot was filled above

    def _shape(self, queries: Sequence[KeyQuery]) -> _Shape:
        """The batch shape of these queries: a lone query's from the kept ones (the first SHAPES_KEPT seen;
        past them a shape is made per call), several queries' (coalesced, each pass its own mix) made anew."""
        if len(queries) > 1:
            return _Shape(queries)
        query = queries[0]
        key = (query.tables, query.counts.tobytes())
        shape = self._shapes.get(key)
        if shape is None:
            shape = _Shape(queries)
            if len(self._shapes) < SHAPES_KEPT:
                self._shapes[key] = shape
        return shape

    def _walk(self, batch: _Batch, report: bool, through_l1: bool = True, fill_now: bool = False) -> list[Outcome]:
        """Answers the batch from L1, then the levels below for what missed, then defaults; copies what
        it fetched into the levels above. report: the walk answers replies, so it is counted; fill_now:
        L1 takes the rows before the walk returns, whatever the hit rate (a prefetch)."""
        epochs = [table.epoch for table in batch.tables]  # read before any row is
        self.follow_writes()
        n = len(batch)
        counts = _PassCounts(self, batch)
        found = np.zeros(n, bool)
        vectors: np.ndarray | None = None
        missing: np.ndarray | None = None  # positions not answered yet; None until some level answered
        cache = self._pick_cache(batch)
        background = False
        if cache is not None and through_l1 and n:
            started = time.perf_counter()
            vectors, hit = cache.query(batch.keys, batch.shape.l1_table_of, dtype=batch.dtype, out=batch.out)
            found |= hit
            counts.level(L1_LEVEL, None, hit, time.perf_counter() - started)
            missing = np.flatnonzero(~hit)
            background = not fill_now and n - len(missing) >= self.model.hit_rate_threshold * n
            if background and self.model.answer_misses_with_default and len(missing):
                vectors[missing] = batch.defaults[batch.table_of[missing], None]
                counts.defaults(missing)
                self._fetch_later(batch.subset(missing))
                missing = missing[:0]

        fetched: list[_Fetched] = []
        authoritative_down = False
        for index, level in enumerate(self.levels):
            if missing is not None and not len(missing):
                break
            asked = missing
            started = time.perf_counter()
            try:
                keys, table_of = (
                    (batch.keys, batch.table_of) if asked is None else (batch.keys[asked], batch.table_of[asked])
                )
                rows, hit = level.fetch_many(batch.names, keys, table_of)
            except LevelUnavailableError as e:
                authoritative_down = index == len(self.levels) - 1
                counts.unavailable(missing)
                self._warn_unavailable(level.kind, "lookups fall through", e)
                if self.metrics is not None:
                    self.metrics.record_level_failure(level.kind, "fetch")
                continue
            seconds = time.perf_counter() - started
            if missing is None:
                positions, missing = np.flatnonzero(hit), np.flatnonzero(~hit)
                vectors = _first_rows(rows, batch)
            else:
                assert vectors is not None
                positions = missing[hit]
                # Cast as one block first: NumPy casts float32 to float16 inside a fancy assignment at
                # about half the speed (1,900 rows of dim 128: 1.18 ms against 0.65 ms).
                vectors[positions] = rows.astype(vectors.dtype, copy=False)[hit]
                missing = missing[~hit]
            found[positions] = True
            counts.level(level.kind, asked, hit, seconds)
            fetched.append(_Fetched(index, positions, rows, hit))

        if vectors is None or missing is None:  # no level could be asked
            vectors = batch.out if batch.out is not None else np.empty((n, batch.dim), dtype=batch.dtype)
            missing = np.arange(n)
        unanswered = np.zeros(len(batch.queries), np.int64)
        if len(missing) and authoritative_down:
            # Only the lowest level can say a key is absent; without it a default could be wrong.
            query_of = batch.shape.query_of
            unanswered = np.bincount(query_of[missing], minlength=len(batch.queries))
            missing = missing[unanswered[query_of[missing]] == 0]
        if len(missing):
            vectors[missing] = batch.defaults[batch.table_of[missing], None]
            counts.defaults(missing)
        self._insert_upwards(batch, epochs, fetched, cache, background)
        if report:
            counts.commit(self.metrics)
        return self._split(batch, vectors, found, unanswered.tolist())

    def _split(self, batch: _Batch, vectors: np.ndarray, found: np.ndarray, unanswered: list[int]) -> list[Outcome]:
        """Each query's slice of the batch (views, no copy unless the query wants another dtype); a query
        with keys no reachable level could answer gets the error instead."""
        outcomes: list[Outcome] = []
        for i, query in enumerate(batch.queries):
            if unanswered[i]:
                names = ", ".join(dict.fromkeys(table.name for table in query.tables))
                outcomes.append(
                    LevelUnavailableError(
                        f"table {names}: {unanswered[i]} keys missed every reachable level and the "
                        f"{self.levels[-1].kind} level is unavailable"
                    )
                )
                continue
            start, stop = batch.shape.starts[i], batch.shape.starts[i + 1]
            if query.out is None:
                answer = vectors[start:stop].astype(query.dtype, copy=False)
            else:
                answer = query.out
                if answer is not batch.out:
                    answer[...] = vectors[start:stop]
            outcomes.append(TableLookup(answer, found[start:stop]))
        return outcomes

    def _fetch_later(self, batch: _Batch) -> None:
        """answer_misses_with_default: the true rows of L1 misses are fetched and cached in the background."""
        assert self._fill is not None  # a session with caches has a fill worker

        def fetch() -> None:
            self._walk(batch, report=False, through_l1=False)

        self._fill.submit(fetch)

    def prefetch(self, queries: Sequence[KeyQuery]) -> bool:
        """Walks the queries' keys down in the background, so the rows are in L1 (and the levels above the
        one holding them) for the lookup that follows; returns at once. In a group worker whose writer holds
        L1, the writer walks them. False when the prefetch backlog is full and the keys were dropped (a
        prefetch is a hint)."""
        groups: dict[tuple[int, tuple[EmbeddingCache, ...]], list[KeyQuery]] = {}
        for query in queries:
            if len(query.keys):
                groups.setdefault(query.group, []).append(query)
        if not groups:
            return True
        if self.route is not None and self.route.holds_l1(self.name):
            sent = [PrefetchKeys([t.name for t in q.tables], q.keys, q.counts) for g in groups.values() for q in g]
            return self._prefetch.submit(functools.partial(self._prefetch_in_writer, self.route, sent))

        def walk() -> None:
            for group in groups.values():
                batch = _Batch(group)
                for start in range(0, len(batch), PREFETCH_CHUNK_KEYS):
                    self._wait_for_no_lookups(PREFETCH_MAX_WAIT_S)
                    chunk = batch.subset(np.arange(start, min(start + PREFETCH_CHUNK_KEYS, len(batch))))
                    started = time.perf_counter()
                    try:
                        self._walk(chunk, report=False, fill_now=True)
                    except StorageError as e:
                        self._warn_unavailable("a storage", "prefetch skipped", e)
                    # A walk holds the GIL for most of its time (NumPy, the L1's calls; rocksdict lets it go only
                    # inside RocksDB's reads): half as long again for the threads serving lookups.
                    time.sleep((time.perf_counter() - started) / 2)

        return self._prefetch.submit(walk)

    def _prefetch_in_writer(self, route: WriteRoute, sent: list[PrefetchKeys]) -> None:
        """Hands a prefetch to the group's writer (from this session's prefetch thread, off the reply's path)."""
        try:
            route.prefetch(self.name, sent)
        except StorageError as e:
            self._warn_unavailable("a storage", "prefetch skipped", e)

    def prefetch_from(self, sent: list[PrefetchKeys]) -> bool:
        """The writer's side of WriteRoute.prefetch: a worker's prefetch, walked here."""
        return self.prefetch([KeyQuery(tuple(self.table(n) for n in p.tables), p.keys, p.counts) for p in sent])

    def _wait_for_no_lookups(self, longest: float) -> None:
        """Lets lookups in flight finish first (up to `longest` seconds): a prefetch runs in their gaps."""
        with self._lookups_idle:
            self._lookups_idle.wait_for(lambda: not self._lookups_running, longest)

    def wait_prefetched(self, timeout: float | None = None) -> bool:
        """Blocks until every prefetch submitted so far has run (in a group worker whose writer holds L1: has
        been handed to the writer); False on timeout."""
        return self._prefetch.wait_idle(timeout)

    def _pick_cache(self, batch: _Batch) -> EmbeddingCache | None:
        if batch.l1 is None:
            return None
        caches = batch.l1.caches
        return caches[next(self._device_turn) % len(caches)]

    def _insert_upwards(
        self,
        batch: _Batch,
        epochs: list[int],
        fetched: list[_Fetched],
        cache: EmbeddingCache | None,
        background: bool,
    ) -> None:
        """Copies rows found in lower levels into L1 (one insert for all of them) and into the writable
        levels above the one that held them."""
        fetched = [f for f in fetched if len(f.positions)]
        if cache is not None and batch.l1_tables is not None and fetched:
            self._fill_l1(batch, epochs, fetched, cache, background)
        if self.write_back:
            self._write_back(batch, epochs, fetched)

    def _fill_l1(
        self, batch: _Batch, epochs: list[int], fetched: list[_Fetched], cache: EmbeddingCache, background: bool
    ) -> None:
        """One L1 insert of every row found below, now or (background) in the fill thread. Its arrays are
        this call's own: the fill may run after the walk went on."""
        assert batch.l1_tables is not None
        positions = np.concatenate([f.positions for f in fetched]) if len(fetched) > 1 else fetched[0].positions
        rows = np.concatenate([f.found_rows() for f in fetched]) if len(fetched) > 1 else fetched[0].found_rows()
        tables = batch.table_of[positions]
        keys, l1_tables = batch.keys[positions], batch.l1_tables[tables]

        def fill() -> None:
            self._insert_unless_stale(
                batch.tables, epochs, tables, lambda keep: cache.replace(keys[keep], rows[keep], l1_tables[keep])
            )

        if background and self._fill is not None:
            self._fill.submit(fill)
        else:
            fill()

    def _write_back(self, batch: _Batch, epochs: list[int], fetched: list[_Fetched]) -> None:
        """Copies each level's found rows into the writable levels above it (through the group's writer in a
        worker); a level that cannot take them is counted and skipped."""
        for f in fetched:
            above = [
                (index, level)
                for index, level in enumerate(self.levels[: f.level])
                if self._copies_into(f.level, index)
            ]
            if not above:
                continue
            keys, tables, rows = batch.keys[f.positions], batch.table_of[f.positions], f.found_rows()
            for index, level in above:
                try:
                    if self.route is not None:
                        names = [table.name for table in batch.tables]
                        self.route.write_back(self.name, WriteBack(index, f.level, names, epochs, keys, tables, rows))
                        continue

                    def copy(keep: np.ndarray, level=level, keys=keys, rows=rows, tables=tables) -> None:  # type: ignore[no-untyped-def]
                        level.copy_many(batch.names, keys[keep], tables[keep], rows[keep])

                    self._insert_unless_stale(batch.tables, epochs, tables, copy)
                except StorageError as e:
                    # Best effort: the lower level stays the source of truth, the row is fetched again later.
                    self._warn_unavailable(level.kind, "write-back skipped", e)
                    if self.metrics is not None:
                        self.metrics.record_level_failure(level.kind, "insert")

    def _copies_into(self, source: int, target: int) -> bool:
        """Whether rows found in levels[source] are written back into levels[target] (takes_copies)."""
        return takes_copies(self.levels[target], self.levels[source])

    def write_back_from(self, found: WriteBack) -> None:
        """The writer's side of WriteRoute.write_back: a worker's rows, copied in unless they may be stale."""
        if not self._copies_into(found.source, found.level):
            return
        served = [self.table(name) for name in found.tables]
        target = self.levels[found.level]
        names = [table.storage_name for table in served]

        def insert(keep: np.ndarray) -> None:
            target.copy_many(names, found.keys[keep], found.table_of[keep], found.rows[keep])

        self._insert_unless_stale(served, found.epochs, found.table_of, insert)

    @staticmethod
    def _insert_unless_stale(
        tables: Sequence[ServedTable], epochs: Sequence[int], table_of: np.ndarray, insert: Callable[[np.ndarray], None]
    ) -> None:
        """Runs insert(keep) for the rows whose table saw no upsert or delete since `epochs` were read
        (the others may be older than what was written), nor had one under way then; holds those tables'
        locks meanwhile."""
        with contextlib.ExitStack() as held:
            for table in sorted(tables, key=lambda t: t.index):  # one order everywhere: no deadlock
                held.enter_context(table.lock)
            stale = [
                i
                for i, (table, epoch) in enumerate(zip(tables, epochs, strict=True))
                if epoch % 2 or table.epoch != epoch
            ]
            keep = np.ones(len(table_of), bool) if not stale else ~np.isin(table_of, stale)
            if keep.any():
                insert(keep)

    def _warn_unavailable(self, level: str, consequence: str, error: Exception) -> None:
        self._outages.warn("%s level unavailable for model %s, %s: %s", level, self.model.name, consequence, error)

    def counts(self) -> dict[str, LevelCounts]:
        """A snapshot of keys answered per level, per table."""
        return self.tally.counts()

    # ---------------------------------------------------------------- online updates

    def upsert(self, table_name: str, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Writes rows into every writable level, lowest (authoritative) first, then refreshes L1; returns
        how many distinct keys it wrote (a key repeated keeps its last row).

        Acknowledged once the authoritative level has them: a level above that is unavailable has the
        keys invalidated before it is read again (StorageLevel.serve_as_cache), so it does not fail the call."""
        table = self.table(table_name)
        keys = as_keys(keys)
        vectors = as_vectors(vectors, len(keys), table.dim)
        if self.route is not None:
            return self.route.upsert(self.name, table.name, keys, vectors)
        self._require_writable()
        self._write(table, "upsert", keys, vectors, announce=True)
        return len(np.unique(keys))

    def delete(self, table_name: str, keys: np.ndarray) -> int:
        """Removes keys from every writable level and L1; returns how many distinct keys the lowest
        writable level held (the persistent level holds every row, so that is the table's count). A level
        above it that is unavailable does not fail the call, as for upsert."""
        table = self.table(table_name)
        keys = np.unique(as_keys(keys))
        if self.route is not None:
            return self.route.delete(self.name, table.name, keys)
        self._require_writable()
        return self._write(table, "delete", keys, None, announce=True)

    def apply_update(
        self, table_name: str, op: Op, keys: np.ndarray, vectors: np.ndarray | None, skip_shared: bool
    ) -> None:
        """Applies a batch of the update stream like an Upsert or Delete, without announcing it again.
        skip_shared: another server wrote it into the shared levels already (Redis), so only this server's
        own levels are written. "drop": every copy of the table's rows here is dropped. The lowest writable
        level failing raises StorageError (the batch did not reach this server's authority)."""
        table = self.table(table_name)
        if op == "drop":
            self._drop_copies(table)
            return
        keys = as_keys(keys)
        rows = as_vectors(vectors, len(keys), table.dim) if op == "upsert" else None
        self._write(table, op, keys, rows, announce=False, skip_shared=skip_shared)

    def _write(
        self,
        table: ServedTable,
        op: Op,
        keys: np.ndarray,
        vectors: np.ndarray | None,
        *,
        announce: bool,
        skip_shared: bool = False,
    ) -> int:
        """An upsert (vectors given) or delete through the writable levels, the authority first, then L1
        (L1 first for a write from the stream, which the writer's authority has already); announced (with
        whether every shared level took it) before the table's lock is released, so the update stream
        carries one table's writes in the order they were made. Returns the rows the authority held (delete)."""
        if vectors is not None:
            rows = vectors

            def write(level: StorageLevel) -> int | None:
                level.insert(table.storage_name, keys, rows)
                return None
        else:

            def write(level: StorageLevel) -> int | None:
                return level.evict(table.storage_name, keys)

        on_written = self._on_written
        written = None if on_written is None else functools.partial(on_written, table, keys, vectors)
        refresh = functools.partial(self._refresh_l1, table, keys, vectors)
        removed, shared_written = 0, True
        with self._writing(table, refresh, written, l1_first=not announce):
            for authoritative, level in self._writable_levels():
                if skip_shared and level.shared:
                    continue
                held = self._write_level(authoritative, level, "insert" if vectors is not None else "evict", write)
                if held is None:
                    shared_written = shared_written and not level.shared
                elif authoritative:
                    removed = held
            if announce and self.announce is not None:
                self.announce(self.name, table.name, table.config.version, op, keys, vectors, shared_written)
        return removed

    def drop_copies(self, missed: bool = False) -> None:
        """Drops every row this server holds copies of (L1, and in-process levels above the lowest), for
        every table: after update messages may have been missed, rows are read from below again. `missed`:
        the lowest level missed messages the other servers applied (this server fell behind a trimmed
        stream), so from now on its rows are not copied into shared levels."""
        authority = self.levels[-1] if self.levels else None
        if missed and authority is not None and not authority.shared and not authority.missed_updates:
            authority.missed_updates = True
            log.warning(
                "model %s: %s may have missed updates; its rows are no longer copied into the shared levels "
                "(stop the server and import its tables again to resync)",
                self.name,
                authority.kind,
            )
        for table in self.tables.values():
            self._drop_copies(table)

    def _drop_copies(self, table: ServedTable) -> None:
        copies = [level for level in self.levels[:-1] if not level.shared and not level.read_only]

        def drop() -> None:
            if table.l1 is not None:
                for cache in table.l1.caches:
                    held = cache.dump(table.l1.index)[0]
                    cache.invalidate(held, _same(table.l1.index, held))

        with self._writing(table, drop):
            for level in copies:
                chunks = [keys for keys, _ in level.dump(table.storage_name)]
                if chunks:
                    level.evict(table.storage_name, np.concatenate(chunks))

    def _writable_levels(self) -> Iterator[tuple[bool, StorageLevel]]:
        """(is it the authoritative one, level) for every writable level, lowest (the authority) first."""
        writable = [level for level in reversed(self.levels) if not level.read_only]
        for position, level in enumerate(writable):
            yield position == 0, level

    def _write_level(
        self, authoritative: bool, level: StorageLevel, operation: str, write: Callable[[StorageLevel], int | None]
    ) -> int | None:
        """Runs one level's share of a write: the rows it held (delete), or None when a level above the
        authority was unavailable, which is counted and logged, not raised (the level drops those keys before
        serving them again)."""
        try:
            return write(level) or 0
        except LevelUnavailableError as e:
            if authoritative:
                raise
            self._warn_unavailable(level.kind, "write acknowledged, its keys invalidated there before it is read", e)
            if self.metrics is not None:
                self.metrics.record_level_failure(level.kind, operation)
            return None

    def insert_if_unchanged(self, table: ServedTable, epoch: int, insert: Callable[[], None]) -> bool:
        """Runs `insert` (a copy of rows into a level above) unless an upsert or delete of the table came
        since `epoch` was read (or was under way), in which case the rows may be stale and nothing is written."""
        with table.lock:
            if epoch % 2 or table.epoch != epoch:
                return False
            insert()
            return True

    @contextlib.contextmanager
    def _writing(
        self,
        table: ServedTable,
        refresh_l1: Callable[[], None],
        written: Callable[[], None] | None = None,
        l1_first: bool = False,
    ) -> Iterator[None]:
        """Holds the table against write-backs while the levels are written (its epoch odd until L1 is
        refreshed and `written` has run: a walk that read any level before the write was done has its
        write-back dropped); L1 is refreshed, and `written` (the group writer's refresh of its workers) runs,
        even when a level fails part-way, since the levels below may already hold the new rows.
        l1_first: L1 is refreshed before the levels are written (rows the authority elsewhere has already:
        this server's readers get them without waiting for its own slower levels)."""
        with table.lock:
            table.epochs.begin(table.epoch_slot)
            try:
                if l1_first:
                    refresh_l1()
                yield
            finally:
                table.epochs.committed()
                try:
                    if not l1_first:
                        refresh_l1()
                    if written is not None:
                        written()
                finally:
                    table.epochs.end(table.epoch_slot)

    def refresh(self, table_name: str, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        """A group worker's share of a write the writer made: its read-only levels catch up, then its L1
        takes the new rows of keys it holds (vectors) or drops the keys (None: a delete)."""
        table = self.table(table_name)
        self.follow_writes()
        with table.lock:
            self._refresh_l1(table, keys, vectors)

    @staticmethod
    def _refresh_l1(table: ServedTable, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        if table.l1 is None:
            return
        index = _same(table.l1.index, keys)
        for cache in table.l1.caches:
            if vectors is None:
                cache.invalidate(keys, index)
            else:
                cache.update(keys, vectors, index)

    def follow_writes(self) -> None:
        """Catches the levels up with writes another process committed (a group's writer), once per new
        commit: cheap when nothing was written."""
        commits = self.epochs.commits
        if commits == self._seen_commits:
            return
        with self._follow_lock:
            if commits == self._seen_commits:
                return
            for level in self.levels:
                level.follow_writes()
            self._seen_commits = commits

    def write_refusal(self) -> str:
        """Why Upsert and Delete would be refused now, empty while they are taken: the server refuses
        writes, no level takes them, or the authoritative level's writes fail (until it recovers). A group
        worker asks the group's writer, which writes for it."""
        if self.route is not None:
            try:
                return self.route.write_refusal(self.name)
            except StorageError as e:
                return str(e)
        try:
            self._require_writable()
        except PermissionError as e:
            return str(e)
        _, authority = next(self._writable_levels())
        failure = authority.write_failure
        return "" if failure is None else f"{authority.kind}: writes failing: {failure}"

    def _require_writable(self) -> None:
        if self.writes_refused:
            raise PermissionError(f"model {self.model.name} is served read-only: {self.writes_refused}")
        if not any(not level.read_only for level in self.levels):
            raise PermissionError(f"model {self.model.name} is served read-only: no level accepts writes")
        if self.levels[-1].read_only:  # a write only the levels above took would be lost, or undone
            raise PermissionError(
                f"model {self.model.name} is served read-only: its {self.levels[-1].kind} level, which holds "
                "the rows, is read-only"
            )

    def cache_stats(self) -> dict[str, CacheStats]:
        """L1 hits, misses, rows held and capacity per table, summed over the table's devices."""
        return {name: table.l1.stats() for name, table in self.tables.items() if table.l1 is not None}

    def close(self) -> None:
        """Runs the prefetches and L1 fills still queued; call before the levels close."""
        self._prefetch.close()
        if self._fill is not None:
            self._fill.close()

    def rows(self, table_name: str) -> int:
        """Rows in the authoritative (lowest) level, 0 when there is none."""
        table = self.table(table_name)
        return self.levels[-1].size(table.storage_name) if self.levels else 0


def _same(index: int, keys: np.ndarray) -> np.ndarray:
    """The per-key table index of a batch that is all one table."""
    return np.full(len(keys), index, np.int32)


class _PassCounts:
    """What one pass asked and got of each level, per table, added to the model's tally at the end in
    a few array operations (never one metric update per table)."""

    def __init__(self, session: LookupSession, batch: _Batch) -> None:
        self._session = session
        self._batch = batch
        self._tables = len(batch.tables)
        self._asked: list[tuple[int, np.ndarray, np.ndarray]] = []  # (level row, asked per table, hits per table)
        self._timings: list[tuple[str, float]] = []
        self._unavailable: np.ndarray | None = None

    def _per_table(self, positions: np.ndarray | None, mask: np.ndarray | None = None) -> np.ndarray:
        if positions is None and mask is None:
            return self._batch.shape.tally.keys_per_table
        table_of = self._batch.table_of if positions is None else self._batch.table_of[positions]
        if mask is not None:
            table_of = table_of[mask]
        return np.bincount(table_of, minlength=self._tables)

    def level(self, name: str, positions: np.ndarray | None, hit: np.ndarray, seconds: float) -> None:
        row = self._session._level_rows[name]
        self._asked.append((row, self._per_table(positions), self._per_table(positions, hit)))
        self._timings.append((name, seconds))

    def defaults(self, positions: np.ndarray) -> None:
        per_table = self._per_table(positions)
        self._asked.append((self._session._level_rows[DEFAULT_LEVEL], per_table, per_table))

    def unavailable(self, positions: np.ndarray | None) -> None:
        failed = np.minimum(self._per_table(positions), 1)  # one failed call per table it asked
        self._unavailable = failed if self._unavailable is None else self._unavailable + failed

    def commit(self, metrics: ServerMetrics | None) -> None:
        self._session.tally.add(self._batch.shape.tally, self._asked, self._unavailable)
        if metrics is not None:
            for name, seconds in self._timings:
                metrics.record_level_seconds(self._session.model.name, name, seconds)
