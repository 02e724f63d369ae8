"""Prometheus collectors of one server instance, the gRPC interceptor that counts RPCs, and the /metrics endpoint.

Lookup counts are NumPy arrays a pass adds to in a few operations (LookupTally), read when Prometheus
scrapes; nothing here touches keys one by one or is updated once per table, and label values are bounded
(models served, their tables, fixed level names).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from hps_server import addresses
from hps_server.cache import CacheStats

log = logging.getLogger(__name__)

# Why a call was refused by auth.py (its label values, kept here so metrics imports nothing of auth).
AUTH_REFUSAL_REASONS: Final = ("missing_credentials", "invalid_token", "permission_denied")
# Label value standing for model names the server does not host, so clients cannot grow the series count.
UNKNOWN_MODEL: Final = "_unknown"

# How far the server's copy of a call's deadline may trail the client's (by the time the call took to arrive):
# a call its client ended this close to the deadline was ended by it, not cancelled.
_DEADLINE_LAG_SECONDS: Final = 0.01
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Keys per table query: powers of four from 1 to about a million.
_BATCH_BUCKETS = tuple(float(4**i) for i in range(11))
_BATCH_BOUNDS = np.array(_BATCH_BUCKETS)


L1_LEVEL: Final = "l1_cache"
# Level name under which keys no level held are counted (they get the table's default vector).
DEFAULT_LEVEL: Final = "default"
# The batched level calls whose failures hps_level_failures_total counts, each present at 0 from the start.
LEVEL_OPERATIONS: Final = ("fetch", "insert", "evict")


@dataclass
class LevelCounts:
    """Keys answered per level of one table, since the session opened."""

    by_level: dict[str, int] = field(default_factory=dict)
    unavailable: int = 0


@dataclass(frozen=True)
class PassShape:
    """What a pass adds to a tally whatever its keys held: its tables' tally columns, keys per table, the
    histogram counts of its table queries' sizes and its key total; built once per shape of pass."""

    columns: np.ndarray
    keys_per_table: np.ndarray
    size_buckets: np.ndarray
    keys: int

    @classmethod
    def of(cls, columns: np.ndarray, table_of: np.ndarray, query_sizes: np.ndarray) -> PassShape:
        """columns[i]: the tally column of the pass's table i; table_of: each key's table; query_sizes: the keys
        of each table query."""
        buckets = np.bincount(np.searchsorted(_BATCH_BOUNDS, query_sizes), minlength=len(_BATCH_BUCKETS) + 1)
        return cls(columns, np.bincount(table_of, minlength=len(columns)), buckets, len(table_of))


class LookupTally:
    """One model's lookup counts as arrays: keys per table, keys asked of and answered by each level per
    table, the histogram of keys per table query. A pass adds to them in a few array operations however
    many tables it covered; Prometheus reads them at scrape time."""

    def __init__(self, model: str, tables: Sequence[str], levels: Sequence[str]) -> None:
        self.model = model
        self.tables = tuple(tables)
        self.levels = tuple(levels)
        self._lock = threading.Lock()
        self._keys = np.zeros(len(tables), np.int64)
        self._asked = np.zeros((len(levels), len(tables)), np.int64)
        self._answered = np.zeros((len(levels), len(tables)), np.int64)
        self._unavailable = np.zeros(len(tables), np.int64)
        # Queries per bucket of _BATCH_BUCKETS (the last one: above every bound), and their key sum.
        self._batches = np.zeros(len(_BATCH_BUCKETS) + 1, np.int64)
        self._batch_keys = 0

    def add(
        self, shape: PassShape, per_level: Iterable[tuple[int, np.ndarray, np.ndarray]], unavailable: np.ndarray | None
    ) -> None:
        """One pass of this `shape`: per_level (level row, keys asked per table, keys answered per table),
        unavailable the failed level calls per table (None: none failed); tables in the shape's order."""
        columns = shape.columns
        with self._lock:
            self._keys[columns] += shape.keys_per_table
            for row, asked, answered in per_level:
                self._asked[row, columns] += asked
                self._answered[row, columns] += answered
            if unavailable is not None:
                self._unavailable[columns] += unavailable
            self._batches += shape.size_buckets
            self._batch_keys += shape.keys

    def counts(self) -> dict[str, LevelCounts]:
        """Keys answered per level (levels that answered none left out), per table."""
        with self._lock:
            answered, asked, unavailable = self._answered.copy(), self._asked.copy(), self._unavailable.copy()
        return {
            table: LevelCounts(
                {level: int(answered[row, col]) for row, level in enumerate(self.levels) if asked[row, col]},
                int(unavailable[col]),
            )
            for col, table in enumerate(self.tables)
        }

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(keys per table, asked [level, table], answered [level, table], queries per bucket, key sum)."""
        with self._lock:
            return (
                self._keys.copy(),
                self._asked.copy(),
                self._answered.copy(),
                self._batches.copy(),
                self._batch_keys,
            )


@dataclass(frozen=True)
class CacheOccupancy:
    """One L1 cache's state at scrape time: a model table on one device; row_bytes: bytes of one vector."""

    model: str
    table: str
    device: str
    stats: CacheStats
    row_bytes: int


