"""Fixtures that start real services for the tests: an hps server over a real RocksDB, Redis Cluster, Triton.

Each fixture cleans up after itself; under CI=true a missing service fails the test instead of skipping.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from hps_bench.certificates import Authority, Pair
from hps_bench.redis_cluster_launcher import RedisClusterProcesses, RedisNotInstalledError
from hps_bench.servers import free_port
from hps_client.triton import TritonEnvironment, TritonSetupError
from hps_client.triton import setup as triton_setup
from hps_server import config as config_module
from hps_server import tables
from hps_server.server import HpsServer

IN_CI = os.environ.get("CI", "").lower() == "true"


@dataclass
class ServedModel:
    """A running server and the ground truth it was loaded with."""

    server: HpsServer
    target: str
    config: config_module.Config
    truth: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (keys, vectors)

    def expected(self, table: str, keys: np.ndarray) -> np.ndarray:
        """The stored vector of each key, or the table's default vector."""
        stored_keys, vectors = self.truth[table]
        spec = self.config.model("ctr").table(table)
        order = np.argsort(stored_keys)
        pos = np.clip(np.searchsorted(stored_keys, keys, sorter=order), 0, len(stored_keys) - 1)
        rows = order[pos]
        hit = stored_keys[rows] == keys
        out = np.full((len(keys), spec.dim), spec.default_value, dtype=np.float32)
        out[hit] = vectors[rows[hit]]
        return out


def free_port_pair() -> int:
    """A port p with p + 1 free too (two workers' /metrics ports: worker i serves the port + i)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


TABLE_SPECS = {"user": (5_000, 16, 0.0), "item": (3_000, 8, -1.5)}  # rows, dim, default value


def write_sample_tables(directory: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    truth = {}
    for name, (rows, dim, _) in TABLE_SPECS.items():
        keys = rng.choice(np.arange(-(10**6), 10**6), size=rows, replace=False).astype(np.int64)
        vectors = rng.standard_normal((rows, dim), dtype=np.float32)
        tables.write_table(directory / name, [(keys, vectors)], dim)
        truth[name] = (keys, vectors)
    return truth


def sample_raw_config(**volatile: object) -> dict[str, Any]:
    """The sample model's config as a document (for a file), its paths relative to the config's folder."""
    return {
        "server": {"address": "127.0.0.1:0", "shutdown_grace_seconds": 2},
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 0.0, **volatile},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": "ctr",
                "max_batch_size": 64,
                "gpucache": False,
                "tables": [
                    {"name": name, "dim": dim, "default_value": default, "source": name, "max_keys_per_sample": 4}
                    for name, (_, dim, default) in TABLE_SPECS.items()
                ],
            }
        ],
    }


def sample_config(directory: Path, **volatile: object) -> config_module.Config:
    return config_module.parse(sample_raw_config(**volatile), directory)


def write_sample_config(
    directory: Path, address: str, **server: object
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The sample model's tables and a YAML config serving them on `address`: the config's path, the truth."""
    truth = write_sample_tables(directory)
    raw = sample_raw_config()
    raw["server"].update(address=address, **server)
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, truth


def serve_command(config: Path, *options: str) -> list[str]:
    """`hps serve` of a config file as a child process's command line."""
    return [sys.executable, "-m", "hps_server.cli", "serve", "--config", str(config), *options]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    directory = tmp_path_factory.mktemp("served")
    truth = write_sample_tables(directory)
    config = sample_config(directory)
    server = HpsServer(config)
    port = server.start()
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth)
    server.stop(grace=1)


@pytest.fixture(scope="module")
def admin_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """The sample model on a server with server.admin on, for tests that load and reload models of their own."""
    directory = tmp_path_factory.mktemp("admin-served")
    truth = write_sample_tables(directory)
    raw = sample_raw_config()
    raw["server"]["admin"] = True
    config = config_module.parse(raw, directory)
    server = HpsServer(config)
    port = server.start()
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth)
    server.stop(grace=1)


CONSTANT_KEYS = np.arange(4)


def write_constant_table(directory: Path, name: str, dim: int, value: float) -> dict[str, Any]:
    """Table files whose CONSTANT_KEYS all hold `value` (which table a lookup read shows in any vector), as a
    model config's table entry."""
    source = directory / f"{name}-{dim}-{value}"
    tables.write_table(source, [(CONSTANT_KEYS, np.full((len(CONSTANT_KEYS), dim), value, np.float32))], dim)
    return {"name": name, "dim": dim, "source": str(source)}


