"""Container health probe: asks a server's grpc.health.v1 service whether it is SERVING; exit code 0 if so.

For Docker HEALTHCHECK and other probes without native gRPC support (Kubernetes' gRPC probes speak no TLS);
it only reads, never changes the server. Health checking needs no token; a TLS server needs --tls-ca-file (or
HPS_TLS_CA_FILE), mTLS a client certificate.
"""

from __future__ import annotations

import argparse
import math
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_wire import security


def check(address: str, service: str = "", timeout: float = 3.0, tls: security.TLS | None = None) -> str:
    """The serving status name of `service` ("" is the whole server) at address, or an error text."""
    with security.channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:  # the health service answers it with no details
                return f"NOT_FOUND: the server has no service {service!r}"
            return f"{code.name}: {e.details()}"  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hps_server.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:8500", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for the answer")
    env = security.TLS.from_environment() or security.TLS()
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by any --tls-* option)")
    parser.add_argument("--tls-ca-file", default=env.root_ca_file, help="PEM CAs to trust (env HPS_TLS_CA_FILE)")
    parser.add_argument("--tls-cert-file", default=env.cert_file, help="client certificate, mTLS (HPS_TLS_CERT_FILE)")
    parser.add_argument("--tls-key-file", default=env.key_file, help="its private key (HPS_TLS_KEY_FILE)")
    parser.add_argument(
        "--tls-server-name", default=env.server_name, help="name to check in its certificate (HPS_TLS_SERVER_NAME)"
    )
    args = parser.parse_args(argv)
    files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)
    try:
        tls = security.TLS(*files) if args.tls or any(files) else None
        status = check(args.address, args.service, args.timeout, tls)
    except (OSError, ValueError) as e:
        status = f"error: {e}"
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
