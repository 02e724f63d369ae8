"""Starts the servers a benchmark measures as child processes, so client and server don't share a GIL.

Process plumbing (free ports, readiness through gRPC health checks, clean shutdown), the one model folder
every server benchmark serves from, and throwaway TLS certificates and a token for runs with --tls/--token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_server import tables as table_files
from hps_wire import security
from hps_wire.security import TLS

L1Choice = Literal["none", "cpu", "gpu", "static"]
L1_CHOICES: tuple[str, ...] = get_args(L1Choice)


def uses_gpu(l1: L1Choice) -> bool:
    """Whether the served L1 is on CUDA device 0 (the cache or the static table)."""
    return l1 in ("gpu", "static")


def _l1_options(l1: L1Choice) -> dict[str, Any]:
    """The model keys for an L1 choice: a cache with a slot for every row (gpucacheper 1), or (static) every
    table held whole on device 0. Being set-associative, the cache keeps about 93 % of uniformly hashed rows
    (the rest fall in sets already full), so a warm server answers most keys from L1 and fills the rest on
    each miss; the static table answers every key."""
    if l1 == "none":
        return {"gpucache": False}
    options: dict[str, Any] = {"gpucache": True, "gpucacheper": 1.0}
    if uses_gpu(l1):
        options["deployed_device_list"] = [0]
    if l1 == "static":
        options["use_static_table"] = True
    return options


def write_served_model(
    directory: Path,
    port: int,
    model: str,
    tables: Mapping[str, tuple[np.ndarray, np.ndarray, int]],
    max_batch_size: int,
    *,
    l1: L1Choice = "none",
    server_options: Mapping[str, Any] | None = None,
) -> Path:
    """Writes each table (keys, vectors, max keys per sample) in HPS format and a config serving them on
    127.0.0.1:port from a warm in-process hash map over RocksDB; returns the config path.

    `l1`: none, or a warm L1 with a slot for every row (cpu: the NumPy reference, which hps_server picks when the
    server sees no GPU, see `server_env`; gpu: the CUDA cache on device 0). `server_options` become keys of
    the config's `server` section as given, so settings the server does not know yet fail there, loudly.
    """
    for name, (keys, vectors, _) in tables.items():
        table_files.write_table(directory / name, [(keys, vectors)], vectors.shape[1])
    config = {
        "server": {**(server_options or {}), "address": f"127.0.0.1:{port}"},
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": model,
                "max_batch_size": max_batch_size,
                **_l1_options(l1),
                "tables": [
                    {"name": name, "dim": vectors.shape[1], "source": name, "max_keys_per_sample": per_sample}
                    for name, (_, vectors, per_sample) in tables.items()
                ],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def server_env(l1: L1Choice) -> dict[str, str]:
    """Environment for the served process: with the cpu L1 it sees no GPU, so the reference cache serves."""
    return {"CUDA_VISIBLE_DEVICES": ""} if l1 == "cpu" else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Credentials:
    """What the benchmark's clients connect with: TLS (None: plaintext) and a token (None: none). Picklable,
    so client processes get it too."""

    tls: TLS | None = None
    token: str | None = None

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        return security.channel(target, self.tls, options)

    def unary(self, channel: grpc.Channel, method: str, **serializers: Any) -> Callable[..., Any]:
        """`method` of `channel` as a callable sending this token (as the hps Client does)."""
        return partial(channel.unary_unary(method, **serializers), metadata=security.call_metadata(self.token))


@dataclass(frozen=True)
class Security:
    """A run's throwaway TLS files and token: the config keys the hps server gets, and its clients' credentials."""

    server_options: dict[str, object]
    echo_files: tuple[Path, Path] | None  # (cert, key) the echo baseline serves TLS with
    credentials: Credentials


def throwaway_security(directory: Path, tls: bool, token: bool) -> Security:
    """A CA and a loopback server certificate (with `tls`) and a random token granted every model (with
    `token`), written under `directory`."""
    options: dict[str, object] = {}
    client_tls = None
    echo_files = None
    if tls:
        from hps_bench.certificates import Authority  # needs the cryptography package (bench extra)

        ca = Authority(directory / "pki", "hps-bench")
        pair = ca.issue("hps-bench-server", server=True)
        options["tls"] = {"cert_file": str(pair.cert_file), "key_file": str(pair.key_file)}
        client_tls = TLS(root_ca_file=str(ca.cert_file))
        echo_files = (pair.cert_file, pair.key_file)
    secret = None
    if token:
        secret = secrets.token_urlsafe(32)
        tokens_file = directory / "tokens.yaml"
        tokens_file.write_text(yaml.safe_dump({"tokens": [{"token": secret, "read": "*", "write": "*"}]}))
        tokens_file.chmod(0o600)
        options["auth"] = {"tokens_file": str(tokens_file)}
    return Security(options, echo_files, Credentials(client_tls, secret))


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 300.0, tls: TLS | None = None) -> None:
    """Waits until the server at `target` reports SERVING; raises if the process dies first."""
    deadline = time.monotonic() + timeout
    with security.channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server process exited with {process.returncode} before serving")
            with contextlib.suppress(grpc.RpcError):
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{target} not serving after {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def served_process(
    config: Path, port: int, env: Mapping[str, str] | None = None, tls: TLS | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`hps serve --config` in a child process (config must listen on 127.0.0.1:port), yielded once it
    serves. `env` is added to this process's environment for the server; `tls`: how to reach it when it
    serves TLS."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hps_server.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
        env={**os.environ, **(env or {})},
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process, tls=tls)
        yield process
    finally:
        _stop(process)


@contextlib.contextmanager
def hps_server(config: Path, port: int, env: Mapping[str, str] | None = None, tls: TLS | None = None) -> Iterator[str]:
    """served_process(), yielding the server's target."""
    with served_process(config, port, env, tls):
        yield f"127.0.0.1:{port}"


def _start_echo(port: int, workers: int, tls_files: tuple[Path, Path] | None) -> tuple[subprocess.Popen[bytes], int]:
    command = [sys.executable, "-m", "hps_bench.echo_server", "--port", str(port), "--workers", str(workers)]
    if tls_files is not None:
        command += ["--cert-file", str(tls_files[0]), "--key-file", str(tls_files[1])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        _stop(process)
        raise RuntimeError(f"echo server exited with {process.returncode} before listening")
    return process, int(line)


@contextlib.contextmanager
def echo_server(workers: int = 16, processes: int = 1, tls_files: tuple[Path, Path] | None = None) -> Iterator[str]:
    """The raw-bytes echo baseline: `processes` child processes of `workers` threads on one port (the
    kernel spreads connections over them, as it does for hps's workers); yields its target. `tls_files`:
    (certificate, key) to serve TLS with."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        first, port = _start_echo(0, workers, tls_files)
        started.append(first)
        for _ in range(processes - 1):
            process, bound = _start_echo(port, workers, tls_files)
            started.append(process)
            if bound != port:
                raise RuntimeError(f"echo server bound port {bound}, not the shared port {port}")
        yield f"127.0.0.1:{port}"
    finally:
        for process in started:
            _stop(process)
