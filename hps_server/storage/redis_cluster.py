"""L2 volatile level on a Redis Cluster, in the layout HugeCTR HPS's Redis backend uses.

Talks only to Redis through redis-py: it knows nothing of models, sessions or other levels, never loops
over keys in Python, and never blocks a lookup on a sick cluster (it fails fast and recovers alone).

Layout (compatible with HugeCTR HPS, so a cluster it filled is served as it is). A backend table
"<model>.<table>" is HPS's tag name "hps_et.<model>.<table>"; it is split into `num_partitions`
partitions, and partition i is two Redis hashes that share one hash tag, so both live in one slot:

    hps_et{hps_et.<model>.<table>/p<i>}v   field: 8-byte little-endian int64 key
                                           value: dim little-endian float32 (the vector's raw bytes)
    hps_et{hps_et.<model>.<table>/p<i>}t   field: the same key
                                           value: 8-byte little-endian int64 Unix time of the last write
                                           (every insert, both policies: HPS reads it for overflow handling
                                           and dumps) or read (refreshed by fetches under evict_oldest)

A key goes to partition rrxmrrxmsx_0(uint64(key)) % num_partitions, with Pelle Evensen's 64-bit
mixer (the one HPS uses): x ^= ror(x,25) ^ ror(x,50); x *= 0xA24BAED4963EE407;
x ^= ror(x,24) ^ ror(x,49); x *= 0x9FB21C651E98DF25; x ^= x >> 28.

HPS writes access times in seconds; hps writes microseconds, so rows touched within one second are
still told apart, and reads values below 10^11 as seconds, so a cluster HPS filled is evicted in the
right order too (HPS reading hps's times would see hps's rows as the newest).

A batch becomes one HMGET (fetch) or HSET (insert) per partition and max_batch_size keys; a batch of
several tables (fetch_many, insert_many) puts every table's partitions into that same one round. NumPy
writes those commands in the Redis protocol (RESP2) in one pass; they go pipelined over one redis-py
connection per cluster node, the nodes served in parallel threads, and redis-py parses the replies
(with hiredis when it is installed).

A slot being migrated answers -ASK (sent again to the target behind ASKING), one moved answers
-MOVED (slot map updated, sent again). Writes that failed are invalidated and restarted masters flushed
before the next read (see docs/redis.md, "Redis is a cache").

With ttl_seconds, a partition's hashes expire ttl_seconds after the first write into them
(EXPIRE ... NX), so no row is served older than that; Redis 7.0 has no per-field expiry.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from hps_server.config import ConfigError, OverflowPolicy, VolatileDbConfig
from hps_server.storage.base import (
    DEFAULT_CHUNK_ROWS,
    KeyChunk,
    LevelUnavailableError,
    StorageError,
    StorageLevel,
    UnknownTableError,
    as_keys,
    as_vectors,
)

log = logging.getLogger(__name__)

TAG_PREFIX = "hps_et"
# Access times below this are HPS's seconds, not hps's microseconds (10^11 s is year 5138).
_SECONDS_BELOW = 10**11
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# How often the masters' run ids are compared with the ones last seen (besides every new connection).
_CHECK_INTERVAL_S = 2.0
# Keys of one table remembered for invalidation; past it the whole table is flushed instead.
STALE_KEYS_BOUND = 1 << 20
_RUN_ID = re.compile(rb"run_id:(\w+)")
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate verified
# but names another host.
_NAME_MISMATCH = {62, 64}
# Replies that mean "the cluster is moving or down", not "the command was wrong".
_UNAVAILABLE_REPLIES = (
    redis.exceptions.ClusterDownError,
    redis.exceptions.MovedError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
)
# RedisClusterException (topology trouble) is no RedisError.
_CONNECTION_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)

Packed = list[bytes | memoryview]
"""A command in the Redis protocol (RESP), in pieces sent back to back."""
Command = tuple[int, Packed]
"""(cluster slot, packed command): one partition's share of a round trip."""
_CRLF = np.frombuffer(b"\r\n", dtype=np.uint8)
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# Redirections followed per call: a migration answers ASK, then MOVED once it is done.
_MAX_REDIRECTS = 5


def _now() -> int:
    """An access time as stored: microseconds since the epoch."""
    return time.time_ns() // 1000


def _bulk(arg: bytes | str | int) -> bytes:
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


# A copy into a partition's rows (copy_many): each (key, row) pair is set only where the key is absent; one
# script per partition and batch, so no other client's write lands between test and set. One key, so a slot
# being migrated answers it -ASK like any other command, never -TRYAGAIN.
_KEEP_HELD = """
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 0
"""


