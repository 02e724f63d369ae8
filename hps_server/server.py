"""The gRPC server process: hosts the models, serves hps.v1, health checking and reflection, drains on stop.

It wires the pieces together and owns their lifecycle; request handling lives in service.py.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2

from hps_server import addresses, health, tls
from hps_server.admission import AdmissionPool
from hps_server.allocator import keep_large_blocks_in_heap
from hps_server.auth import Authorizer
from hps_server.config import Config, ConfigError, ServerConfig
from hps_server.config import load as load_config
from hps_server.metrics import MetricsEndpoint, ServerMetrics, serve_metrics
from hps_server.models import CacheFactory, GroupRole, HostedModels
from hps_server.reflection import enable_reflection
from hps_server.service import Lookups, service_handlers
from hps_server.stop_signals import STOP_SIGNALS, StartSignals
from hps_server.storage.base import StorageError
from hps_wire._proto import hps_pb2

log = logging.getLogger(__name__)

# Why writes are refused on a server configured read-only (the session puts the model's name before it).

SERVICE_NAMES = tuple(hps_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("LookupService", "ModelService"))
# Health name of the write path: NOT_SERVING while Upsert and Delete would be refused (RocksDB failing its
# writes). Reads still work then, so the whole server ("") and the services stay SERVING for probes.
WRITES_HEALTH_NAME = "hps.v1.Writes"
# Threads answering health checks and reflection, and those of ModelService (LookupService has server.workers
# of its own): apart, so that a slow LoadModel or reload (minutes for a large model) never holds a health check.
CONTROL_THREADS = 2
MODEL_SERVICE_THREADS = 2
# Calls gRPC may hold that no server thread has taken yet: bursts far past the admission queue's, while what
# they may hold in memory (HTTP/2 flow control: a window of each call's bytes) stays bounded.
PENDING_CALLS = 10_000
# How often the write path's state is checked (and a failed level asked to retry its writes).
WRITES_CHECK_SECONDS = 1.0


class HpsServer:
    """One server: `start()` binds and serves, `stop()` drains in-flight calls and closes the levels.

    With server.tls it serves TLS only (see tls.py), with server.auth.tokens_file only the calls a caller's
    grant allows (see auth.py; health checking stays open), with server.read_only no writes.

    As one worker of several (supervisor.py): `shared_port` lets the others bind the same address,
    `group` sends its writes to the group's writer (which warmed the shared volatile level, so the worker
    warms only its L1), and `before_serving(stopped)` runs after warm-up
    and before health reports SERVING (it may block until the others are warm, or `stopped` is set).
    """

    def __init__(
        self,
        config: Config,
        cache_factory: CacheFactory | None = None,
        progress: bool = False,
        *,
        shared_port: bool = False,
        group: GroupRole | None = None,
        before_serving: Callable[[threading.Event], None] | None = None,
    ) -> None:
        self.config = config
        self.health = health.HealthServicer()
        self._writes_status: int | None = None  # what WRITES_HEALTH_NAME was last set to
        for name in ("", *SERVICE_NAMES, WRITES_HEALTH_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics = ServerMetrics(models=[model.name for model in config.models])
        # Credentials first: a bad tokens file or certificate fails the start before anything is opened.
        authorizer, self._credentials = security(config, self.metrics)
        # /metrics is up while the models load, so a slow or failing start shows (hps_ready 0, model events).
        self._metrics_endpoint: MetricsEndpoint | None = serve_metrics(config.server.metrics_address, self.metrics)
        self.metrics_port: int | None = self._metrics_endpoint.port if self._metrics_endpoint else None
        try:
            self.models = HostedModels.open(config, cache_factory, progress=progress, metrics=self.metrics, group=group)
        except BaseException:
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.close()
            raise
        self.metrics.watch_caches(self.models.cache_occupancy)
        self.metrics.watch_levels(self.models.level_states)
        self.metrics.watch_level_occupancy(self.models.level_occupancy)
        self.metrics.expect_levels(kind for kind, _ in self.models.level_states())
        message_bytes = config.server.max_message_mb * 1024 * 1024
        # Lookups and writes run on a pool with a bounded queue (over it: RESOURCE_EXHAUSTED at once); health
        # checks, reflection and ModelService on the server's own few threads, so a full queue never delays them.
        self.admission = AdmissionPool(
            config.server.workers, config.server.max_queued_requests, self.metrics.record_busy_refusal
        )
        self.metrics.watch_waiting(self.admission.waiting)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="hps-control"),
            interceptors=[self.metrics.interceptor()],
            options=[
                # gRPC refuses a larger request itself (RESOURCE_EXHAUSTED) before reading it into memory.
                # Not narrowed to what the key limits allow for the widest table: models loaded while
                # serving may have wider ones, and gRPC's limit is fixed at start.
                ("grpc.max_receive_message_length", message_bytes),
                ("grpc.max_send_message_length", message_bytes),
                # gRPC shares ports by default (SO_REUSEPORT): a second server on a served address would
                # start without error and take part of its connections. One process binds alone; the
                # workers of one supervisor share on purpose.
                ("grpc.so_reuseport", int(shared_port)),
                # Calls gRPC holds before a server thread has taken them: past its default (1,000, hard
                # limit 3,000) it cancels them unseen, so a burst got CANCELLED instead of the admission
                # pool's RESOURCE_EXHAUSTED, which clients know to back off from.
                ("grpc.server.max_pending_requests", PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
                *connection_age_options(config.server),
            ],
        )
        self.lookups = Lookups(self.models, config.server, authorizer)
        model_service = futures.ThreadPoolExecutor(MODEL_SERVICE_THREADS, thread_name_prefix="hps-models")
        self._grpc.add_generic_rpc_handlers(service_handlers(self.lookups, self.admission, model_service))
        health.add_to_server(self.health, self._grpc)
        if config.server.reflection_served:
            enable_reflection(self._grpc, (*SERVICE_NAMES, health.SERVICE_NAME))
        self.port = 0
        self.ready = threading.Event()
        self._warming: threading.Thread | None = None
        self._writes_watch: threading.Thread | None = None
        self._before_serving = before_serving
        self._stopped = threading.Event()
        self._closed = threading.Event()
        # Why closing the levels failed at the end (a final flush), or None: the exit code says so.
        self.close_failure: str | None = None
        self._state = threading.Lock()  # orders the SERVING flip after warm-up against a stop

    def start(self) -> int:
        """Binds the configured address and starts serving; returns the bound port."""
        address = self.config.server.address
        try:
            if self._credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, self._credentials)
        except RuntimeError as e:
            raise addresses.cannot_bind("server.address", address) from e
        self._grpc.start()
        log.info(
            "listening on port %d (%s); warming up before reporting SERVING",
            self.port,
            "plaintext" if self._credentials is None else "TLS",
        )
        self._warming = threading.Thread(target=self._warm_then_serve, name="hps-warm", daemon=True)
        self._warming.start()
        return self.port

    def _warm_then_serve(self) -> None:
        # Lookups are answered during warm-up (they fall through to the lower levels); readiness waits for it.
        try:
            self.models.warm(self._stopped)
        except Exception:
            log.exception("warm-up failed; serving with colder caches")
        if self._before_serving is not None:
            self._before_serving(self._stopped)
        with self._state:
            if self._stopped.is_set():
                return
            for name in ("", *SERVICE_NAMES):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._report_writes()
            self._writes_watch = threading.Thread(target=self._watch_writes, name="hps-writes", daemon=True)
            self._writes_watch.start()
            self.metrics.set_ready(True)
            self.ready.set()
        served = ", ".join(self.models.sessions) or "no model yet (LoadModel or a SIGHUP adds them)"
        log.info("serving %s on port %d", served, self.port)

    def _watch_writes(self) -> None:
        """Until stop: lets failed levels retry their writes, and keeps WRITES_HEALTH_NAME in step."""
        while not self._stopped.wait(WRITES_CHECK_SECONDS):
            self.models.retry_writes()
            with self._state:
                if not self._stopped.is_set():
                    self._report_writes()

    def _report_writes(self) -> None:
        """Sets WRITES_HEALTH_NAME when it changes (each set sends every Watch of it a message)."""
        refused = any(session.write_refusal() for session in self.models.sessions.values())
        status = health_pb2.HealthCheckResponse.NOT_SERVING if refused else health_pb2.HealthCheckResponse.SERVING
        if status != self._writes_status:
            self._writes_status = status
            self.health.set(WRITES_HEALTH_NAME, status)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocks until warm-up is done and health reports SERVING; False on timeout."""
        return self.ready.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within `grace` seconds, then closes the levels."""
        with self._state:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self.models.stopping.set()
            self.health.enter_graceful_shutdown()
            self.metrics.set_ready(False)
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        self._grpc.stop(grace).wait()
        for thread in (self._warming, self._writes_watch):
            if thread is not None:
                thread.join()  # each sees the stop soon (warm-up between chunks); the levels must outlive them
        self.lookups.replies.close()
        try:
            self.models.close()
        except StorageError as e:
            # Acknowledged writes may be lost: the process must not exit as if all went well.
            self.close_failure = str(e)
            log.error("closing the levels failed: %s", e)
        finally:
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.close()
            self._closed.set()
        log.info("stopped")

    def wait(self) -> None:
        """Blocks until stop() has finished (the levels closed)."""
        self._grpc.wait_for_termination()
        self._closed.wait()


def security(config: Config, metrics: ServerMetrics | None = None) -> tuple[Authorizer, grpc.ServerCredentials | None]:
    """The server's authorizer (counting refusals in `metrics`) and TLS credentials (None: plaintext) from
    server.auth and server.tls; ConfigError naming the field when a file is unusable."""
    authorizer = Authorizer(config.server.auth.tokens_file, metrics.record_auth_refusal if metrics else None)
    credentials = tls.server_credentials(config.server.tls) if config.server.tls.enabled else None
    if authorizer.enabled and credentials is None:
        log.warning("server.auth is on without server.tls: tokens cross the network in plaintext")
    return authorizer, credentials


def connection_age_options(server: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's options closing connections older than server.max_connection_age_seconds (none when it is 0):
    a GOAWAY makes long-lived client channels reconnect, so they spread over replicas added since, and
    calls in flight on the old connection get shutdown_grace_seconds to finish."""
    if not server.max_connection_age_seconds:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(server.max_connection_age_seconds * 1000))),
        ("grpc.max_connection_age_grace_ms", round(server.shutdown_grace_seconds * 1000)),
    ]


