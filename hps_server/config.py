"""Configuration: a YAML file or a HugeCTR HPS ps.json, parsed once into typed, validated objects.

Every option and its default is stated here, next to its meaning; nothing downstream reads raw
dicts. Invalid input raises ConfigError naming the field and the reason (never a secret or a file's path).
No I/O beyond reading the file and the password file it names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import reprlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from hps_server.cores import usable_cores

log = logging.getLogger(__name__)

# The widest table: rows of 256 KB (float32). HPS's tables are far narrower; the bound keeps a config (or a
# LoadModel) from asking the levels for memory no host has.
MAX_DIM = 65_536
# The most tables of one model. Each is a RocksDB column family, whose creation holds Python's lock for a time
# that grows with the families the database holds (tens of ms past a few hundred): a LoadModel of thousands
# stalled every lookup for minutes. HPS's models have tens.
MAX_TABLES = 1024
# The most keys one request may ask of one table (max_batch_size x max_keys_per_sample): its L1 holds them.
MAX_KEYS_PER_QUERY = 2**31

T = TypeVar("T")

OverflowPolicy = Literal["evict_oldest", "evict_random"]
VolatileType = Literal["hash_map", "redis_cluster", "disabled"]
PersistentType = Literal["rocksdb", "disabled"]
CacheDtype = Literal["float32", "float16"]
GpuPlacement = Literal["replicated", "sharded"]


# Environment variable that, when set, replaces volatile_db.password.
PASSWORD_ENV = "HPS_REDIS_PASSWORD"
# Environment variable that, when set, replaces server.auth.tokens_file.
TOKENS_FILE_ENV = "HPS_AUTH_TOKENS_FILE"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


class UnknownNameError(KeyError):
    """A model or table name the config does not have; the message lists the names it has."""

    def __str__(self) -> str:
        return str(self.args[0])


def _names(names: list[str]) -> str:
    return ", ".join(names) or "none"


@dataclass(frozen=True)
class TlsConfig:
    """TLS of the gRPC server (PEM files, re-read when they change: certificates rotate without a restart)."""

    # The server's certificate chain and private key; both or neither (neither: plaintext).
    cert_file: Path | None = None
    key_file: Path | None = None
    # CAs whose client certificates are accepted; set: mutual TLS (clients without such a certificate are
    # refused during the handshake).
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class AuthConfig:
    """Who may call what (see auth.py): bearer tokens, or verified client certificates, with per-model grants."""

    # YAML file `tokens: [{token | token_sha256 | client_cert_name, read, write, admin}]`, re-read when it
    # changes; None: no authentication (every caller may do everything). HPS_AUTH_TOKENS_FILE replaces it.
    tokens_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None


@dataclass(frozen=True)
class ServerConfig:
    # host:port the gRPC server listens on (loopback unless configured; 0.0.0.0:8500 serves every interface).
    address: str = "127.0.0.1:8500"
    # Largest request or reply message, in MiB (gRPC's default of 4 MiB is too small for embeddings).
    max_message_mb: int = 256
    # Threads serving LookupService RPCs (Lookup, StreamLookup, Upsert, Delete); each in-flight call holds one.
    workers: int = 16
    # On SIGTERM/SIGINT, in-flight calls get this long to finish before the server stops.
    shutdown_grace_seconds: float = 10.0
    # host:port of the Prometheus /metrics endpoint; empty disables it.
    metrics_address: str = ""
    # Lookups arriving while a pass runs are coalesced into the next pass anyway; this makes a pass
    # also wait up to this many microseconds for more before starting (0: never wait; see
    # docs/performance.md for the measurements behind the default).
    batch_window_us: int = 0
    # Calls waiting at most: LookupService calls for one of the `workers` threads (counted from when gRPC
    # hands them over), and lookups for a pass; one more is refused at once with RESOURCE_EXHAUSTED, so
    # latency stays bounded under overload. Health checks, reflection and ModelService have threads of
    # their own and never wait behind them.
    max_queued_requests: int = 256
    # Per request, checked before any level work (over a limit: RESOURCE_EXHAUSTED naming it): table
    # queries of a Lookup (TableQueries plus packed segments), keys of a Lookup over all its queries, and
    # keys of one Upsert or Delete. A request over max_message_mb is refused by gRPC before it is read.
    max_queries_per_request: int = 4096
    max_keys_per_request: int = 4_194_304
    max_keys_per_write: int = 262_144
    # Open StreamLookup calls at most (each holds an RPC thread while open; below `workers` so Lookups
    # and health checks always find one; 0: half of `workers`), and how long one may receive nothing
    # before it is cancelled.
    max_streams: int = 0
    stream_idle_seconds: float = 60.0
    # Server processes sharing `address`: 1 serves in this process and binds the port alone; N > 1 starts
    # a supervisor and N worker processes (see supervisor.py: one hash map in shared memory and one L1 per
    # GPU for all of them, writes through the supervisor). `auto` in the file or on the command line: one
    # per usable core (cores.py: the CPU affinity, fewer under a container's CPU limit). `hps serve
    # --processes` overrides it.
    processes: int = 1
    # Clients' connections are closed (GOAWAY, in-flight calls get shutdown_grace_seconds to finish) once
    # this old, so long-lived channels reconnect and spread over replicas added since; a StreamLookup still
    # open after the grace ends with UNAVAILABLE and is reopened by its client; 0: never.
    max_connection_age_seconds: float = 0.0
    # Model admin RPCs (LoadModel, UnloadModel, ReloadModel) are answered only when true; off, they are
    # refused with PERMISSION_DENIED. They change what every client of the server sees.
    admin: bool = False
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    # Refuse Upsert and Delete (FAILED_PRECONDITION) on this server, whatever its levels and callers may do.
    read_only: bool = False
    # Serve gRPC reflection; None: served when auth is off, not when it is on.
    reflection: bool | None = None

    @property
    def reflection_served(self) -> bool:
        return (not self.auth.enabled) if self.reflection is None else self.reflection

    @property
    def streams_allowed(self) -> int:
        """max_streams, or half of the RPC threads (at least one) when it is 0."""
        return self.max_streams or max(1, self.workers // 2)


@dataclass(frozen=True)
class VolatileDbConfig:
    """L2: RAM shared by the models of a server (hash_map) or by replicas (redis_cluster)."""

    # hash_map (in-process), redis_cluster, or disabled.
    type: VolatileType = "hash_map"
    # Most rows kept per table (hash_map) or per partition (redis_cluster); beyond it the
    # overflow policy evicts down to overflow_resolution_target * overflow_margin rows.
    overflow_margin: int = 2**63 - 1
    # Which rows go first on overflow: the least recently accessed or random ones.
    overflow_policy: OverflowPolicy = "evict_random"
    # Fraction of overflow_margin kept after an overflow is resolved, in (0, 1].
    overflow_resolution_target: float = 0.8
    # Fraction of each table copied from the persistent level into this one at start (HPS default).
    initial_cache_rate: float = 1.0
    # Write rows found in the persistent level back into this one.
    cache_missed_embeddings: bool = True
    # redis_cluster: comma-separated host:port seed nodes.
    address: str = "127.0.0.1:7000"
    # redis_cluster: ACL user name and password (empty: no AUTH). The password is the environment
    # variable HPS_REDIS_PASSWORD when set (so it can come from a Kubernetes Secret), else the content of
    # password_file (read at start, trailing newline dropped), else `password`; not both keys.
    user_name: str = "default"
    password: str = ""
    # redis_cluster: connect with TLS (ps.json: enable_tls). The nodes' certificates must chain to the CA
    # in tls_ca_file (PEM; None: the system's trust store; ps.json: tls_ca_certificate) and, with
    # tls_check_hostname, name the address hps connects to (as given in `address` or announced by the
    # cluster). tls_cert_file and tls_key_file (PEM; ps.json: tls_client_certificate, tls_client_key) are
    # the client certificate shown to a cluster with tls-auth-clients; the key may sit in tls_cert_file.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    # redis_cluster: hashes each table is split into (one cluster slot each).
    num_partitions: int = 8
    # Keys per backend round trip; larger batches are chunked.
    max_batch_size: int = 65536
    # redis_cluster: per-call timeout in milliseconds before a lookup falls through.
    timeout_ms: int = 100
    # redis_cluster: expire rows this many seconds after they are written (0: never).
    ttl_seconds: int = 0
    # This replica reads the level but never writes to it.
    read_only: bool = False
    # hash_map: the name of the shared-memory level to attach to; empty: this process's own memory. Set by
    # the supervisor of `hps serve --processes N` for its workers (not read from config files).
    shared_memory: str = ""


@dataclass(frozen=True)
class PersistentDbConfig:
    """L3: every row of every table, on local disk."""

    # rocksdb or disabled.
    type: PersistentType = "rocksdb"
    # RocksDB folder; relative paths are resolved against the config file's folder.
    path: Path = Path("hps-data/rocksdb")
    # Open read-only (serving replicas that share a prepared database).
    read_only: bool = False
    # RocksDB background threads.
    num_threads: int = 16
    # Keys per multi_get; larger batches are chunked.
    max_batch_size: int = 65536
    # fsync the write-ahead log before a write is acknowledged: acknowledged writes then survive a power
    # loss, not only a process kill (docs/performance.md has its cost).
    sync_writes: bool = False


@dataclass(frozen=True)
class UpdatesConfig:
    """Online updates through one Redis Stream: this server publishes its Upserts and Deletes there, and
    applies every other replica's and a trainer's batches (the feed) to its own levels and L1."""

    # On where a Redis Cluster holds the stream: `address`, or volatile_db's cluster when volatile_db.type
    # is redis_cluster. Off: writes reach this server only, and no feed is read.
    enabled: bool = True
    # Comma-separated host:port seed nodes of the cluster holding the stream (volatile_db's user, password
    # and tls apply); empty: volatile_db.address.
    address: str = ""
    # The stream's key; it lives on one cluster slot (its master holds every message).
    stream: str = "hps_updates"
    # Messages the stream keeps (XADD MAXLEN ~): a replica that falls further behind drops its caches.
    max_len: int = 10_000
    # Most messages one XREAD returns (they are applied together, a run of one table in one write).
    read_count: int = 64
    # How long one XREAD waits for a message before asking again, in milliseconds.
    block_ms: int = 1000

    def stream_address(self, volatile: VolatileDbConfig) -> str:
        """The seeds of the cluster holding the stream; empty when updates are off or no cluster is configured."""
        if not self.enabled:
            return ""
        return self.address or (volatile.address if volatile.type == "redis_cluster" else "")


@dataclass(frozen=True)
class TableConfig:
    name: str
    # Elements per embedding vector.
    dim: int
    # Keys no level holds get a vector filled with this value.
    default_value: float = 0.0
    # Table files ingested into the persistent level on first start: an HPS folder with `key`
    # and `emb_vector`, or a folder with keys.npy and vectors.npy. None: the table is imported
    # separately (`hps import`).
    source: Path | None = None
    # Most keys one sample may carry for this table; with the model's max_batch_size it bounds
    # the keys of one request (HPS: maxnum_catfeature_query_per_table_per_sample).
    max_keys_per_sample: int = 1
    # Which version of the table's rows is served (`hps import --version`); empty: the unversioned rows.
    # Each version is a table of its own in the levels (see ModelConfig.storage_name).
    version: str = ""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    tables: tuple[TableConfig, ...]
    # Most samples per request.
    max_batch_size: int = 1024
    # L1 embedding cache on the GPU (the NumPy reference cache where no GPU is present).
    gpucache: bool = True
    # L1 slots per table row (set-associative: at 1, about 93 % of uniformly spread rows fit).
    gpucacheper: float = 0.5
    # Above this L1 hit rate, rows fetched from lower levels are inserted into L1 in the background.
    hit_rate_threshold: float = 0.9
    # GPUs holding this model's L1, each named once (how: gpu_placement).
    deployed_device_list: tuple[int, ...] = (0,)
    # replicated: every device holds a whole cache of the model, requests are spread over them;
    # sharded: each table's rows are split over the devices by a hash of the key, so L1 holds their sum.
    gpu_placement: GpuPlacement = "replicated"
    # Hold whole tables on the GPU (hash probe + gather) instead of a cache.
    use_static_table: bool = False
    # Above hit_rate_threshold, answer L1 misses with the default vector while the true rows are
    # fetched in the background (HugeCTR's behaviour). Off: replies always carry stored vectors.
    answer_misses_with_default: bool = False
    # Element type the L1 cache stores (float16 halves its memory).
    gpucache_dtype: CacheDtype = "float32"
    # HPS keys accepted for compatibility and kept as given; hps does not act on them.
    hps_extras: Mapping[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> TableConfig:
        for table in self.tables:
            if table.name == name:
                return table
        raise UnknownNameError(
            f"model {self.name} has no table {shown(name)}; its tables: {_names([t.name for t in self.tables])}"
        )

    def max_keys(self, table: TableConfig) -> int:
        return self.max_batch_size * table.max_keys_per_sample

    def storage_name(self, table: TableConfig) -> str:
        """The table's name inside the storage levels, shared by every model of a server: `<model>.<table>`,
        and `<model>.<table>@<version>` for a version (its own RocksDB column family, its own Redis hashes)."""
        name = f"{self.name}.{table.name}"
        return f"{name}{VERSION_MARK}{table.version}" if table.version else name


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    volatile_db: VolatileDbConfig = VolatileDbConfig()
    persistent_db: PersistentDbConfig = PersistentDbConfig()
    models: tuple[ModelConfig, ...] = ()
    updates: UpdatesConfig = UpdatesConfig()

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        models = _names([m.name for m in self.models])
        raise UnknownNameError(f"no model {shown(name)} in the config; its models: {models}")


# ---------------------------------------------------------------- value readers


class _Section:
    """Reads typed values out of one mapping, naming `path.key` in every error."""

    def __init__(self, raw: Any, path: str, known: set[str] | None = None, strict: bool = True) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(raw).__name__}")
        self.raw = raw
        self.path = path
        if known is not None:
            unknown = sorted(set(raw) - known)
            if unknown and strict:
                raise ConfigError(f"{self._name(unknown[0])}: unknown option (known: {', '.join(sorted(known))})")
            for key in unknown:
                log.warning("%s: unknown option ignored", self._name(key))

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: T, convert: Callable[[Any, str], T]) -> T:
        if key not in self.raw or self.raw[key] is None:
            return default
        return convert(self.raw[key], self._name(key))

    def require(self, key: str, convert: Callable[[Any, str], T]) -> T:
        if key not in self.raw or self.raw[key] is None:
            raise ConfigError(f"{self._name(key)}: required")
        return convert(self.raw[key], self._name(key))


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name}: must be true or false, got {shown_value(value)}")


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any, str], int]:
    def convert(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {shown_value(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}: must be <= {maximum}, got {shown_value(value)}")
        return value

    return convert


def _float(low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[Any, str], float]:
    def convert(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {shown_value(value)}")
        if low is not None and (value < low or (low_open and value == low)):
            raise ConfigError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"{name}: must be <= {high}, got {value}")
        return float(value)

    return convert


def _float32(value: Any, name: str) -> float:
    """A finite number a float32 vector can hold (a default value): 1e39 would be served as inf."""
    number = _float()(value, name)
    try:
        struct.pack("<f", number)  # rounds to float32; OverflowError where that is infinite
    except OverflowError:
        raise ConfigError(f"{name}: must fit a float32 (|value| <= 3.4028235e38), got {shown_value(value)}") from None
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string, got {shown_value(value)}")
    return value


# Model and table names, as HPS allows them: "<model>.<table>" then names exactly one storage table.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,120}")
# Characters of a name a message quotes: a request may name anything, and its status must stay small.
SHOWN_NAME_CHARS = 64
# Table versions: `@` never occurs in a name, so `<model>.<table>@<version>` names one storage table.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
VERSION_MARK = "@"


def shown(name: str) -> str:
    """`name` quoted for a message, cut to SHOWN_NAME_CHARS characters."""
    return repr(name) if len(name) <= SHOWN_NAME_CHARS else repr(name[:SHOWN_NAME_CHARS]) + f"... ({len(name)} chars)"


_SHOWN_VALUE = reprlib.Repr()
_SHOWN_VALUE.maxlevel = 2
_SHOWN_VALUE.maxstring = _SHOWN_VALUE.maxother = _SHOWN_VALUE.maxlong = SHOWN_NAME_CHARS
_SHOWN_VALUE.maxlist = _SHOWN_VALUE.maxtuple = _SHOWN_VALUE.maxdict = _SHOWN_VALUE.maxset = 4


def shown_value(value: Any) -> str:
    """A config value for a message, at most about SHOWN_NAME_CHARS characters however large or nested it is
    (a LoadModel request's config is the caller's, and its status and log line must stay small)."""
    return _SHOWN_VALUE.repr(value)


def _name_str(value: Any, name: str) -> str:
    text = _str(value, name)
    if not NAME_PATTERN.fullmatch(text):
        raise ConfigError(f"{name}: must be 1 to 120 of A-Z a-z 0-9 _ -, got {shown(text)}")
    return text


def version(value: Any, name: str) -> str:
    """A table version: 1 to 64 of A-Z a-z 0-9 _ - (a YAML number is taken as its digits)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else value
    if not isinstance(text, str) or not VERSION_PATTERN.fullmatch(text):
        raise ConfigError(f"{name}: must be 1 to 64 of A-Z a-z 0-9 _ -, got {shown(str(value))}")
    return text