def _command(*args: bytes | str | int, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> Packed:
    """One command in the Redis protocol: `args`, then each key's 8 bytes, each followed by its row of
    `values` (uint8 [n, width]) when given. NumPy lays out every key's bytes in one pass; redis-py would
    build and inspect one Python object per key."""
    n = 0 if keys is None else len(keys)
    head = b"*%d\r\n" % (len(args) + n * (1 if values is None else 2)) + b"".join(map(_bulk, args))
    if keys is None or not n:
        return [head]
    fields = [(b"$8\r\n", keys.astype("<i8").view(np.uint8).reshape(n, 8))]
    if values is not None:
        fields.append((b"$%d\r\n" % values.shape[1], values))
    body = np.empty((n, sum(len(prefix) + v.shape[1] + 2 for prefix, v in fields)), dtype=np.uint8)
    column = 0
    for prefix, field in fields:
        for part in (np.frombuffer(prefix, np.uint8), field, _CRLF):
            width = part.shape[-1]
            body[:, column : column + width] = part
            column += width
    return [head, body.data]


def _rotr(x: np.ndarray, n: int) -> np.ndarray:
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """HPS's key -> partition map (rrxmrrxmsx_0 mixer, then modulo), vectorized; int64 keys in."""
    x = as_keys(keys).view(np.uint64).copy()
    x ^= _rotr(x, 25) ^ _rotr(x, 50)
    x *= np.uint64(0xA24BAED4963EE407)
    x ^= _rotr(x, 24) ^ _rotr(x, 49)
    x *= np.uint64(0x9FB21C651E98DF25)
    x ^= x >> np.uint64(28)
    return (x % np.uint64(num_partitions)).astype(np.intp)


def hash_name(table: str, partition: int, suffix: str) -> str:
    """Name of a partition's value ("v") or access-time ("t") hash, as HPS spells it."""
    return f"{TAG_PREFIX}{{{TAG_PREFIX}.{table}/p{partition}}}{suffix}"


def _parse_address(address: str) -> set[tuple[str, int]]:
    nodes = set()
    for item in address.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"volatile_db.address: expected host:port[,host:port...], got {address!r}")
        nodes.add((host, int(port)))
    return nodes


def _tls_options(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, check_hostname: bool
) -> dict[str, Any]:
    """redis-py's TLS options, once the files are known to make a TLS context (redis-py reads them again for
    every new connection, so certificates renewed in place are picked up as connections are made)."""
    context = ssl.create_default_context()
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
    except OSError as e:
        raise ConfigError(f"volatile_db.tls_ca_file: cannot load it: {_unloadable(e)}") from e
    try:
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except OSError as e:
        raise ConfigError(f"volatile_db.tls_cert_file/tls_key_file: cannot load them: {_unloadable(e)}") from e
    return {
        "ssl": True,
        "ssl_ca_certs": str(ca_file) if ca_file else None,
        "ssl_certfile": str(cert_file) if cert_file else None,
        "ssl_keyfile": str(key_file) if key_file else None,
        "ssl_check_hostname": check_hostname,
    }


def _unloadable(error: OSError) -> str:
    """Why a TLS file did not load, without its path: a missing file, no PEM, a key not matching its cert."""
    reason = error.reason if isinstance(error, ssl.SSLError) else error.strerror
    return str(reason or type(error).__name__)


def _refused_certificate(error: BaseException | None) -> str:
    """What a configuration error says of a node certificate that did not verify ("" for other errors)."""
    while error is not None:
        if isinstance(error, ssl.SSLCertVerificationError):
            if error.verify_code in _NAME_MISMATCH:
                return (
                    f"volatile_db.tls_check_hostname: a redis node's certificate does not name the address hps "
                    f"connects to ({error.verify_message}); give the nodes certificates for the addresses they "
                    f"announce, or set tls_check_hostname: false"
                )
            return (
                f"volatile_db.tls_ca_file: a redis node's certificate does not verify against the CA "
                f"(tls_ca_file, or the system's trust store when unset): {error.verify_message}"
            )
        error = error.__cause__ or error.__context__
    return ""


