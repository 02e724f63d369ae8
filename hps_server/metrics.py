"""Prometheus collectors of one server instance, the gRPC interceptor that counts RPCs, and the /metrics endpoint.

Callers report whole batches (one call per request, table or level with counts); nothing here
touches keys one by one, and label values are bounded (configured models and tables, fixed level names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hps_server.cache import CacheStats

log = logging.getLogger(__name__)

# Label value standing for model names the server does not host, so clients cannot grow the series count.
UNKNOWN_MODEL: Final = "_unknown"

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Keys per table query: powers of four from 1 to about a million.
_BATCH_BUCKETS = tuple(float(4**i) for i in range(11))


@dataclass(frozen=True)
class LevelFetch:
    """One batched fetch of a lookup from one level (named as the session names it: l1_cache, hash_map,
    redis_cluster, rocksdb, or default for keys no level held)."""

    level: str
    keys: int
    hits: int
    # None: not timed (the default "level" does no work).
    seconds: float | None = None


@dataclass(frozen=True)
class CacheOccupancy:
    """One L1 cache's state at scrape time: a model table on one device."""

    model: str
    table: str
    device: str
    stats: CacheStats


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

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "table", "device"]
        rows = GaugeMetricFamily("hps_cache_rows", "Rows held by the L1 embedding cache.", labels=labels)
        capacity = GaugeMetricFamily("hps_cache_capacity_rows", "Rows the L1 embedding cache can hold.", labels=labels)
        hit_rate = GaugeMetricFamily(
            "hps_cache_hit_rate", "L1 hits / (hits + misses) since the cache was built.", labels=labels
        )
        for source in self._sources:
            for entry in source():
                values = [entry.model, entry.table, entry.device]
                rows.add_metric(values, entry.stats.rows)
                capacity.add_metric(values, entry.stats.capacity)
                hit_rate.add_metric(values, entry.stats.hit_rate)
        yield rows
        yield capacity
        yield hit_rate


class ServerMetrics:
    """Every collector of one server, in a registry of its own (several servers may share a process)."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._models = frozenset(models)
        r = self.registry
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
        self.keys = Counter("hps_lookup_keys", "Keys looked up, by model and table.", ["model", "table"], registry=r)
        self.batch_keys = Histogram(
            "hps_lookup_batch_keys", "Keys per table query of a lookup.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.level_keys = Counter(
            "hps_level_queried_keys",
            "Keys asked of a level (those the levels above missed).",
            ["model", "level"],
            registry=r,
        )
        self.level_hits = Counter(
            "hps_level_hits",
            "Keys answered by a level; level=default counts keys no level held.",
            ["model", "level"],
            registry=r,
        )
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
            "Model lifecycle events: loaded, failed.",
            ["model", "event"],
            registry=r,
        )
        self.models_loaded = Gauge("hps_models_loaded", "Models currently served.", registry=r)
        self.ready = Gauge("hps_ready", "1 while the health service reports SERVING.", registry=r)
        self._caches = _CacheCollector()
        r.register(self._caches)
        self._requests = _Children(self.requests)
        self._request_seconds = _Children(self.request_seconds)
        self._in_flight = _Children(self.in_flight)
        self._keys = _Children(self.keys)
        self._batch_keys = _Children(self.batch_keys)
        self._level_keys = _Children(self.level_keys)
        self._level_hits = _Children(self.level_hits)
        self._level_seconds = _Children(self.level_seconds)

    def model_label(self, model: str) -> str:
        return model if model in self._models else UNKNOWN_MODEL

    # ------------------------------------------------------------ reported by the session

    def record_lookup(self, model: str, table: str, keys: int, fetches: Iterable[LevelFetch] = ()) -> None:
        """One table query of a lookup: its key count and what each level it walked answered."""
        self._keys(model, table).inc(keys)
        self._batch_keys(model).observe(keys)
        for fetch in fetches:
            self._level_keys(model, fetch.level).inc(fetch.keys)
            self._level_hits(model, fetch.level).inc(fetch.hits)
            if fetch.seconds is not None:
                self._level_seconds(model, fetch.level).observe(fetch.seconds)

    def record_level_failure(self, level: str, operation: str) -> None:
        self.level_failures.labels(level, operation).inc()

    def record_model_event(self, model: str, event: str) -> None:
        """event: loaded or failed; keeps hps_models_loaded in step."""
        self.model_events.labels(model, event).inc()
        if event == "loaded":
            self.models_loaded.inc()

    def watch_caches(self, source: Callable[[], Iterable[CacheOccupancy]]) -> None:
        """Registers a callable listing L1 caches; it is called on every scrape."""
        self._caches.add(source)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # ------------------------------------------------------------ RPCs

    def interceptor(self) -> grpc.ServerInterceptor:
        return _RpcInterceptor(self)

    def rpc_started(self, method: str) -> None:
        self._in_flight(method).inc()

    def rpc_finished(self, model: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        label = self.model_label(model)
        self._requests(label, method, code.name).inc()
        self._request_seconds(label, method).observe(seconds)
        self._in_flight(method).dec()


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

    def _finish(self, model: str, method: str, context: grpc.ServicerContext, started: float, failed: bool) -> None:
        code = context.code()  # set by abort()/set_code(); None means the handler returned normally
        if code is None and failed:
            code = grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED
        self._metrics.rpc_finished(model, method, code or grpc.StatusCode.OK, time.perf_counter() - started)

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            self._metrics.rpc_started(method)
            started = time.perf_counter()
            failed = True
            try:
                reply = behavior(request, context)
                failed = False
                return reply
            finally:
                self._finish(getattr(request, "model", ""), method, context, started, failed)

        return handle

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            self._metrics.rpc_started(method)
            started = time.perf_counter()
            first_model = ""

            def remember_model(items: Iterator[Any]) -> Iterator[Any]:
                nonlocal first_model
                for item in items:
                    first_model = first_model or getattr(item, "model", "")
                    yield item

            failed = True
            try:
                yield from behavior(remember_model(requests), context)
                failed = False
            finally:
                self._finish(first_model, method, context, started, failed)

        return handle


class MetricsEndpoint:
    """The HTTP server answering GET /metrics from one registry, on a daemon thread."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"server.metrics_address: must be host:port, got {address!r}")
        self._server, self._thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
        self.port: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(address: str, metrics: ServerMetrics) -> MetricsEndpoint | None:
    """Starts /metrics on `address` (host:port, port 0 picks a free one); None when address is empty."""
    return MetricsEndpoint(address, metrics.registry) if address else None