def serve(config: Config, cache_factory: CacheFactory | None = None, config_path: Path | None = None) -> int:
    """Runs a server in the foreground until SIGTERM or SIGINT, then drains; the exit code (see below).
    config_path: the file `config` was read from, read again on SIGHUP to load, unload and reload models.
    A stop signal while the models are opened or ingested raises StartInterrupted once they are closed."""
    keep_large_blocks_in_heap()
    signals = StartSignals()
    # Busy addresses stop the start before the tables are ingested (the metrics endpoint binds first thing).
    addresses.check_apart(config.server.address, config.server.metrics_address, 1)
    addresses.check_free(config.server.address, "server.address")
    return serve_until_signalled(HpsServer(config, cache_factory, progress=True), signals, config_path)


def serve_until_signalled(server: HpsServer, signals: StartSignals, config_path: Path | None = None) -> int:
    """Starts `server` and serves until SIGTERM or SIGINT, then drains; returns 0, or 1 when closing the
    levels failed (writes may be lost). A failed or interrupted start closes it and raises. With
    `config_path`, SIGHUP (one that came while starting too) reads that file again and applies its models
    (HostedModels.apply), one SIGHUP at a time."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, draining", signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="hps-drain").start()

    try:
        server.start()
        for signum in STOP_SIGNALS:  # until here a stop signal raises StartInterrupted
            signal.signal(signum, on_signal)
    except BaseException:
        server.stop(grace=0)  # closes the levels it opened
        raise
    if config_path is not None:
        reloading = threading.Lock()

        def reload_config() -> None:
            with reloading:
                log.info("received SIGHUP, reading the config file %r again", config_path.name)
                try:
                    applied = server.models.apply(load_config(config_path))
                except ConfigError as e:  # its message starts with the file's path: the log names the file
                    reason = str(e).replace(str(config_path), config_path.name)
                    log.error("config reload refused, models served as before: %s", reason)
                    return
                done = "; ".join(applied.done) or "no model changed"
                if applied.failed:
                    log.warning("config reload: %s; failed (see above): %s", done, "; ".join(applied.failed))
                else:
                    log.info("config reload: %s", done)

        def on_hangup() -> None:
            threading.Thread(target=reload_config, name="hps-sighup").start()

        signal.signal(signal.SIGHUP, lambda signum, frame: on_hangup())
        if signals.hangup_pending:
            on_hangup()
    server.wait()
    return 0 if server.close_failure is None else 1