def _choice(*choices: str, aliases: Mapping[str, str] | None = None) -> Callable[[Any, str], Any]:
    aliases = aliases or {}

    def convert(value: Any, name: str) -> str:
        text = aliases.get(value, value) if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {shown_value(value)}")
        return str(text)

    return convert


def _path(base: Path) -> Callable[[Any, str], Path]:
    def convert(value: Any, name: str) -> Path:
        text = _str(value, name)
        if not text.strip():  # Path("") is the config's own folder
            raise ConfigError(f"{name}: must be a path, got an empty string")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):  # HPS reads HDFS, S3, GCS; hps reads local files only
            raise ConfigError(
                f"{name}: {text.split('://')[0]}:// is not read, only local files: copy the folder to this host"
            )
        path = Path(text).expanduser()
        return path if path.is_absolute() else base / path

    return convert


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: must be a list, got {shown_value(value)}")
    return list(value)


def _devices(value: Any, name: str) -> tuple[int, ...]:
    devices = tuple(_int(0)(v, f"{name}[{i}]") for i, v in enumerate(_list(value, name)))
    if not devices:
        raise ConfigError(f"{name}: must name at least one device")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"{name}: must not name a device twice, got {list(devices)}")
    return devices


def processes(value: Any, name: str) -> int:
    """A process count: an integer >= 1, or `auto` for one per core this process may run on."""
    if value == "auto":
        return usable_cores()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be an integer >= 1 or auto, got {shown_value(value)}")
    return value