def _refused_credentials(error: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, is Redis refusing the user or password."""
    while error is not None:
        if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.NoPermissionError):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Partitions:
    """Where one table's rows live: hash names and cluster slots of each partition."""

    def __init__(self, table: str, dim: int, num_partitions: int) -> None:
        self.table = table
        self.dim = dim
        self.values = [hash_name(table, p, "v") for p in range(num_partitions)]
        self.times = [hash_name(table, p, "t") for p in range(num_partitions)]
        self.slots = [key_slot(name.encode()) for name in self.values]


class RedisClusterLevel(StorageLevel):
    """Embedding rows in a Redis Cluster, shared by every hps replica that points at it.

    `failures` counts calls that found the cluster unreachable, slow or reconfiguring; each such call
    raised LevelUnavailableError at once (the session falls through to the persistent level). Until a
    background probe sees every master answer with cluster_state ok again, further calls raise the
    same error without touching the network; then the level serves again by itself.
    """

    kind = "redis_cluster"
    shared = True

    def __init__(
        self,
        address: str,
        *,
        user_name: str = "default",
        password: str = "",
        tls: bool = False,
        tls_ca_file: Path | None = None,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        tls_check_hostname: bool = True,
        num_partitions: int = 8,
        max_batch_size: int = 65536,
        timeout_ms: int = 100,
        ttl_seconds: int = 0,
        read_only: bool = False,
        overflow_margin: int = 2**63 - 1,
        overflow_policy: OverflowPolicy = "evict_random",
        overflow_resolution_target: float = 0.8,
    ) -> None:
        if num_partitions < 1:
            raise ConfigError(f"volatile_db.num_partitions: must be >= 1, got {num_partitions}")
        if max_batch_size < 1:
            raise ConfigError(f"volatile_db.max_batch_size: must be >= 1, got {max_batch_size}")
        self.read_only = read_only
        self.num_partitions = num_partitions
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_ms / 1000
        self.ttl_seconds = ttl_seconds
        self.overflow_margin = overflow_margin
        self.overflow_policy = overflow_policy
        self.overflow_target = max(1, int(overflow_margin * overflow_resolution_target))
        self.failures = 0
        self._seeds = _parse_address(address)
        self._client_options: dict[str, Any] = {
            "username": user_name or None,
            "password": password or None,
            **(_tls_options(tls_ca_file, tls_cert_file, tls_key_file, tls_check_hostname) if tls else {}),
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            # RESP2, as HPS speaks it: replies are plain arrays whatever the redis-py default.
            "protocol": 2,
        }
        self._tables: dict[str, _Partitions] = {}
        self._lock = threading.Lock()
        # Whether a level below holds every row, so rows here may be dropped to stay consistent with it.
        self._cache = False
        # Run id of every master as last verified ("host:port" -> run id); empty until first contact.
        self._run_ids: dict[str, str] = {}
        # What Redis may hold stale, dropped before it is read again: keys of writes whose outcome in Redis
        # is unknown (table -> key arrays), and whole partitions (a restarted or new master's, or a table
        # past STALE_KEYS_BOUND).
        self._stale_keys: dict[str, list[np.ndarray]] = {}
        self._stale_partitions: set[tuple[str, int]] = set()
        # In a worker group (share_staleness): the writer publishes whether it holds such a record; a
        # worker, which has none of it, reads nothing here while the writer does.
        self._group_marked: Callable[[], bool] | None = None
        self._group_mark: Callable[[bool], None] | None = None
        self._repair_lock = threading.Lock()
        self._closed = threading.Event()
        self._recovery: threading.Thread | None = None
        self._generation = 0
        self._healthy = False
        # Node pipelines run here; the calling thread serves one node itself.
        self._nodes_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="hps-redis")
        self._client: RedisCluster | None = None
        try:
            self._client = self._connect()
            self._healthy = True
        except LevelUnavailableError as e:
            log.warning("redis cluster at %s unreachable at start; serving without it until it answers: %s", address, e)
            self._fail(self._generation, str(e))
        self._watch = threading.Thread(target=self._watch_run_ids, name="hps-redis-watch", daemon=True)
        self._watch.start()

    def serve_as_cache(self) -> None:
        """A level below holds every row: from now on, writes that may not have reached Redis and masters
        that restarted (or were promoted) are invalidated here before Redis is read again."""
        self._cache = True

    def share_staleness(self, marked: Callable[[], bool] | None, mark: Callable[[bool], None] | None) -> None:
        self._group_marked, self._group_mark = marked, mark

    def _publish_stale(self) -> None:
        """Tells the group whether this (the writer's) level has stale rows to drop. Holds _lock."""
        if self._group_mark is not None:
            self._group_mark(bool(self._stale_keys or self._stale_partitions))

    def _check_group_fresh(self) -> None:
        """A worker's read: refused while the group's writer has rows here to drop that may be stale."""
        if self._group_marked is not None and self._group_marked():
            raise LevelUnavailableError(
                "redis cluster: the group's writer is dropping rows a failed write may have left stale"
            )

    @classmethod
    def from_config(cls, config: VolatileDbConfig) -> RedisClusterLevel:
        return cls(
            config.address,
            user_name=config.user_name,
            password=config.password,
            tls=config.tls,
            tls_ca_file=config.tls_ca_file,
            tls_cert_file=config.tls_cert_file,
            tls_key_file=config.tls_key_file,
            tls_check_hostname=config.tls_check_hostname,
            num_partitions=config.num_partitions,
            max_batch_size=config.max_batch_size,
            timeout_ms=config.timeout_ms,
            ttl_seconds=config.ttl_seconds,
            read_only=config.read_only,
            overflow_margin=config.overflow_margin,
            overflow_policy=config.overflow_policy,
            overflow_resolution_target=config.overflow_resolution_target,
        )

    # ------------------------------------------------------------ connection and failure handling

    def _connect(self) -> RedisCluster:
        """A fresh client with fresh connections and topology; checks every master is ok and compares its run
        id with the one last seen (see _trust). From then on every new connection of the client checks its
        node's run id too, so a master restarted behind a reconnect is never read unchecked."""
        armed = threading.Event()

        def verify(connection: redis.Connection) -> None:
            if armed.is_set():
                self._verify(connection)

        try:
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
                retry=Retry(NoBackoff(), 0),
                require_full_coverage=True,
                redis_connect_func=verify,
                **self._client_options,
            )
        except _CONNECTION_ERRORS as e:
            if _refused_credentials(e):
                raise ConfigError(
                    f"volatile_db.user_name/password: the redis cluster refused user "
                    f"{self._client_options['username'] or 'default'!r}: {e}"
                ) from e
            certificate = _refused_certificate(e)
            if certificate:
                raise ConfigError(certificate) from e
            raise LevelUnavailableError(f"redis cluster: cannot connect: {e}") from e
        try:
            for node in client.get_primaries():
                state = client.get_redis_connection(node).execute_command("CLUSTER INFO").get("cluster_state")
                if state != "ok":
                    raise LevelUnavailableError(f"redis cluster: node {node.name} says cluster_state {state}")
            run_ids = self._run_ids_of(client)
        except _CONNECTION_ERRORS as e:
            client.close()
            raise LevelUnavailableError(f"redis cluster: not ready: {e}") from e
        except LevelUnavailableError:
            client.close()
            raise
        # Remember every node seen, so a later reconnect works when the configured seeds are the dead ones.
        self._seeds |= {(node.host, int(node.port)) for node in client.get_nodes()}
        with self._lock:
            self._trust(client, run_ids)
        armed.set()
        return client

    @staticmethod
    def _run_ids_of(client: RedisCluster) -> dict[str, str]:
        """Each master's run id (INFO server), by "host:port"."""
        return {
            node.name: client.get_redis_connection(node).execute_command("INFO", "server")["run_id"]
            for node in client.get_primaries()
        }

    def _trust(self, client: RedisCluster, run_ids: dict[str, str]) -> None:
        """Takes `run_ids` as the masters' verified ones; a master whose run id differs from the one last
        seen restarted (maybe from an old snapshot), and one not seen as a master before may be a replica
        promoted before it had every write: each partition it serves is marked to be flushed. Holds _lock."""
        if self._cache and self._run_ids:
            changed = {name for name, run_id in run_ids.items() if self._run_ids.get(name) != run_id}
            if changed:
                log.warning(
                    "redis masters %s restarted or are new: their partitions refill from below", sorted(changed)
                )
            for parts in self._tables.values():
                for p, slot in enumerate(parts.slots):
                    if client.nodes_manager.get_node_from_slot(slot).name in changed:
                        self._stale_partitions.add((parts.table, p))
            self._publish_stale()
        self._run_ids = run_ids

    def _verify(self, connection: redis.Connection) -> None:
        """A new connection's node must be a master under the run id last verified (redis-py reconnects
        by itself, also to a node that restarted); otherwise the call fails and recovery checks it."""
        connection.send_command("INFO", "server")
        found = _RUN_ID.search(connection.read_response())
        name = f"{connection.host}:{connection.port}"
        if found is None or self._run_ids.get(name) != found.group(1).decode():
            raise redis.exceptions.ConnectionError(f"node {name} restarted or is not a known master")

    def _watch_run_ids(self) -> None:
        """Every _CHECK_INTERVAL_S: compares the masters' run ids with the verified ones and drops what may be
        stale at once (so other replicas sharing the cluster do not wait for this one's next read)."""
        while not self._closed.wait(_CHECK_INTERVAL_S):
            try:
                client, generation = self._current()
            except LevelUnavailableError:
                continue  # recovery checks them when it reconnects
            try:
                run_ids = self._run_ids_of(client)
            except _CONNECTION_ERRORS as e:
                self._fail(generation, f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                if generation == self._generation:
                    self._trust(client, run_ids)
            try:
                self._repair()
            except StorageError as e:
                log.debug("redis cluster: stale rows not dropped yet: %s", e)

    def _current(self) -> tuple[RedisCluster, int]:
        with self._lock:
            if self._healthy and self._client is not None:
                return self._client, self._generation
        raise LevelUnavailableError("redis cluster: unavailable, reconnecting in the background")

    def _fail(self, generation: int, reason: str) -> None:
        """Marks the level down (unless a newer client replaced the failing one) and starts recovery."""
        with self._lock:
            self.failures += 1
            if generation != self._generation or self._closed.is_set():
                return
            if self._healthy:
                log.warning("redis cluster unavailable, lookups fall through until it is back: %s", reason)
            self._healthy = False
            if self._recovery is None or not self._recovery.is_alive():
                self._recovery = threading.Thread(target=self._recover, name="hps-redis-recovery", daemon=True)
                self._recovery.start()

    def _recover(self) -> None:
        delay = _FIRST_BACKOFF_S
        while not self._closed.wait(delay):
            try:
                client = self._connect()
            except (LevelUnavailableError, ConfigError) as e:
                log.debug("redis cluster still unavailable: %s", e)
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    return
                old, self._client = self._client, client
                self._generation += 1
                self._healthy = True
            if old is not None:
                old.close()
            log.info("redis cluster available again (%d failures so far)", self.failures)
            return

    @property
    def available(self) -> bool:
        """False while the level is failing fast and probing the cluster in the background."""
        return self._healthy

    def _execute(self, commands: Sequence[Command], *, read: bool = False) -> list[Any]:
        """Runs commands, pipelined per node (one write, then every reply), nodes in parallel; returns the
        raw replies in command order.

        read: the replies are rows to serve, so what may be stale is dropped first (_repair), checked once
        the client is taken: a reconnect marks what it found stale before its client is used, so a check
        made before taking the client could miss it and read a restarted master's old rows.

        A slot being migrated (resharding) answers -ASK for a hash already moved: that command goes to the
        target node behind ASKING. A slot moved for good answers -MOVED: the slot map takes the new owner
        and the command is sent there. A MOVED to a node not verified as a master (a replica promoted by a
        failover, which may have missed writes) fails the call instead, so recovery checks it first."""
        client, generation = self._current()
        if read:
            self._repair()
            self._check_group_fresh()
        try:
            replies: list[Any] = [None] * len(commands)
            pending = [
                (i, client.nodes_manager.get_node_from_slot(slot), packed) for i, (slot, packed) in enumerate(commands)
            ]
            for _ in range(_MAX_REDIRECTS):
                self._round(client, pending, replies)
                pending = []
                for i, reply in enumerate(replies):
                    if not isinstance(reply, redis.exceptions.AskError):  # MovedError is one too
                        continue
                    target = f"{reply.host}:{reply.port}"
                    if isinstance(reply, redis.exceptions.MovedError):
                        if target not in self._run_ids:
                            raise reply
                        client.nodes_manager.move_slot(reply)
                        pending.append((i, client.nodes_manager.get_node_from_slot(commands[i][0]), commands[i][1]))
                    else:
                        node = client.nodes_manager.get_node(host=reply.host, port=reply.port) or ClusterNode(
                            reply.host, reply.port
                        )
                        pending.append((i, node, [_ASKING, *commands[i][1]]))
                if not pending:
                    break
            for reply in replies:
                if isinstance(reply, redis.exceptions.ResponseError):
                    raise reply
            return replies
        except redis.exceptions.ResponseError as e:
            if isinstance(e, _UNAVAILABLE_REPLIES):
                self._fail(generation, str(e))
                raise LevelUnavailableError(f"redis cluster: {e}") from e
            raise StorageError(f"redis cluster: {e}") from e
        except _CONNECTION_ERRORS as e:
            self._fail(generation, f"{type(e).__name__}: {e}")
            raise LevelUnavailableError(f"redis cluster: {type(e).__name__}: {e}") from e

    def _round(self, client: RedisCluster, commands: list[tuple[int, ClusterNode, Packed]], replies: list[Any]) -> None:
        """Sends (index, node, packed) commands, one pipelined write per node, nodes in parallel, and stores
        each reply (or the error the node answered, as an exception object) at its index. A command sent
        behind ASKING has ASKING's +OK read and dropped."""
        by_node: dict[str, tuple[ClusterNode, list[tuple[int, Packed]]]] = {}
        for i, node, packed in commands:
            by_node.setdefault(node.name, (node, []))[1].append((i, packed))

        def run(node: ClusterNode, items: list[tuple[int, Packed]]) -> None:
            pool = client.get_redis_connection(node).connection_pool
            connection = pool.get_connection()
            try:
                connection.send_packed_command(list(chain.from_iterable(packed for _, packed in items)))
                for i, packed in items:
                    if packed[0] is _ASKING:
                        connection.read_response()
                    try:
                        replies[i] = connection.read_response()
                    except redis.exceptions.ResponseError as e:  # a whole reply was read: the stream stays in step
                        replies[i] = e
            except BaseException:
                connection.disconnect()  # replies may be left unread on it
                raise
            finally:
                pool.release(connection)

        groups = list(by_node.values())
        futures = [self._nodes_pool.submit(run, node, items) for node, items in groups[1:]]
        try:
            if groups:
                run(*groups[0])
        finally:
            for future in futures:
                future.exception()  # wait for every node before reporting
        for future in futures:
            future.result()

    # ------------------------------------------------------------ keeping the cache honest

    def _record_stale(self, parts: Sequence[_Partitions], keys: np.ndarray, index: np.ndarray) -> None:
        """Remembers keys whose write failed (it may or may not have reached Redis) so they are dropped
        before Redis is read again; a table past STALE_KEYS_BOUND keys is flushed whole instead."""
        if not self._cache:
            return  # Redis is the authority: a failed write was reported, nothing below to refill from
        with self._lock:
            for t in np.unique(index).tolist():
                table = parts[t].table
                pending = self._stale_keys.setdefault(table, [])
                pending.append(keys[index == t])
                if sum(map(len, pending)) > STALE_KEYS_BOUND:
                    del self._stale_keys[table]
                    self._stale_partitions |= {(table, p) for p in range(self.num_partitions)}
            self._publish_stale()

    def _repair(self) -> None:
        """Drops from Redis what may be stale (HDEL of recorded keys, DEL of flagged partitions); what was
        recorded meanwhile stays for the next repair. Raises LevelUnavailableError when Redis refuses, so a
        read falls through and the rows are treated as misses until a repair succeeds."""
        if not (self._stale_keys or self._stale_partitions):
            return
        with self._repair_lock:  # readers wait here: none reads before the repair it needs is done
            with self._lock:
                keys = {table: list(arrays) for table, arrays in self._stale_keys.items()}
                partitions = set(self._stale_partitions)
            if not (keys or partitions):
                return  # another reader repaired it
            commands: list[Command] = []
            for table, p in sorted(partitions):
                parts = self._tables[table]
                # One DEL per hash: both live in one slot, but a slot being migrated refuses multi-key commands.
                commands += [(parts.slots[p], _command("DEL", name)) for name in (parts.values[p], parts.times[p])]
            for table, arrays in keys.items():
                parts = self._tables[table]
                unique = np.unique(np.concatenate(arrays))
                order, runs = self._split(unique, np.zeros(len(unique), dtype=np.intp))
                ordered = unique[order]
                for _, p, a, b in runs:
                    for name in (parts.values[p], parts.times[p]):
                        commands.append((parts.slots[p], _command("HDEL", name, keys=ordered[a:b])))
            self._execute(commands)
            with self._lock:
                self._stale_partitions -= partitions
                for table, arrays in keys.items():
                    pending = self._stale_keys.get(table)
                    # Arrays are only appended: the first ones are those repaired, unless the table was
                    # flushed whole since (a new list).
                    if pending is not None and all(a is b for a, b in zip(pending, arrays, strict=False)):
                        del pending[: len(arrays)]
                        if not pending:
                            del self._stale_keys[table]
                self._publish_stale()
            log.info(
                "redis cluster: dropped %d partitions and the keys of %d tables that may be stale",
                len(partitions),
                len(keys),
            )

    # ------------------------------------------------------------ the contract

    def create_table(self, table: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        with self._lock:
            known = self._tables.get(table)
            if known is not None:
                if known.dim != dim:
                    raise StorageError(f"table {table!r}: exists with dim {known.dim}, asked for dim {dim}")
                return
            self._tables[table] = _Partitions(table, dim, self.num_partitions)

    def _table(self, table: str) -> _Partitions:
        try:
            return self._tables[table]
        except KeyError:
            raise UnknownTableError(f"table {table!r}: not created in the redis cluster level") from None

    def dim(self, table: str) -> int:
        return self._table(table).dim

    def tables(self) -> list[str]:
        return sorted(self._tables)

    def _split(self, keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """Stable order grouping keys by (table position `index`, partition), and (table position, partition,
        start, stop) runs of at most max_batch_size keys in that order: one argsort for every table."""
        groups = index * self.num_partitions + partition_of(keys, self.num_partitions)
        order = np.argsort(groups, kind="stable")
        num_groups = (int(index.max(initial=0)) + 1) * self.num_partitions
        bounds = np.searchsorted(groups[order], np.arange(num_groups + 1))
        runs = []
        for group in np.flatnonzero(np.diff(bounds)):
            t, p = divmod(int(group), self.num_partitions)
            for start in range(int(bounds[group]), int(bounds[group + 1]), self.max_batch_size):
                runs.append((t, p, start, min(start + self.max_batch_size, int(bounds[group + 1]))))
        return order, runs

    def _hmget(self, parts: Sequence[_Partitions], keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """(order, flat replies of HMGET on the value hashes, in `order`): one pipelined round per node for
        every table's partitions."""
        order, runs = self._split(keys, index)
        ordered = keys[order]
        replies = self._execute(
            [(parts[t].slots[p], _command("HMGET", parts[t].values[p], keys=ordered[a:b])) for t, p, a, b in runs],
            read=True,
        )
        return order, list(chain.from_iterable(replies))

    def fetch(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = self._table(table)
        keys = as_keys(keys)
        return self._fetch([table], [parts], keys, np.zeros(len(keys), dtype=np.intp))

    def fetch_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        keys, index, _ = self._table_batch(tables, keys, table_index)
        return self._fetch(tables, [self._table(table) for table in tables], keys, index)

    def _fetch(
        self, tables: Sequence[str], parts: Sequence[_Partitions], keys: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        dim = parts[0].dim
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return vectors, found
        order, values = self._hmget(parts, keys, index)
        hit = np.fromiter(map(bool, values), dtype=bool, count=len(values))
        data = b"".join(filter(None, values))
        if len(data) != int(hit.sum()) * dim * 4:
            named = f"table {tables[0]!r}" if len(tables) == 1 else f"tables {list(tables)}"
            raise StorageError(f"{named}: redis holds vectors that are not {dim} float32 (wrong dim in the cluster?)")
        rows = order[hit]
        vectors[rows] = np.frombuffer(data, dtype="<f4").reshape(-1, dim)
        found[rows] = True
        if self.overflow_policy == "evict_oldest" and not self.read_only and len(rows):
            self._touch(tables, parts, keys[rows], index[rows])
        return vectors, found

    def _touch(self, tables: Sequence[str], parts: Sequence[_Partitions], keys: np.ndarray, index: np.ndarray) -> None:
        """Records a read as the keys' access time, so evict_oldest spares rows still in use.

        The rows were read already: a failure here is counted and logged, and the rows still served."""
        order, runs = self._split(keys, index)
        ordered = keys[order]
        now = np.full(len(keys), _now(), dtype="<i8").view(np.uint8).reshape(-1, 8)
        try:
            self._execute(
                [
                    (parts[t].slots[p], _command("HSET", parts[t].times[p], keys=ordered[a:b], values=now[a:b]))
                    for t, p, a, b in runs
                ]
            )
        except StorageError as e:
            log.warning("tables %s: access times not refreshed: %s", list(tables), e)

    def _writable(self, table: str) -> _Partitions:
        if self.read_only:
            raise StorageError(f"table {table!r}: the redis cluster level is read-only for this server")
        return self._table(table)

    def insert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        parts = self._writable(table)
        keys = as_keys(keys)
        self._insert([parts], keys, np.zeros(len(keys), dtype=np.intp), as_vectors(vectors, len(keys), parts.dim))

    def insert_many(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray
    ) -> None:
        self._insert_batch(tables, keys, table_index, vectors, keep_held=False)

    def copy_many(self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray) -> None:
        self._insert_batch(tables, keys, table_index, vectors, keep_held=True)

    def _insert_batch(
        self, tables: Sequence[str], keys: np.ndarray, table_index: np.ndarray, vectors: np.ndarray, keep_held: bool
    ) -> None:
        """insert_many and copy_many: the batch checked, then written (_insert)."""
        keys, index, dim = self._table_batch(tables, keys, table_index)
        vectors = as_vectors(vectors, len(keys), dim)
        self._insert([self._writable(table) for table in tables], keys, index, vectors, keep_held)

    def _insert(
        self,
        parts: Sequence[_Partitions],
        keys: np.ndarray,
        index: np.ndarray,
        vectors: np.ndarray,
        keep_held: bool = False,
    ) -> None:
        """Writes the rows (_write); a write that failed may or may not have reached Redis, so its keys are
        recorded to be dropped before Redis is read again."""
        if not len(keys):
            return
        try:
            self._write(parts, keys, index, vectors, keep_held)
        except StorageError:
            self._record_stale(parts, keys, index)
            raise

    def _write(
        self, parts: Sequence[_Partitions], keys: np.ndarray, index: np.ndarray, vectors: np.ndarray, keep_held: bool
    ) -> None:
        """HSETs of every table's partitions (the last row of a repeated key wins: HSET applies fields in
        order) with access times, TTLs and each touched partition's HLEN, in one round per node. keep_held:
        a key the partition holds keeps its row (one script per partition, _KEEP_HELD)."""
        order, runs = self._split(keys, index)
        ordered = keys[order]
        rows = vectors[order].view(np.uint8)
        now = np.full(len(keys), _now(), dtype="<i8").view(np.uint8).reshape(-1, 8)
        commands: list[Command] = []
        touched = sorted({(t, p) for t, p, _, _ in runs})
        for t, p, a, b in runs:
            slot = parts[t].slots[p]
            if keep_held:
                script = ("EVAL", _KEEP_HELD, 1, parts[t].values[p])
                commands.append((slot, _command(*script, keys=ordered[a:b], values=rows[a:b])))
            else:
                commands.append((slot, _command("HSET", parts[t].values[p], keys=ordered[a:b], values=rows[a:b])))
            # Under both policies: HPS's overflow handling and dumps read every row's access time (a copy's
            # keys are refreshed as accessed, those Redis kept included).
            commands.append((slot, _command("HSET", parts[t].times[p], keys=ordered[a:b], values=now[a:b])))
        if self.ttl_seconds:
            for t, p in touched:
                commands.append((parts[t].slots[p], _command("EXPIRE", parts[t].values[p], self.ttl_seconds, "NX")))
                commands.append((parts[t].slots[p], _command("EXPIRE", parts[t].times[p], self.ttl_seconds, "NX")))
        commands += [(parts[t].slots[p], _command("HLEN", parts[t].values[p])) for t, p in touched]
        sizes = self._execute(commands)[-len(touched) :]
        for (t, p), size in zip(touched, sizes, strict=True):
            if int(size) > self.overflow_margin:
                self._resolve_overflow(parts[t], p, int(size))

    def _resolve_overflow(self, parts: _Partitions, p: int, size: int) -> None:
        """Evicts down to overflow_resolution_target * overflow_margin rows in partition p."""
        excess = size - self.overflow_target
        victims = np.empty(0, dtype="<i8")
        if self.overflow_policy == "evict_oldest":
            (pairs,) = self._execute([(parts.slots[p], _command("HGETALL", parts.times[p]))])
            if pairs:
                seen = np.frombuffer(b"".join(pairs[1::2]), dtype="<i8")
                seen = np.where(seen < _SECONDS_BELOW, seen * 1_000_000, seen)
                victims = np.frombuffer(b"".join(pairs[0::2]), dtype="<i8")[np.argsort(seen, kind="stable")[:excess]]
        if len(victims) < excess:  # evict_random, or rows without an access time (written by others)
            (extra,) = self._execute([(parts.slots[p], _command("HRANDFIELD", parts.values[p], excess - len(victims)))])
            victims = np.concatenate([victims, np.frombuffer(b"".join(extra), dtype="<i8")])
        if len(victims):
            log.debug("partition %s: %d rows over %d, evicting %d", parts.values[p], size, self.overflow_margin, excess)
            self._execute(
                [
                    (parts.slots[p], _command("HDEL", parts.values[p], keys=victims)),
                    (parts.slots[p], _command("HDEL", parts.times[p], keys=victims)),
                ]
            )

    def evict(self, table: str, keys: np.ndarray) -> int:
        parts = self._writable(table)
        keys = as_keys(keys)
        if not len(keys):
            return 0
        order, runs = self._split(keys, np.zeros(len(keys), dtype=np.intp))
        ordered = keys[order]
        commands: list[Command] = []
        for _, p, a, b in runs:
            commands.append((parts.slots[p], _command("HDEL", parts.values[p], keys=ordered[a:b])))
            commands.append((parts.slots[p], _command("HDEL", parts.times[p], keys=ordered[a:b])))
        try:
            return sum(int(n) for n in self._execute(commands)[0::2])
        except StorageError:
            # A delete that may not have reached Redis: the rows must not be served from it again.
            self._record_stale([parts], keys, np.zeros(len(keys), dtype=np.intp))
            raise

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        parts = self._table(table)
        keys = as_keys(keys)
        found = np.zeros(len(keys), dtype=bool)
        if len(keys):
            order, values = self._hmget([parts], keys, np.zeros(len(keys), dtype=np.intp))
            found[order] = np.fromiter(map(bool, values), dtype=bool, count=len(values))
        return found

    def size(self, table: str) -> int:
        parts = self._table(table)
        replies = self._execute(
            [(parts.slots[p], _command("HLEN", parts.values[p])) for p in range(self.num_partitions)], read=True
        )
        return sum(int(n) for n in replies)

    def occupancy(self, table: str) -> tuple[int, int | None]:
        """HLEN and MEMORY USAGE (Redis's sampled estimate) of each partition's value and access-time hashes,
        in one pipelined round; no repair first (a scrape must not write), so rows awaiting one still count."""
        parts = self._table(table)
        commands = [
            (parts.slots[p], command)
            for p in range(self.num_partitions)
            for command in (
                _command("HLEN", parts.values[p]),
                _command("MEMORY", "USAGE", parts.values[p]),
                _command("MEMORY", "USAGE", parts.times[p]),
            )
        ]
        replies = self._execute(commands)
        rows = sum(int(n) for n in replies[0::3])
        return rows, sum(int(n or 0) for i, n in enumerate(replies) if i % 3)

    def dump(self, table: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[KeyChunk]:
        """Rows of every partition via HSCAN; rows written while dumping may be missed or repeated."""
        parts = self._table(table)
        self._repair()
        self._check_group_fresh()
        for p in range(self.num_partitions):
            cursor = b"0"
            while True:
                ((cursor, pairs),) = self._execute(
                    [(parts.slots[p], _command("HSCAN", parts.values[p], cursor, "COUNT", chunk_rows))]
                )
                for start in range(0, len(pairs), 2 * chunk_rows):
                    yield self._decode(table, parts, pairs[start : start + 2 * chunk_rows])
                if cursor == b"0":
                    break

    @staticmethod
    def _decode(table: str, parts: _Partitions, pairs: list[bytes]) -> KeyChunk:
        """(keys, vectors) from a flat [key, value, key, value, ...] reply."""
        keys = b"".join(pairs[0::2])
        data = b"".join(pairs[1::2])
        if len(keys) != 4 * len(pairs) or len(data) != len(pairs) // 2 * parts.dim * 4:
            raise StorageError(
                f"table {table!r}: redis holds keys or vectors of another size than int64, {parts.dim} float32"
            )
        return (
            np.frombuffer(keys, dtype="<i8").copy(),
            np.frombuffer(data, dtype="<f4").reshape(-1, parts.dim).copy(),
        )

    def close(self) -> None:
        self._closed.set()
        self._nodes_pool.shutdown(wait=True)
        with self._lock:
            client, self._client = self._client, None
            self._healthy = False
        if client is not None:
            client.close()
