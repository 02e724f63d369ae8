"""The update stream: this server's Upserts and Deletes go to a Redis Stream the replicas share, and every
message there from the other replicas or from a trainer (the feed) is applied to this server's levels and L1.

It talks to Redis only about the stream (never about rows), writes rows only through the sessions, and
decides when cached copies may be stale (a gap in what it read) so the sessions drop them.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from hps_server.config import UpdatesConfig, VolatileDbConfig
from hps_server.log_limits import RateLimitedWarning
from hps_server.metrics import ServerMetrics
from hps_server.session import LookupSession
from hps_server.storage.base import StorageError
from hps_wire.update_message import BadUpdateMessageError, Op, UpdateMessage, decode, encode

log = logging.getLogger(__name__)

WARN_INTERVAL_SECONDS = 30
# Rows of this server's writes kept for publishing while the stream is unreachable; past it, each table's
# pending messages become one "drop" message (the other replicas drop their copies of the table instead).
PENDING_ROWS_BOUND = 1 << 20
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# After close(), the sender keeps trying to publish what is pending for this long.
FINAL_PUBLISH_SECONDS = 5.0
_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
_GAP = object()  # in the applier's queue: drop every cached copy before the entries that follow
_FELL_BEHIND = object()  # as _GAP, and this server's own levels missed messages the others applied (trimmed)
_STOP = object()

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: (id, fields)."""


def _printable(error: BaseException, longest: int = 300) -> str:
    """An error as one short line of printable text: redis-py's pipeline errors quote the commands, raw row
    bytes included."""
    text = re.sub(r" \(XADD .*\) of pipeline", " (XADD ...) of pipeline", str(error), flags=re.S)
    printable = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return printable if len(printable) <= longest else printable[: longest - 3] + "..."


def single_connection(host: str, port: int, socket_timeout: float, **options: Any) -> redis.Redis:
    """A connection to one Redis node that fails rather than reconnects: one socket (for pipelines too), no
    retries, and a socket opened again after the first (redis-py reopens a closed one on the next command,
    which could be a restarted, empty server) raises ConnectionError, so the caller re-checks which server
    it talks to. For one thread at a time."""
    opened = 0

    def on_connect(connection: redis.connection.AbstractConnection) -> None:
        nonlocal opened
        opened += 1
        if opened > 1:
            raise redis.ConnectionError(f"the connection to {host}:{port} was lost")
        connection.on_connect()

    return redis.Redis(
        host,
        port,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        redis_connect_func=on_connect,  # type: ignore[arg-type]  # redis-py calls it with the connection
        max_connections=1,  # pipelines too: one socket, so any second one is a reconnection
        **options,
    )


def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _nodes(address: str) -> list[ClusterNode]:
    nodes = []
    for item in address.split(","):
        host, _, port = item.strip().rpartition(":")
        nodes.append(ClusterNode(host, int(port)))
    return nodes