# ---------------------------------------------------------------- sections

# Every ServerConfig field is a key of the file's server section.
_SERVER_KEYS = {f.name for f in fields(ServerConfig)}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file"}
_AUTH_KEYS = {"tokens_file"}
_VOLATILE_KEYS = {
    "type",
    "overflow_margin",
    "overflow_policy",
    "overflow_resolution_target",
    "initial_cache_rate",
    "cache_missed_embeddings",
    "address",
    "user_name",
    "password",
    "password_file",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_check_hostname",
    "num_partitions",
    "max_batch_size",
    "timeout_ms",
    "ttl_seconds",
    "read_only",
}
# HPS volatile_db keys hps accepts and does not act on.
_HPS_VOLATILE_EXTRAS = {
    "algorithm",
    "num_node_partitions",
    "allocation_rate",
    "shared_memory_size",
    "shared_memory_name",
    "refresh_time_after_fetch",
    "update_filters",
    "max_get_batch_size",
    "max_set_batch_size",
    "num_partitions_per_node",
    "max_batch_size_per_node",
    "max_set_size",
    # HPS sends it as the TLS server name indication; Redis does not read it (see tls_check_hostname).
    "tls_server_name_identification",
}
# HPS volatile_db keys hps reads as its own (ps.json only).
_HPS_VOLATILE_ALIASES = {
    "enable_tls": "tls",
    "tls_ca_certificate": "tls_ca_file",
    "tls_client_certificate": "tls_cert_file",
    "tls_client_key": "tls_key_file",
}
_HOST_PORT = re.compile(r"[^\s:,]+:\d{1,5}")
_UPDATES_KEYS = {"enabled", "address", "stream", "max_len", "read_count", "block_ms"}
_PERSISTENT_KEYS = {"type", "path", "read_only", "num_threads", "max_batch_size", "sync_writes"}
_HPS_PERSISTENT_EXTRAS = {"update_filters", "max_get_batch_size", "max_set_batch_size", "num_partitions"}
_VOLATILE_ALIASES = {"parallel_hash_map": "hash_map", "multi_process_hash_map": "hash_map"}
_PERSISTENT_ALIASES = {"rocks_db": "rocksdb"}