@dataclass(frozen=True)
class LevelOccupancy:
    """What one level below L1 holds of a model table at scrape time; stored_bytes None where the level
    cannot tell."""

    model: str
    table: str
    level: str
    rows: int
    stored_bytes: int | None


class _Children:
    """A metric's children by label values, looked up once: prometheus_client's labels() takes a lock and
    checks its arguments on every call, which costs more than the update itself on the lookup path."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:  # a race only makes labels() run twice; it returns the same child
            child = self._children[values] = self._metric.labels(*values)
        return child


class _CacheCollector(Collector):
    """Reads cache occupancy when Prometheus scrapes, so the lookup path never updates it."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[CacheOccupancy]]] = []

    def add(self, source: Callable[[], Iterable[CacheOccupancy]]) -> None:
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "table", "device"]
        rows = GaugeMetricFamily(
            "hps_cache_rows",
            "Rows held by the L1 embedding cache (a worker group's one cache per device is reported by each worker).",
            labels=labels,
        )
        stored = GaugeMetricFamily(
            "hps_cache_bytes", "Bytes of the vectors the L1 embedding cache holds (rows x dim x 4).", labels=labels
        )
        capacity = GaugeMetricFamily("hps_cache_capacity_rows", "Rows the L1 embedding cache can hold.", labels=labels)
        # Counters, not a ratio: a ratio since the cache was built cannot be rated over a window or summed.
        hits = CounterMetricFamily("hps_cache_hits", "L1 hits since the cache was built.", labels=labels)
        misses = CounterMetricFamily("hps_cache_misses", "L1 misses since the cache was built.", labels=labels)
        for source in self._sources:
            for entry in source():
                values = [entry.model, entry.table, entry.device]
                rows.add_metric(values, entry.stats.rows)
                stored.add_metric(values, entry.stats.rows * entry.row_bytes)
                capacity.add_metric(values, entry.stats.capacity)
                hits.add_metric(values, entry.stats.hits)
                misses.add_metric(values, entry.stats.misses)
        yield from (rows, stored, capacity, hits, misses)