# ---------------------------------------------------------------- TLS and tokens

# The tokens of the `secured` server: READER may read every model, WRITER read and write ctr, HASHED (listed by
# its sha256) read ctr only; the certificate named CERT_READER (mTLS, no token) reads every model.
READER, WRITER, HASHED = "reader-token-0123456789", "writer-token-0123456789", "hashed-token-0123456789"
CERT_READER = "cert-reader"


@dataclass
class SecuredModel(ServedModel):
    """A server with mutual TLS and tokens: its CA, a client certificate it accepts, its tokens file."""

    ca: Authority
    client: Pair
    tokens_file: Path


def write_tokens_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


def secured_entries() -> list[dict[str, Any]]:
    return [
        {"token": READER, "read": "*"},
        {"token": WRITER, "read": ["ctr"], "write": ["ctr"]},
        {"token_sha256": hashlib.sha256(HASHED.encode()).hexdigest(), "read": ["ctr"]},
        {"client_cert_name": CERT_READER, "read": "*"},
    ]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredModel]:
    directory = tmp_path_factory.mktemp("secured")
    truth = write_sample_tables(directory)
    ca = Authority(directory / "pki", "hps-test")
    server_pair = ca.issue("hps-server", server=True)
    tokens_file = write_tokens_file(directory / "tokens.yaml", secured_entries())
    config = sample_config(directory)
    server_config = replace(
        config.server,
        tls=config_module.TlsConfig(server_pair.cert_file, server_pair.key_file, ca.cert_file),
        auth=config_module.AuthConfig(tokens_file),
    )
    config = replace(config, server=server_config)
    server = HpsServer(config)
    port = server.start()
    yield SecuredModel(
        server, f"127.0.0.1:{port}", config, truth, ca, ca.issue("hps-client", server=False), tokens_file
    )
    server.stop(grace=1)


# ---------------------------------------------------------------- Redis Cluster (never on port 6379)


def _start_redis_cluster(root: Path, password: str = "", **tls: Any) -> RedisClusterProcesses:
    try:
        return RedisClusterProcesses(root, password=password, **tls).start()
    except RedisNotInstalledError as e:
        if IN_CI:
            pytest.fail(f"CI=true and Redis is missing: {e}")
        pytest.skip(f"needs Redis: {e}")


@pytest.fixture(scope="session")
def redis_cluster_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A 3 masters + 3 replicas cluster shared by the session; tests must not stop its nodes."""
    with _start_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster(redis_cluster_processes: RedisClusterProcesses) -> str:
    """host:port of a seed node of the shared cluster; tests keep to their own table names."""
    return redis_cluster_processes.seed


@pytest.fixture(scope="session")
def redis_cluster_acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A cluster requiring a password, for the ACL user `.user` as well as for the default user."""
    with _start_redis_cluster(tmp_path_factory.mktemp("redis-cluster-acl"), password="hps-test-secret") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A cluster that speaks only TLS; its certificate, for 127.0.0.1, is signed by `.ca_file`."""
    with _start_redis_cluster(tmp_path_factory.mktemp("redis-cluster-tls"), tls=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster_mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A TLS cluster that requires a client certificate signed by `.ca_file` (`.client_cert_file`), and whose
    own certificate names only `redis.hps.test`, not the address 127.0.0.1 it is reached at."""
    root = tmp_path_factory.mktemp("redis-cluster-mtls")
    with _start_redis_cluster(root, tls=True, tls_auth_clients=True, tls_names="DNS:redis.hps.test") as cluster:
        yield cluster


@pytest.fixture
def disposable_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A cluster of the test's own, which it may kill, pause and restart at will."""
    with _start_redis_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


# ---------------------------------------------------------------- Triton Inference Server


@pytest.fixture(scope="session")
def triton_environment() -> TritonEnvironment:
    """tritonserver and its Python-backend venv (`python -m hps_client.triton setup`), prepared once and reused."""
    try:
        return triton_setup()
    except TritonSetupError as e:
        if IN_CI:
            raise
        pytest.skip(f"needs a Triton environment (python -m hps_client.triton setup): {e}")