def _tls(raw: Any, base: Path) -> TlsConfig:
    s = _Section(raw, "server.tls", _TLS_KEYS)
    tls = TlsConfig(
        cert_file=s.get("cert_file", None, _path(base)),
        key_file=s.get("key_file", None, _path(base)),
        client_ca_file=s.get("client_ca_file", None, _path(base)),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("server.tls: set cert_file and key_file together (or neither, for plaintext)")
    if tls.client_ca_file is not None and tls.cert_file is None:
        raise ConfigError("server.tls.client_ca_file: mutual TLS needs cert_file and key_file too")
    return tls


def _auth(raw: Any, base: Path) -> AuthConfig:
    s = _Section(raw, "server.auth", _AUTH_KEYS)
    from_env = os.environ.get(TOKENS_FILE_ENV)
    tokens_file = _path(base)(from_env, TOKENS_FILE_ENV) if from_env else s.get("tokens_file", None, _path(base))
    return AuthConfig(tokens_file=tokens_file)


def _listen_address(value: Any, name: str) -> str:
    """host:port (host may be empty) with a port from 0 to 65535, or "" (off: only metrics_address)."""
    text = _str(value, name)
    _, sep, port = text.rpartition(":")
    if text and not (sep and port.isdigit() and int(port) <= 65535):
        raise ConfigError(f"{name}: must be HOST:PORT with a port from 0 to 65535, got {shown_value(text)}")
    return text


def _server(raw: Any, base: Path) -> ServerConfig:
    s = _Section(raw, "server", _SERVER_KEYS)
    d = ServerConfig()
    server = ServerConfig(
        address=s.get("address", d.address, _listen_address),
        max_message_mb=s.get("max_message_mb", d.max_message_mb, _int(1)),
        workers=s.get("workers", d.workers, _int(1)),
        shutdown_grace_seconds=s.get("shutdown_grace_seconds", d.shutdown_grace_seconds, _float(0)),
        metrics_address=s.get("metrics_address", d.metrics_address, _listen_address),
        batch_window_us=s.get("batch_window_us", d.batch_window_us, _int(0)),
        max_queued_requests=s.get("max_queued_requests", d.max_queued_requests, _int(1)),
        max_queries_per_request=s.get("max_queries_per_request", d.max_queries_per_request, _int(1)),
        max_keys_per_request=s.get("max_keys_per_request", d.max_keys_per_request, _int(1)),
        max_keys_per_write=s.get("max_keys_per_write", d.max_keys_per_write, _int(1)),
        max_streams=s.get("max_streams", d.max_streams, _int(0)),
        stream_idle_seconds=s.get("stream_idle_seconds", d.stream_idle_seconds, _float(0, low_open=True)),
        processes=s.get("processes", d.processes, processes),
        max_connection_age_seconds=s.get("max_connection_age_seconds", d.max_connection_age_seconds, _float(0)),
        tls=_tls(s.raw.get("tls"), base),
        auth=_auth(s.raw.get("auth"), base),
        read_only=s.get("read_only", d.read_only, _bool),
        reflection=s.get("reflection", d.reflection, _bool),
        admin=s.get("admin", d.admin, _bool),
    )
    if not server.address:
        raise ConfigError("server.address: must be HOST:PORT, got an empty string")
    if server.max_streams and server.max_streams >= server.workers:
        raise ConfigError(
            f"server.max_streams: must be below server.workers ({server.workers}), so that Lookups and health "
            f"checks always find an RPC thread; got {server.max_streams}"
        )
    return server


def _hps_aliased(raw: Any) -> Any:
    """A ps.json volatile_db section with HPS's names of hps keys replaced by hps's."""
    if not isinstance(raw, Mapping):
        return raw
    for hps_key, key in _HPS_VOLATILE_ALIASES.items():
        if hps_key in raw and key in raw:
            raise ConfigError(f"volatile_db.{hps_key}: give it or volatile_db.{key}, not both")
    return {_HPS_VOLATILE_ALIASES.get(k, k): v for k, v in raw.items()}


def _password(s: _Section, from_file: Path | None, default: str) -> str:
    """The Redis password: the environment, else password_file's content, else the password key."""
    if "password" in s.raw and from_file is not None:
        raise ConfigError("volatile_db.password_file: give password or password_file, not both")
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if from_file is None:
        return s.get("password", default, _str)
    try:
        password = from_file.read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"volatile_db.password_file: cannot read it: {reason}") from e
    if not password:
        raise ConfigError("volatile_db.password_file: the file is empty")
    return password


