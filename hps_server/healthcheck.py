"""Container health probe: asks a server's grpc.health.v1 service whether it is SERVING; exit code 0 if so.

For Docker HEALTHCHECK and other probes without native gRPC support (Kubernetes' gRPC probes speak no TLS);
it only reads, never changes the server.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass(frozen=True)
class ProbeTls:
    """TLS of the probe: the CA of the server's certificate, the name it must carry (the probe dials
    127.0.0.1, the certificate names the Service), and a client certificate for a server asking for one."""

    ca_file: Path
    server_name: str = ""
    cert_file: Path | None = None
    key_file: Path | None = None

    def channel(self, address: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str = "", timeout: float = 3.0, tls: ProbeTls | None = None) -> str:
    """The serving status name of `service` ("" is the whole server) at address, or an error text."""
    try:
        channel = tls.channel(address) if tls else grpc.insecure_channel(address)
    except OSError as e:
        return f"cannot read a TLS file: {e.strerror}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hps_server.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:8500", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument(
        "--tls-ca-file", type=Path, help="speak TLS, trusting this CA (PEM) for the server's certificate"
    )
    parser.add_argument("--tls-server-name", default="", help="name the server's certificate must carry (TLS)")
    parser.add_argument("--tls-cert-file", type=Path, help="client certificate (PEM), for a server requiring one")
    parser.add_argument("--tls-key-file", type=Path, help="its private key (PEM)")
    args = parser.parse_args(argv)
    tls = None
    if args.tls_ca_file:
        tls = ProbeTls(args.tls_ca_file, args.tls_server_name, args.tls_cert_file, args.tls_key_file)
    status = check(args.address, args.service, args.timeout, tls)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