class _LevelCollector(Collector):
    """Reads whether each level's writes fail, and what the levels below L1 hold, when Prometheus scrapes."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[tuple[str, bool]]]] = []
        self._occupancy: list[Callable[[], Iterable[LevelOccupancy]]] = []

    def add(self, source: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self._sources.append(source)

    def add_occupancy(self, source: Callable[[], Iterable[LevelOccupancy]]) -> None:
        self._occupancy.append(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        failing = GaugeMetricFamily(
            "hps_level_writes_failing",
            "1 while a level refuses writes after a failure (e.g. RocksDB's disk), until it recovers.",
            labels=["level"],
        )
        for source in self._sources:
            for level, writes_failing in source():
                failing.add_metric([level], 1 if writes_failing else 0)
        labels = ["model", "table", "level"]
        rows = GaugeMetricFamily(
            "hps_level_rows",
            "Rows a level below L1 holds of a table, as this server sees it (every server sharing a level "
            "reports it: aggregate with max, not sum).",
            labels=labels,
        )
        stored = GaugeMetricFamily(
            "hps_level_bytes",
            "Bytes a level below L1 takes for a table: the hash map's arrays, Redis's MEMORY USAGE estimate, "
            "RocksDB's live data and memtables estimate (every server sharing a level reports it).",
            labels=labels,
        )
        for occupancy in self._occupancy:
            for entry in occupancy():
                values = [entry.model, entry.table, entry.level]
                rows.add_metric(values, entry.rows)
                if entry.stored_bytes is not None:
                    stored.add_metric(values, entry.stored_bytes)
        yield from (failing, rows, stored)


class _TallyCollector(Collector):
    """Turns the models' lookup tallies into counters and a histogram when Prometheus scrapes."""

    def __init__(self) -> None:
        self._tallies: list[LookupTally] = []

    def add(self, tally: LookupTally) -> None:
        """Exports `tally`, in place of an earlier one of the same model (a model loaded anew)."""
        self._tallies = [kept for kept in self._tallies if kept.model != tally.model] + [tally]

    def collect(self) -> Iterator[Metric]:
        keys = CounterMetricFamily("hps_lookup_keys", "Keys looked up, by model and table.", labels=["model", "table"])
        asked = CounterMetricFamily(
            "hps_level_queried_keys",
            "Keys asked of a level (those the levels above missed).",
            labels=["model", "level"],
        )
        hits = CounterMetricFamily(
            "hps_level_hits",
            "Keys answered by a level; level=default counts keys no level held.",
            labels=["model", "level"],
        )
        batches = HistogramMetricFamily("hps_lookup_batch_keys", "Keys per table query of a lookup.", labels=["model"])
        for tally in self._tallies:
            per_table, asked_by, answered_by, buckets, key_sum = tally.snapshot()
            for table, count in zip(tally.tables, per_table.tolist(), strict=True):
                keys.add_metric([tally.model, table], count)
            for level, level_asked, level_answered in zip(
                tally.levels, asked_by.sum(axis=1).tolist(), answered_by.sum(axis=1).tolist(), strict=True
            ):
                asked.add_metric([tally.model, level], level_asked)
                hits.add_metric([tally.model, level], level_answered)
            cumulative = np.cumsum(buckets).tolist()
            bounds = [*(str(bound) for bound in _BATCH_BUCKETS), "+Inf"]
            batches.add_metric([tally.model], list(zip(bounds, cumulative, strict=True)), key_sum)
        yield from (keys, asked, hits, batches)