# HPS's least-frequently-used policy: served by the nearest hps has, least recently used.
_HPS_POLICY_ALIASES = {"evict_least_used": "evict_oldest"}


def _volatile(raw: Any, base: Path, hps: bool) -> VolatileDbConfig:
    known = _VOLATILE_KEYS | (_HPS_VOLATILE_EXTRAS if hps else set())
    s = _Section(_hps_aliased(raw) if hps else raw, "volatile_db", known, strict=not hps)
    d = VolatileDbConfig()
    batch = s.get("max_batch_size", d.max_batch_size, _int(1))
    if hps:  # HPS splits the batch limit in two; the smaller is the safe bound for both directions.
        batch = min(s.get("max_get_batch_size", batch, _int(1)), s.get("max_set_batch_size", batch, _int(1)))
    policies = _HPS_POLICY_ALIASES if hps else None
    if hps and isinstance(s.raw.get("overflow_policy"), str) and s.raw["overflow_policy"] in _HPS_POLICY_ALIASES:
        log.warning(
            "volatile_db.overflow_policy: %s is served as %s (hps has no least-frequently-used eviction)",
            s.raw["overflow_policy"],
            _HPS_POLICY_ALIASES[s.raw["overflow_policy"]],
        )
    tls_cert_file = s.get("tls_cert_file", None, _path(base))
    tls_key_file = s.get("tls_key_file", None, _path(base))
    if tls_key_file is not None and tls_cert_file is None:
        raise ConfigError("volatile_db.tls_key_file: needs volatile_db.tls_cert_file, the certificate of that key")
    return VolatileDbConfig(
        type=s.get("type", d.type, _choice("hash_map", "redis_cluster", "disabled", aliases=_VOLATILE_ALIASES)),
        overflow_margin=s.get("overflow_margin", d.overflow_margin, _int(1)),
        overflow_policy=s.get(
            "overflow_policy", d.overflow_policy, _choice("evict_oldest", "evict_random", aliases=policies)
        ),
        overflow_resolution_target=s.get(
            "overflow_resolution_target", d.overflow_resolution_target, _float(0, 1, low_open=True)
        ),
        initial_cache_rate=s.get("initial_cache_rate", d.initial_cache_rate, _float(0, 1)),
        cache_missed_embeddings=s.get("cache_missed_embeddings", d.cache_missed_embeddings, _bool),
        address=s.get("address", d.address, _str),
        user_name=s.get("user_name", d.user_name, _str),
        password=_password(s, s.get("password_file", None, _path(base)), d.password),
        tls=s.get("tls", d.tls, _bool),
        tls_ca_file=s.get("tls_ca_file", None, _path(base)),
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_check_hostname=s.get("tls_check_hostname", d.tls_check_hostname, _bool),
        num_partitions=s.get("num_partitions", d.num_partitions, _int(1)),
        max_batch_size=batch,
        timeout_ms=s.get("timeout_ms", d.timeout_ms, _int(1)),
        ttl_seconds=s.get("ttl_seconds", d.ttl_seconds, _int(0)),
        read_only=s.get("read_only", d.read_only, _bool),
    )


