"""The container health probe over TLS and mTLS, against a real gRPC health service with test-made certificates."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from hps_bench.redis_cluster_launcher import NEW_KEY
from hps_server import healthcheck

SERVER_NAME = "rec-hps.ml.svc"  # what a Service's certificate names; the probe dials 127.0.0.1


def _openssl(folder: Path, *commands: str) -> None:
    for command in commands:
        subprocess.run(["openssl", *command.split()], cwd=folder, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe-tls")
    (folder / "san.ext").write_text(f"subjectAltName=DNS:{SERVER_NAME}\n")
    _openssl(
        folder,
        f"req -x509 {NEW_KEY} -keyout ca.key -out ca.crt -days 2 -subj /CN=hps-test-ca",
        f"req {NEW_KEY} -keyout tls.key -out tls.csr -subj /CN=hps",
        "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 2 -extfile san.ext",
    )
    return folder


@pytest.fixture(scope="module")
def mtls_server(certificates: Path) -> Iterator[str]:
    """A gRPC server whose health service says SERVING, over TLS requiring client certificates of the CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [((certificates / "tls.key").read_bytes(), (certificates / "tls.crt").read_bytes())],
        root_certificates=(certificates / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


def test_probe_speaks_mtls_with_a_server_name_override(mtls_server: str, certificates: Path) -> None:
    ca, cert, key = (str(certificates / name) for name in ("ca.crt", "tls.crt", "tls.key"))
    tls = ["--tls-ca-file", ca, "--tls-server-name", SERVER_NAME]
    assert healthcheck.main([mtls_server, *tls, "--tls-cert-file", cert, "--tls-key-file", key]) == 0


@pytest.mark.parametrize("missing", ["client certificate", "server name", "tls", "ca file"])
def test_probe_fails_without_what_the_server_requires(mtls_server: str, certificates: Path, missing: str) -> None:
    ca, cert, key = (str(certificates / name) for name in ("ca.crt", "tls.crt", "tls.key"))
    client = ["--tls-cert-file", cert, "--tls-key-file", key]
    args = {
        "client certificate": ["--tls-ca-file", ca, "--tls-server-name", SERVER_NAME],
        "server name": ["--tls-ca-file", ca, *client],  # the certificate does not name 127.0.0.1
        "tls": [],
        "ca file": ["--tls-ca-file", str(certificates / "missing.crt"), "--tls-server-name", SERVER_NAME, *client],
    }[missing]
    assert healthcheck.main([mtls_server, "--timeout", "1", *args]) == 1