class ServerMetrics:
    """Every collector of one server, in a registry of its own (several servers may share a process)."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._models = frozenset(models)
        r = self.registry
        # process_* (resident memory, CPU seconds, open fds) and python_info, as operators expect of a service.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "hps_requests",
            "RPCs finished, by model, method and gRPC status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "hps_request_duration_seconds",
            "Time from an RPC's arrival to its reply.",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("hps_requests_in_flight", "RPCs being served now.", ["method"], registry=r)
        self.level_seconds = Histogram(
            "hps_level_duration_seconds",
            "Time of one batched fetch from a level.",
            ["model", "level"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.level_failures = Counter(
            "hps_level_failures",
            "Batched calls to a level that failed (Redis down or timing out, ...); the lookup fell through.",
            ["level", "operation"],
            registry=r,
        )
        self.model_events = Counter(
            "hps_model_events",
            "Model lifecycle events: loaded, failed, reloaded, unloaded.",
            ["model", "event"],
            registry=r,
        )
        self.models_loaded = Gauge("hps_models_loaded", "Models currently served.", registry=r)
        self.ready = Gauge("hps_ready", "1 while the health service reports SERVING.", registry=r)
        self.auth_refusals = Counter(
            "hps_auth_refusals",
            "Calls refused: no or unknown credentials (missing_credentials, invalid_token), or no grant "
            "(permission_denied).",
            ["reason"],
            registry=r,
        )
        for reason in AUTH_REFUSAL_REASONS:
            self.auth_refusals.labels(reason)  # present at 0 from the start, so a rate() sees the first one
        self.busy_refusals = Counter(
            "hps_requests_refused_busy",
            "Calls refused at once (RESOURCE_EXHAUSTED) because server.max_queued_requests already waited.",
            registry=r,
        )
        self.waiting = Gauge("hps_requests_waiting", "Calls waiting for an RPC thread now.", registry=r)
        self.update_rows = Counter(
            "hps_update_rows",
            "Rows of the update stream applied here, by source: replica (another server's Upsert or Delete) "
            "or feed (a trainer's batch).",
            ["source"],
            registry=r,
        )
        self.update_lag_seconds = Histogram(
            "hps_update_lag_seconds",
            "Time from a message's append to the update stream to its rows being applied here.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.update_gaps = Counter(
            "hps_update_gaps",
            "Times this server found it may have missed update messages and dropped its cached rows.",
            registry=r,
        )
        self.update_skipped = Counter(
            "hps_update_skipped_messages",
            "Update stream entries skipped here as not update messages, or naming a table not served here.",
            registry=r,
        )
        self._caches = _CacheCollector()
        r.register(self._caches)
        self._tallies = _TallyCollector()
        r.register(self._tallies)
        self._levels = _LevelCollector()
        r.register(self._levels)
        self._requests = _Children(self.requests)
        self._request_seconds = _Children(self.request_seconds)
        self._in_flight = _Children(self.in_flight)
        self._level_seconds = _Children(self.level_seconds)

    def model_label(self, model: str) -> str:
        """`model` if it is served now, else UNKNOWN_MODEL."""
        return model if model in self._models else UNKNOWN_MODEL

    # ------------------------------------------------------------ reported by the session

    def tally(self, model: str, tables: Sequence[str], levels: Sequence[str]) -> LookupTally:
        """A new tally of one model's lookups, exported by this server's registry."""
        tally = LookupTally(model, tables, levels)
        self._tallies.add(tally)
        return tally

    def record_level_seconds(self, model: str, level: str, seconds: float) -> None:
        """One batched fetch from a level, whatever number of tables it served."""
        self._level_seconds(model, level).observe(seconds)

    def expect_levels(self, levels: Iterable[str]) -> None:
        """Makes every failure counter of these levels exist at 0, so dashboards and alerts see a series
        before the first failure."""
        for level in levels:
            for operation in LEVEL_OPERATIONS:
                self.level_failures.labels(level, operation)

    def record_level_failure(self, level: str, operation: str) -> None:
        self.level_failures.labels(level, operation).inc()

    def record_model_event(self, model: str, event: str) -> None:
        """event: loaded, failed, reloaded or unloaded; keeps hps_models_loaded and the models RPCs are
        labelled with in step."""
        self.model_events.labels(model, event).inc()
        if event == "loaded":
            self._models = self._models | {model}
            self.models_loaded.inc()
        elif event == "unloaded":
            self._models = self._models - {model}
            self.models_loaded.dec()

    def watch_levels(self, source: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        """Registers a callable listing (level kind, whether its writes fail); called on every scrape."""
        self._levels.add(source)

    def watch_level_occupancy(self, source: Callable[[], Iterable[LevelOccupancy]]) -> None:
        """Registers a callable listing what the levels below L1 hold; called on every scrape."""
        self._levels.add_occupancy(source)

    def watch_caches(self, source: Callable[[], Iterable[CacheOccupancy]]) -> None:
        """Registers a callable listing L1 caches; it is called on every scrape."""
        self._caches.add(source)

    def record_auth_refusal(self, reason: str) -> None:
        self.auth_refusals.labels(reason).inc()

    def record_busy_refusal(self) -> None:
        self.busy_refusals.inc()

    def watch_waiting(self, source: Callable[[], int]) -> None:
        """Registers a callable giving the calls waiting for an RPC thread; called on every scrape."""
        self.waiting.set_function(source)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # ------------------------------------------------------------ RPCs

    def interceptor(self) -> grpc.ServerInterceptor:
        return _RpcInterceptor(self)

    def rpc_started(self, method: str) -> None:
        self._in_flight(method).inc()

    def rpc_finished(self, model_label: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._requests(model_label, method, code.name).inc()
        self._request_seconds(model_label, method).observe(seconds)
        self._in_flight(method).dec()


class _Call:
    """One RPC being counted: when it came, and the model it names with the label that model had when named."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.model = ""
        self._label = UNKNOWN_MODEL
        metrics.rpc_started(method)
        self.started = time.perf_counter()

    def name(self, model: str) -> None:
        self.model = model
        self._label = self.metrics.model_label(model)

    def finish(self, context: grpc.ServicerContext, failed: bool) -> None:
        """Counts the call with the status its client got: DEADLINE_EXCEEDED once its deadline passed, CANCELLED
        once the client cancelled (whatever the handler did after), else the handler's own (context.code() is
        None when it returned normally)."""
        active, remaining = context.is_active(), context.time_remaining()
        if remaining == 0 or (not active and remaining < _DEADLINE_LAG_SECONDS):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif not active:
            code = grpc.StatusCode.CANCELLED
        else:
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
        # A model served when named (UnloadModel's) or at the end (LoadModel's) counts under its name. A call
        # refused for its credentials counts before anything of it is read (a stream's first request is never
        # received), so unary and streaming ones alike count under UNKNOWN_MODEL.
        label = self._label if self._label != UNKNOWN_MODEL else self.metrics.model_label(self.model)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            label = UNKNOWN_MODEL
        self.metrics.rpc_finished(label, self.method, code, time.perf_counter() - self.started)