def _updates(raw: Any) -> UpdatesConfig:
    s = _Section(raw, "updates", _UPDATES_KEYS)
    d = UpdatesConfig()
    stream = s.get("stream", d.stream, _str)
    if not stream:
        raise ConfigError("updates.stream: must not be empty")
    address = s.get("address", d.address, _str)
    if address and not all(_HOST_PORT.fullmatch(item.strip()) for item in address.split(",")):
        raise ConfigError(f"updates.address: expected host:port[,host:port...], got {shown_value(address)}")
    return UpdatesConfig(
        enabled=s.get("enabled", d.enabled, _bool),
        address=address,
        stream=stream,
        max_len=s.get("max_len", d.max_len, _int(1)),
        read_count=s.get("read_count", d.read_count, _int(1)),
        block_ms=s.get("block_ms", d.block_ms, _int(1)),
    )


def _persistent(raw: Any, base: Path, hps: bool) -> PersistentDbConfig:
    s = _Section(raw, "persistent_db", _PERSISTENT_KEYS | (_HPS_PERSISTENT_EXTRAS if hps else set()), strict=not hps)
    d = PersistentDbConfig()
    batch = s.get("max_batch_size", d.max_batch_size, _int(1))
    if hps:
        batch = min(s.get("max_get_batch_size", batch, _int(1)), s.get("max_set_batch_size", batch, _int(1)))
    return PersistentDbConfig(
        type=s.get("type", d.type, _choice("rocksdb", "disabled", aliases=_PERSISTENT_ALIASES)),
        path=s.get("path", base / d.path, _path(base)),
        read_only=s.get("read_only", d.read_only, _bool),
        num_threads=s.get("num_threads", d.num_threads, _int(1)),
        max_batch_size=batch,
        sync_writes=s.get("sync_writes", d.sync_writes, _bool),
    )


