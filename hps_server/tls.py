"""The gRPC server's TLS credentials from server.tls: PEM files re-read when they change, so certificates
rotate without a restart (connections made before keep theirs; new ones get the new certificate).

A new pair is taken only once the key matches the certificate, so a half-written rotation fails no handshake.
It reads files and builds credentials; it knows nothing of requests, and never logs a path or key material.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from datetime import UTC, datetime, timedelta

import grpc

from hps_server import cert_validity
from hps_server.config import ConfigError, TlsConfig
from hps_server.log_limits import RateLimitedWarning

log = logging.getLogger(__name__)

WARN_INTERVAL_SECONDS = 30
# A served certificate this close to its end is warned about at start and at each rotation.
EXPIRY_WARNING_DAYS = 7
_Stamp = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """server.tls's files as gRPC's certificate configuration; `fetch` is gRPC's per-connection callback."""

    def __init__(self, tls: TlsConfig) -> None:
        assert tls.cert_file is not None and tls.key_file is not None
        self._fields = {"server.tls.cert_file": tls.cert_file, "server.tls.key_file": tls.key_file}
        if tls.client_ca_file is not None:
            self._fields["server.tls.client_ca_file"] = tls.client_ca_file
        self._lock = threading.Lock()
        self._warning = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)
        self._stamp, self.current = self._read()

    def _stamps(self) -> _Stamp:
        stamps = []
        for field, path in self._fields.items():
            try:
                info = os.stat(path)
            except OSError as e:
                raise ConfigError(f"{field}: cannot read it ({e.strerror})") from None
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def _read(self) -> tuple[_Stamp, grpc.ServerCertificateConfiguration]:
        """The files' stamps and contents, checked: ConfigError naming the field when one is unusable."""
        before = self._stamps()
        files = list(self._fields.values())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(files[0], files[1])
        except OSError as e:  # ssl.SSLError too; strerror never holds the path
            raise ConfigError(
                f"server.tls.cert_file, key_file: not a matching PEM certificate and key ({e.strerror})"
            ) from None
        if len(files) > 2:
            try:
                context.load_verify_locations(cafile=files[2])
            except OSError as e:
                raise ConfigError(f"server.tls.client_ca_file: not PEM CA certificates ({e.strerror})") from None
        try:
            contents = [path.read_bytes() for path in files]
        except OSError as e:
            raise ConfigError(f"server.tls: cannot read the files ({e.strerror})") from None
        if self._stamps() != before:
            raise ConfigError("server.tls: the files changed while they were read")
        _warn_about_dates(contents[0])
        return before, grpc.ssl_server_certificate_configuration(
            [(contents[1], contents[0])], root_certificates=contents[2] if len(contents) > 2 else None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and are usable, else None (gRPC keeps the current one)."""
        try:
            with self._lock:
                if self._stamps() == self._stamp:
                    return None
                self._stamp, self.current = self._read()
        except ConfigError as e:
            self._warning.warn("keeping the current TLS certificate: %s", str(e))
            return None
        log.info("TLS certificate files changed: new connections get the new certificate")
        return self.current


def _warn_about_dates(certificate: bytes) -> None:
    """Warns when the served certificate is expired, not valid yet or expires within EXPIRY_WARNING_DAYS:
    clients refuse it (the server starts all the same, so a rotation can bring a valid one)."""
    try:
        not_before, not_after = cert_validity.validity(certificate)
    except cert_validity.CertificateFormatError:
        return  # ssl loaded it; its dates are for the clients to judge
    now = datetime.now(UTC)
    if now >= not_after:
        log.warning("server.tls.cert_file: the certificate expired at %s; clients refuse it", _shown(not_after))
    elif now < not_before:
        log.warning(
            "server.tls.cert_file: the certificate is not valid before %s; clients refuse it", _shown(not_before)
        )
    elif not_after - now < timedelta(days=EXPIRY_WARNING_DAYS):
        days = (not_after - now) / timedelta(days=1)
        log.warning("server.tls.cert_file: the certificate expires at %s, in %.1f days", _shown(not_after), days)


def _shown(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials that re-read server.tls's files on each new connection when they changed; with
    client_ca_file, clients must present a certificate from those CAs (mutual TLS)."""
    files = CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.current, files.fetch, require_client_authentication=tls.client_ca_file is not None
    )