class UpdateFeed:
    """Publishes the sessions' writes (announce) and applies the stream's messages to them.

    Position: the id of the last entry read; on first contact, the stream's newest id (a server starting
    has cold caches and reads what its levels hold). A gap, after which this server drops every cached copy
    (L1 and in-process levels above the lowest) and reads on: the position's own entry was trimmed away (it
    fell about max_len messages behind), or on reconnecting the stream is shorter than the position or served
    by another master than before (a restart or failover that may have lost messages).
    """

    def __init__(
        self,
        config: UpdatesConfig,
        volatile: VolatileDbConfig,
        sessions: Callable[[], Mapping[str, LookupSession]],
        metrics: ServerMetrics | None = None,
        start_after: bytes | None = None,
    ) -> None:
        """sessions: the sessions served now (models load, unload and reload while serving; a session made
        later is announced through by whoever makes it: `publish`); start_after: a stream id to read on from
        at first contact instead of the newest (a replay)."""
        self.config = config
        self.origin = uuid.uuid4().hex
        self._known_nodes = _nodes(config.stream_address(volatile))
        self._stream = config.stream
        self._sessions = sessions
        self._metrics = metrics
        self._options: dict[str, Any] = {
            "username": volatile.user_name or None,
            "password": volatile.password or None,
            "ssl": volatile.tls,
            "socket_connect_timeout": max(0.1, volatile.timeout_ms / 1000),
            "protocol": 2,
        }
        self._timeout_s = max(0.1, volatile.timeout_ms / 1000)
        # The stream's master as last read from: (host:port, run id), and the position read up to.
        self._node: tuple[str, str] | None = None
        self._position: bytes | None = None
        # Whether the position is an entry of the stream the reader reads now, so that its absence means the
        # stream was trimmed past it; not after a change of master, whose stream never held it.
        self._anchored = True
        self._start_after = start_after
        self._reader: redis.Redis | None = None
        self._outbox = threading.Condition()
        self._collapsed = 0  # times the pending messages were replaced by drop messages
        self._pending: deque[tuple[tuple[str, str], int, dict[bytes, bytes]]] = deque()
        self._pending_rows = 0
        self._batches: queue.Queue[object] = queue.Queue(maxsize=4)
        self._closed = threading.Event()
        self._final_deadline = math.inf  # set by close(), before it sets _closed: the sender's last attempts end then
        self.connected = threading.Event()  # set while the stream answers; cleared on a failure
        self.applied_rows = 0
        self.gaps = 0
        self.bad_messages = 0
        # Models that other servers (or a trainer) wrote while this server did not serve them: loaded later,
        # their rows here may be older than what the others serve (models.py keeps them out of shared levels).
        self.missed_models: set[str] = set()
        self._applied = threading.Condition()
        self._applied_position: bytes | None = None
        self._warnings = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)
        self._threads = [
            threading.Thread(target=self._read, name="hps-updates-read", daemon=True),
            threading.Thread(target=self._apply, name="hps-updates-apply", daemon=True),
        ]
        self._sender = threading.Thread(target=self._send, name="hps-updates-send", daemon=True)

    def start(self) -> None:
        """Announces the sessions' writes from now on and starts reading the stream. The first contact is
        made here when the stream answers, so every message appended after start() is applied; otherwise the
        reader keeps trying in the background."""
        try:
            self._reader, node = self._connect_master(self.config.block_ms / 1000 + self._timeout_s)
            self._contact(node)
            self.connected.set()
        except _ERRORS as e:
            log.warning("update stream %s unreachable at start, retrying in the background: %s", self._stream, e)
            if self._reader is not None:
                self._reader.close()
            self._reader = None
        for session in self._sessions().values():
            session.announce = self.publish
        for thread in (*self._threads, self._sender):
            thread.start()

    # ------------------------------------------------------------ publishing this server's writes

    def publish(
        self,
        model: str,
        table: str,
        version: str,
        op: Op,
        keys: np.ndarray,
        vectors: np.ndarray | None,
        shared_written: bool,
    ) -> None:
        """Queues one acknowledged write for the stream (called under the table's lock, so writes keep their
        order) and returns: the sender thread appends it, and while the stream is unreachable it waits in
        memory and is sent, in order, once the stream answers."""
        fields = encode(UpdateMessage(model, table, op, keys, vectors, self.origin, shared_written, version))
        with self._outbox:
            self._pending.append(((model, table), len(keys), fields))
            self._pending_rows += len(keys)
            if self._pending_rows > PENDING_ROWS_BOUND:
                self._collapse_pending()
            self._outbox.notify()

    def _collapse_pending(self) -> None:
        """Replaces the pending messages by one drop message per table they touch (caller holds the outbox)."""
        tables = dict.fromkeys(name for name, _, _ in self._pending)
        log.warning(
            "update stream unreachable for over %d pending rows: the other replicas will drop their copies of "
            "%d tables instead",
            PENDING_ROWS_BOUND,
            len(tables),
        )
        self._pending = deque(
            (name, 0, encode(UpdateMessage(*name, "drop", np.empty(0, np.int64), None, self.origin))) for name in tables
        )
        self._pending_rows = 0
        self._collapsed += 1

    def _send(self) -> None:
        """The sender thread: XADDs what is pending in one pipeline, keeps it pending on failure (retried with
        backoff); after close() it makes one last attempt."""
        backoff = _FIRST_BACKOFF_S
        writer: redis.Redis | None = None
        while True:
            with self._outbox:
                self._outbox.wait_for(lambda: bool(self._pending) or self._closed.is_set())
                batch, collapsed = list(self._pending), self._collapsed
            if not batch:
                break
            try:
                if writer is None:
                    writer = self._connect_master(self._timeout_s)[0]
                pipe = writer.pipeline(transaction=False)
                for _, _, fields in batch:
                    pipe.xadd(self._stream, fields, maxlen=self.config.max_len, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
            except Exception as e:  # whatever went wrong, the messages stay pending
                pending = len(batch)
                self._warnings.warn(
                    "update stream %s: %d messages wait to be published: %s", self._stream, pending, _printable(e)
                )
                if writer is not None:
                    writer.close()
                writer = None
                if self._closed.is_set():
                    remaining = self._final_deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    time.sleep(min(backoff, remaining))
                else:
                    self._closed.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            backoff = _FIRST_BACKOFF_S
            with self._outbox:
                if self._collapsed == collapsed:  # else the drop messages that replaced them stay, to be sent
                    for _ in batch:
                        _, rows, _ = self._pending.popleft()
                        self._pending_rows -= rows
        if writer is not None:
            writer.close()

    # ------------------------------------------------------------ reading the stream

    def _connect_master(self, socket_timeout: float) -> tuple[redis.Redis, tuple[str, str]]:
        """A connection to the master serving the stream's slot, and its (host:port, run id). A plain
        connection without retries: a MOVED (failover, resharding) or a timeout is an error here, so a new or
        frozen master is noticed at once, and so is a lost socket (the master may have restarted). Every node
        seen is remembered, so the configured seeds may die."""
        cluster = RedisCluster(startup_nodes=list(self._known_nodes), socket_timeout=self._timeout_s, **self._options)
        try:
            node = cluster.get_node_from_key(self._stream)
            host, port = node.host, int(node.port)
            seen = {(n.host, int(n.port)) for n in self._known_nodes}
            self._known_nodes = self._known_nodes + [
                ClusterNode(n.host, int(n.port)) for n in cluster.get_nodes() if (n.host, int(n.port)) not in seen
            ]
        finally:
            cluster.close()
        connection = single_connection(host, port, socket_timeout, **self._options)
        run_id = str(connection.info("server")["run_id"])
        return connection, (f"{host}:{port}", run_id)

    def _read(self) -> None:
        backoff = _FIRST_BACKOFF_S
        behind = True  # whether the last read found entries (more may follow): read without blocking
        while not self._closed.is_set():
            try:
                if self._reader is None:
                    self._reader, node = self._connect_master(self.config.block_ms / 1000 + self._timeout_s)
                    self._contact(node)
                    self.connected.set()
                    backoff = _FIRST_BACKOFF_S
                    behind = True
                entries = self._read_checked() if behind else self._read_blocking()
            except Exception as e:  # whatever went wrong, the reader reconnects rather than die
                self.connected.clear()
                if not isinstance(e, _ERRORS):
                    log.exception("update stream: unexpected failure reading; reconnecting")
                self._warnings.warn("update stream %s unreachable, retrying: %s", self._stream, e)
                if self._reader is not None:
                    self._reader.close()
                self._reader = None
                self._closed.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            behind = bool(entries)
            if entries:
                self._position, self._anchored = entries[-1][0], True
                self._batches.put(entries)
        self._batches.put(_STOP)

    def _read_checked(self) -> list[Entry]:
        """The entries after the position, read atomically with a check that the position's own entry is
        still in the stream (trimming removes the oldest first: while it is there, nothing after it is gone)."""
        assert self._reader is not None and self._position is not None
        position = self._position
        pipe = self._reader.pipeline(transaction=True)
        pipe.xrange(self._stream, position, position)
        pipe.xread({self._stream: position}, count=self.config.read_count)
        held, reply = pipe.execute()
        if not held and self._anchored and _id(position) != (0, 0):
            self._gap(
                "messages after this server's position were trimmed (it fell over updates.max_len behind)",
                fell_behind=True,
            )
        return reply[0][1] if reply else []

    def _read_blocking(self) -> list[Entry]:
        """Waits up to block_ms for entries after the position. Redis hands a blocked reader the entries as
        they are appended, so none is trimmed before it sees them: no check is needed."""
        assert self._reader is not None and self._position is not None
        reply = self._reader.xread(
            {self._stream: self._position}, count=self.config.read_count, block=self.config.block_ms
        )
        return reply[0][1] if reply else []  # type: ignore[index,return-value]  # RESP2

    def _contact(self, node: tuple[str, str]) -> None:
        """On (re)connecting: the position is the stream's newest id on first contact; afterwards a master
        other than the one last read (failover, restart: messages may be lost) or a stream shorter than
        the position is a gap."""
        assert self._reader is not None
        last = self._reader.xrevrange(self._stream, count=1)
        newest: bytes = last[0][0] if last else b"0-0"  # type: ignore[index,assignment]  # RESP2
        if self._position is None:
            self._position, self._node = self._start_after or newest, node
            with self._applied:
                self._applied_position = self._position
                self._applied.notify_all()
            return
        if node != self._node:
            self._gap(f"the stream is served by another master, or a restarted one ({node[0]})")
            self._anchored = False  # the new stream's entries after the position are read, unchecked
        elif _id(newest) < _id(self._position):
            self._gap("the stream lost messages this server had read")
        self._node = node
        if _id(newest) < _id(self._position):
            self._position, self._anchored = newest, True

    def _gap(self, reason: str, fell_behind: bool = False) -> None:
        log.warning("update stream: %s; dropping every cached copy of this server's tables", reason)
        self._batches.put(_FELL_BEHIND if fell_behind else _GAP)

    # ------------------------------------------------------------ applying what was read

    def _apply(self) -> None:
        while (item := self._batches.get()) is not _STOP:
            if item is _GAP or item is _FELL_BEHIND:
                self.gaps += 1
                if self._metrics is not None:
                    self._metrics.update_gaps.inc()
                for session in self._sessions().values():
                    try:
                        session.drop_copies(missed=item is _FELL_BEHIND)
                    except StorageError as e:
                        log.error("update stream: dropping the copies of model %s failed: %s", session.name, e)
                continue
            entries: list[Entry] = item  # type: ignore[assignment]
            try:
                self._apply_entries(entries)
            except Exception:
                # The applier must outlive one bad batch; its copies may be stale now, so they are dropped.
                log.exception("update stream: applying %d entries failed", len(entries))
                self._batches.put(_GAP)
            with self._applied:
                self._applied_position = entries[-1][0]
                self._applied.notify_all()

    def _apply_entries(self, entries: Sequence[Entry]) -> None:
        """Decodes the entries and applies each run of consecutive messages of one table, op and source
        with one session call (keys and vectors concatenated in order: the last write of a key wins)."""
        messages = []
        sessions = self._sessions()
        served = {(name, t.name): t for name, s in sessions.items() for t in s.tables.values()}
        dims = {name: table.dim for name, table in served.items()}
        for entry_id, fields in entries:
            try:
                message = decode(fields, dims)
            except BadUpdateMessageError as e:
                self.bad_messages += 1
                if self._metrics is not None:
                    self._metrics.update_skipped.inc()
                if e.unserved is not None:  # written elsewhere while not served here: its rows here miss it
                    self.missed_models.add(e.unserved[0])
                self._warnings.warn("update stream: entry %s skipped: %s", entry_id.decode(errors="replace"), e)
                continue
            # A write to another version of the table (replicas mid-way through a version change) is not
            # this server's rows: a reply is consistent with exactly one version.
            of_version = message.version in (None, served[(message.model, message.table)].config.version)
            if message.origin != self.origin and of_version:
                messages.append(message)
        run: list[UpdateMessage] = []
        for message in messages:
            if run and _run_key(run[0]) != _run_key(message):
                self._apply_run(run)
                run = []
            run.append(message)
        if run:
            self._apply_run(run)
        if self._metrics is not None and entries:
            appended_ms = _id(entries[-1][0])[0]
            self._metrics.update_lag_seconds.observe(max(0.0, time.time() - appended_ms / 1000))

    def _apply_run(self, run: Sequence[UpdateMessage]) -> None:
        first = run[0]
        keys = np.concatenate([m.keys for m in run]) if len(run) > 1 else first.keys
        vectors = None
        if first.op == "upsert":
            vectors = np.concatenate([m.vectors for m in run]) if len(run) > 1 else first.vectors  # type: ignore[misc]
        replica = bool(first.origin)
        try:
            session = self._sessions().get(first.model)
            if session is None:  # unloaded since the entry was read
                return
            session.apply_update(first.table, first.op, keys, vectors, skip_shared=replica and first.shared_written)
        except StorageError as e:
            self._warnings.warn(
                "update stream: rows of %s not applied (%d here): %s", f"{first.model}.{first.table}", len(keys), e
            )
            return
        self.applied_rows += len(keys)
        if self._metrics is not None:
            self._metrics.update_rows.labels("replica" if replica else "feed").inc(len(keys))

    # ------------------------------------------------------------ lifecycle

    def wait_applied(self, position: bytes, timeout: float) -> bool:
        """Blocks until the entries up to `position` (a stream id) were applied here; False on timeout."""
        target = _id(position)
        with self._applied:
            return self._applied.wait_for(
                lambda: self._applied_position is not None and _id(self._applied_position) >= target, timeout
            )

    def close(self) -> None:
        """Stops reading and applying (what was read is applied first); pending messages are sent, retried for
        up to FINAL_PUBLISH_SECONDS. Raises StorageError when some were never published: acknowledged writes
        the other replicas will not see."""
        self._final_deadline = time.monotonic() + FINAL_PUBLISH_SECONDS
        self._closed.set()
        for session in self._sessions().values():
            session.announce = None
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self.config.block_ms / 1000 + self._timeout_s + 5)
        with self._outbox:
            self._outbox.notify()
        self._sender.join(timeout=FINAL_PUBLISH_SECONDS + 5 * self._timeout_s + 5)
        if self._reader is not None:
            self._reader.close()
        with self._outbox:
            unpublished = len(self._pending)
        if unpublished:
            raise StorageError(
                f"update stream {self._stream}: {unpublished} messages of this server's acknowledged writes were "
                f"never published; the other replicas do not have them"
            )


def _run_key(message: UpdateMessage) -> tuple[str, str, str, bool, bool]:
    return message.model, message.table, message.op, bool(message.origin), message.shared_written