# Model options with the same name in our YAML and in a ps.json (_model_options reads them for both).
_MODEL_OPTIONS = {
    "max_batch_size",
    "gpucache",
    "gpucacheper",
    "hit_rate_threshold",
    "deployed_device_list",
    "use_static_table",
    "answer_misses_with_default",
    "gpucache_dtype",
    "gpu_placement",
}
_MODEL_KEYS = {"name", "tables"} | _MODEL_OPTIONS
_TABLE_KEYS = {"name", "dim", "default_value", "source", "max_keys_per_sample", "version"}
# How a model's errors name a table's fields: in hps's YAML, and in a ps.json (one list per field).
_TABLE_FIELDS = {"tables": "tables", "name": "tables[{}].name", "max_keys_per_sample": "tables[{}].max_keys_per_sample"}
_HPS_TABLE_FIELDS = {
    "tables": "sparse_files",
    "name": "embedding_table_names[{}]",
    "max_keys_per_sample": "maxnum_catfeature_query_per_table_per_sample[{}]",
}


def _model_options(
    s: _Section, name: str, tables: tuple[TableConfig, ...], extras: Mapping[str, Any], hps: bool = False
) -> ModelConfig:
    """The model's options around its tables; `hps`: errors name a ps.json's fields (lists per table)."""
    d = ModelConfig(name=name, tables=())
    field = _HPS_TABLE_FIELDS if hps else _TABLE_FIELDS
    seen: set[str] = set()
    for i, table in enumerate(tables):
        if table.name in seen:
            raise ConfigError(f"{s.path}.{field['name'].format(i)}: duplicate table {table.name!r}")
        seen.add(table.name)
    if not tables:
        raise ConfigError(f"{s.path}.{field['tables']}: a model needs at least one table")
    if len(tables) > MAX_TABLES:
        raise ConfigError(f"{s.path}.{field['tables']}: at most {MAX_TABLES} tables a model, got {len(tables)}")
    max_batch_size = s.get("max_batch_size", d.max_batch_size, _int(1))
    for i, table in enumerate(tables):
        if max_batch_size * table.max_keys_per_sample > MAX_KEYS_PER_QUERY:
            raise ConfigError(
                f"{s.path}.{field['max_keys_per_sample'].format(i)}: max_batch_size x max_keys_per_sample (the "
                f"keys one request may ask of the table, which its L1 must hold) must be <= {MAX_KEYS_PER_QUERY}, "
                f"got {max_batch_size} x {table.max_keys_per_sample}"
            )
    return ModelConfig(
        name=name,
        tables=tables,
        max_batch_size=max_batch_size,
        gpucache=s.get("gpucache", d.gpucache, _bool),
        gpucacheper=s.get("gpucacheper", d.gpucacheper, _float(0, 1)),
        # Above 1 (as in HPS), L1 inserts are never deferred: the hit rate never reaches it.
        hit_rate_threshold=s.get("hit_rate_threshold", d.hit_rate_threshold, _float(0)),
        deployed_device_list=s.get("deployed_device_list", d.deployed_device_list, _devices),
        gpu_placement=s.get("gpu_placement", d.gpu_placement, _choice("replicated", "sharded")),
        use_static_table=s.get("use_static_table", d.use_static_table, _bool),
        answer_misses_with_default=s.get("answer_misses_with_default", d.answer_misses_with_default, _bool),
        gpucache_dtype=s.get("gpucache_dtype", d.gpucache_dtype, _choice("float32", "float16")),
        hps_extras=dict(extras),
    )


def _model(raw: Any, path: str, base: Path) -> ModelConfig:
    s = _Section(raw, path, _MODEL_KEYS)
    tables = []
    for i, table_raw in enumerate(s.require("tables", _list)):
        t = _Section(table_raw, f"{path}.tables[{i}]", _TABLE_KEYS)
        tables.append(
            TableConfig(
                name=t.require("name", _name_str),
                dim=t.require("dim", _int(1, MAX_DIM)),
                default_value=t.get("default_value", 0.0, _float32),
                source=t.get("source", None, _path(base)),
                max_keys_per_sample=t.get("max_keys_per_sample", 1, _int(1)),
                version=t.get("version", "", version),
            )
        )
    return _model_options(s, s.require("name", _name_str), tuple(tables), {})


def parse_model(text: str, base: Path, path: str = "model") -> ModelConfig:
    """One model entry from YAML or JSON text, e.g. a LoadModel request's: the keys of an item of `models:`,
    or of a ps.json's `models` (told apart by its `model` and `sparse_files` keys); relative paths resolve
    against `base`."""
    raw = _loaded(text, path, "YAML or JSON", yaml.safe_load)
    hps = isinstance(raw, dict) and "sparse_files" in raw and "name" not in raw
    return (_hps_model if hps else _model)(raw, path, base)