# The call the interceptor counts in this context (the handler's thread), for name_call_model.
_current_call: ContextVar[_Call | None] = ContextVar("hps_current_call", default=None)


def name_call_model(model: str) -> None:
    """Names the model of the RPC handled here, where its request has no `model` field (LoadModel names it in
    its config): it counts under that name if the model is served now or when the call ends."""
    call = _current_call.get()
    if call is not None:
        call.name(model)


class _RpcInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC of the hps services by model, method and status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        # Wrapped handlers by method path, built on a method's first call instead of on every call.
        self._wrapped: dict[str, Any] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        path = handler_call_details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(path)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        service, _, method = path.rpartition("/")
        # Health checks and reflection would only add noise; probes call them every few seconds.
        if handler is None or not service.startswith("/hps."):
            return handler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        # Only the server's own hps methods are kept, so callers naming random methods grow nothing.
        self._wrapped[path] = wrapped
        return wrapped

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        @functools.wraps(behavior)  # keeps what gRPC reads off a behavior: its thread pool (admission.py)
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self._metrics, method)
            call.name(getattr(request, "model", ""))
            _current_call.set(call)
            failed = True
            try:
                reply = behavior(request, context)
                failed = False
                return reply
            finally:
                _current_call.set(None)
                call.finish(context, failed)

        return handle

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        @functools.wraps(behavior)
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self._metrics, method)

            def remember_model(items: Iterator[Any]) -> Iterator[Any]:
                for item in items:
                    if not call.model:  # the first request naming a model names the call's
                        call.name(getattr(item, "model", ""))
                    yield item

            failed = True
            try:
                yield from behavior(remember_model(requests), context)
                failed = False
            finally:
                call.finish(context, failed)

        return handle


class MetricsEndpoint:
    """The HTTP server answering GET /metrics from one registry, on a daemon thread."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        _, _, _, where = addresses.resolve(address, "server.metrics_address", addresses.METRICS_DEFAULT_HOST)
        host = where[0]
        try:
            self._server, self._thread = start_http_server(where[1], addr=host, registry=registry)
        except OSError as e:
            raise addresses.cannot_bind("server.metrics_address", address, e.strerror) from e
        self.port: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(address: str, metrics: ServerMetrics) -> MetricsEndpoint | None:
    """Starts /metrics on `address` (host:port, port 0 picks a free one); None when address is empty."""
    return MetricsEndpoint(address, metrics.registry) if address else None
