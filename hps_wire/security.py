"""How a client proves itself to an hps server and checks the server: TLS (root CAs, a client certificate for
mutual TLS, a server name override) and a bearer token, given as arguments or read from HPS_* variables.

It builds gRPC channels and call metadata; it never logs or shows a token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Environment variables the layers, the Triton model, the health check and the benchmarks read when they are
# not given TLS options or a token themselves.
TOKEN_ENV = "HPS_TOKEN"
CA_FILE_ENV = "HPS_TLS_CA_FILE"
CERT_FILE_ENV = "HPS_TLS_CERT_FILE"
KEY_FILE_ENV = "HPS_TLS_KEY_FILE"
SERVER_NAME_ENV = "HPS_TLS_SERVER_NAME"


@dataclass(frozen=True)
class TLS:
    """TLS to the server. `root_ca_file`: PEM CAs to trust (None: the system's); `cert_file` and `key_file`:
    this client's certificate for mutual TLS; `server_name`: the name to check in the server's certificate
    when it is not the target's host (e.g. connecting to an IP address)."""

    root_ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: give cert_file and key_file together (mutual TLS), or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, reading the PEM files now (FileNotFoundError naming the field)."""

        def read(field: str, path: str | Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise FileNotFoundError(f"tls.{field}: cannot read {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read("root_ca_file", self.root_ca_file),
            private_key=read("key_file", self.key_file),
            certificate_chain=read("cert_file", self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TLS | None:
        """TLS from HPS_TLS_CA_FILE, HPS_TLS_CERT_FILE, HPS_TLS_KEY_FILE and HPS_TLS_SERVER_NAME; None when
        none of them is set (plaintext)."""
        env = os.environ if environ is None else environ
        values = [env.get(name) or None for name in (CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV, SERVER_NAME_ENV)]
        return None if not any(values) else cls(*values)


def token_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """HPS_TOKEN, or None when it is unset or empty."""
    return (os.environ if environ is None else environ).get(TOKEN_ENV) or None


def call_metadata(token: str | None) -> Sequence[tuple[str, str]] | None:
    """The metadata each call carries: `authorization: Bearer <token>` (None without a token)."""
    return None if token is None else (("authorization", f"Bearer {token}"),)


def channel(target: str, tls: TLS | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to `target`: TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(target: str, tls: TLS | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """The asyncio twin of channel()."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