def _loaded(text: str, path: str, kind: str, load: Callable[[str], Any]) -> Any:
    """`text` parsed by `load`; ConfigError naming `path` when it is not valid `kind` (nesting past
    Python's recursion limit and integers past its digit limit included)."""
    try:
        return load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {kind}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than int() takes
        raise ConfigError(f"{path}: {str(e)[:200]}") from None


# HPS model keys hps maps onto its own options (the rest of _HPS_MODEL_EXTRAS is kept, unused).
_HPS_MODEL_KEYS = {
    "model",
    "sparse_files",
    "embedding_table_names",
    "embedding_vecsize_per_table",
    "default_value_for_each_table",
    "maxnum_catfeature_query_per_table_per_sample",
} | _MODEL_OPTIONS
_HPS_MODEL_EXTRAS = {
    "dense_file",
    "network_file",
    "num_of_worker_buffer_in_pool",
    "num_of_refresher_buffer_in_pool",
    "cache_refresh_percentage_per_iteration",
    "label_dim",
    "slot_num",
    "maxnum_des_feature_per_sample",
    "embeddingkey_long_type",
    "use_mixed_precision",
    "scaler",
    "use_algorithm_search",
    "use_cuda_graph",
    "fuse_embedding_table",
    "use_context_stream",
    "use_hctr_cache_implementation",
    "init_ec",
    "enable_pagelock",
    "refresh_delay",
    "refresh_interval",
    "sparse_model_files",
    "use_gpu_embedding_cache",
}


def _hps_model(raw: Any, path: str, base: Path) -> ModelConfig:
    s = _Section(raw, path, _HPS_MODEL_KEYS | _HPS_MODEL_EXTRAS, strict=False)
    name = s.require("model", _name_str)
    files = s.require("sparse_files", _list)
    names = s.get("embedding_table_names", [f"sparse_embedding{i}" for i in range(len(files))], _list)
    dims = s.require("embedding_vecsize_per_table", _list)
    defaults = s.get("default_value_for_each_table", [0.0] * len(files), _list)
    per_sample = s.get("maxnum_catfeature_query_per_table_per_sample", [1] * len(files), _list)
    for key, values in (
        ("embedding_table_names", names),
        ("embedding_vecsize_per_table", dims),
        ("default_value_for_each_table", defaults),
        ("maxnum_catfeature_query_per_table_per_sample", per_sample),
    ):
        if len(values) != len(files):
            raise ConfigError(
                f"{path}.{key}: has {len(values)} entries but sparse_files has {len(files)}; give one per table"
            )
    tables = tuple(
        TableConfig(
            name=_name_str(names[i], f"{path}.embedding_table_names[{i}]"),
            dim=_int(1, MAX_DIM)(dims[i], f"{path}.embedding_vecsize_per_table[{i}]"),
            default_value=_float32(defaults[i], f"{path}.default_value_for_each_table[{i}]"),
            source=_path(base)(files[i], f"{path}.sparse_files[{i}]"),
            max_keys_per_sample=_int(1)(per_sample[i], f"{path}.maxnum_catfeature_query_per_table_per_sample[{i}]"),
        )
        for i in range(len(files))
    )
    extras = {k: v for k, v in s.raw.items() if k in _HPS_MODEL_EXTRAS}
    return _model_options(s, name, tables, extras, hps=True)


_TOP_KEYS = {"server", "volatile_db", "persistent_db", "models", "updates"}
_HPS_TOP_EXTRAS = {"supportlonglong", "update_source", "fuse_embedding_table"}


def parse(raw: Any, base: Path, hps: bool = False) -> Config:
    """Builds a Config from a parsed document; relative paths resolve against `base`."""
    top = _Section(raw, "", _TOP_KEYS | (_HPS_TOP_EXTRAS if hps else set()), strict=not hps)
    if hps and top.get("supportlonglong", True, _bool) is False:
        raise ConfigError("supportlonglong: hps keys are always int64; false (int32 keys) is not supported")
    if hps and "update_source" in top.raw:
        log.warning(
            "update_source: ignored; hps does not read Kafka: a trainer publishes to the Redis stream the "
            "`updates` section names (hps_client.feed, hps push)"
        )
    model_reader = _hps_model if hps else _model
    models = tuple(model_reader(m, f"models[{i}]", base) for i, m in enumerate(top.require("models", _list)))
    names = [m.name for m in models]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"models[{i}]: duplicate model name {name!r}")
    return Config(
        server=_server(top.raw.get("server"), base),
        volatile_db=_volatile(top.raw.get("volatile_db"), base, hps),
        persistent_db=_persistent(top.raw.get("persistent_db"), base, hps),
        models=models,
        updates=_updates(top.raw.get("updates")),
    )


def load(path: str | Path) -> Config:
    """Reads a YAML config, or an HPS ps.json (any file ending in .json)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    hps = path.suffix == ".json"
    raw = _loaded(text, str(path), "JSON" if hps else "YAML", json.loads if hps else yaml.safe_load)
    return parse(raw, path.resolve().parent, hps=hps)
