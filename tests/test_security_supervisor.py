"""`hps serve --processes 2` with TLS and tokens: every worker serves TLS only and checks tokens, the tokens
file coming from HPS_AUTH_TOKENS_FILE."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from hps_bench.certificates import Authority
from hps_bench.servers import free_port
from hps_client import TLS, Client, UnavailableError
from hps_server.config import TOKENS_FILE_ENV
from hps_wire import security
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import READER, secured_entries, serve_command, write_sample_config, write_tokens_file

# A pool per channel: without it the channels of one process share one connection, so one worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
CONNECTIONS = 12


def _lookups(target: str, tls: TLS, token: str | None, keys: np.ndarray) -> list[np.ndarray | grpc.StatusCode]:
    """One Lookup per connection of its own (so the kernel spreads them over the workers): vectors or the code."""
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])
    answers: list[np.ndarray | grpc.StatusCode] = []
    for _ in range(CONNECTIONS):
        with security.channel(target, tls, OWN_CONNECTION) as channel:
            stub = hps_pb2_grpc.LookupServiceStub(channel)
            try:
                reply = stub.Lookup(request, timeout=10, metadata=security.call_metadata(token))
            except grpc.RpcError as e:
                answers.append(e.code())  # type: ignore[attr-defined]
            else:
                answers.append(np.frombuffer(reply.results[0].vectors, "<f4").reshape(len(keys), -1))
    return answers


def test_workers_serve_tls_and_check_tokens(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "pki", "group")
    pair = ca.issue("server", server=True)
    port = free_port()
    tls_keys = {"cert_file": str(pair.cert_file), "key_file": str(pair.key_file)}
    config, truth = write_sample_config(tmp_path, f"127.0.0.1:{port}", tls=tls_keys, shutdown_grace_seconds=5)
    tokens = write_tokens_file(tmp_path / "tokens.yaml", secured_entries())
    log = tmp_path / "supervisor.log"
    env = {**os.environ, TOKENS_FILE_ENV: str(tokens)}
    process = subprocess.Popen(serve_command(config, "--processes", "2"), stderr=log.open("w"), env=env)
    try:
        deadline = time.monotonic() + 120
        while not re.search(rf"serving 2 workers on port {port}", log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        target, tls = f"127.0.0.1:{port}", TLS(root_ca_file=ca.cert_file)
        keys, vectors = truth["user"]
        for answer in _lookups(target, tls, READER, keys[:8]):
            np.testing.assert_array_equal(answer, vectors[:8])
        assert _lookups(target, tls, None, keys[:8]) == [grpc.StatusCode.UNAUTHENTICATED] * CONNECTIONS
        with Client(target, token=READER, timeout=3) as plaintext, pytest.raises(UnavailableError):
            plaintext.lookup("ctr", "user", keys[:8])
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_missing_tokens_file_stops_the_group_before_any_worker_starts(tmp_path: Path) -> None:
    config, _ = write_sample_config(tmp_path, f"127.0.0.1:{free_port()}")
    env = {**os.environ, TOKENS_FILE_ENV: str(tmp_path / "absent.yaml")}
    done = subprocess.run(
        serve_command(config, "--processes", "2"), env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "server.auth.tokens_file: cannot read it (No such file or directory)" in done.stderr
    assert "worker 0 started" not in done.stderr and str(tmp_path) not in done.stderr
