"""The host:port addresses a server binds (server.address, server.metrics_address): parsed, resolved, and
checked free before a start's slow work (opening levels, ingesting tables), with one message naming the
config field when another program holds one."""

from __future__ import annotations

import socket
from typing import Any

# server.metrics_address with no host: loopback only; exposing /metrics beyond the machine takes a host
# (0.0.0.0:9100).
METRICS_DEFAULT_HOST = "127.0.0.1"
# A resolved address: what socket.socket takes, and the socket address bind takes ((host, port, ...)).
Resolved = tuple[socket.AddressFamily, socket.SocketKind, int, tuple[Any, ...]]


def cannot_bind(field: str, address: str, reason: str | None = None) -> OSError:
    """The error for an address that cannot be bound; `reason` the system's words, when known."""
    because = f"{reason}: " if reason else ""
    return OSError(f"{field}: cannot bind {address} ({because}held by another program?)")


def resolve(address: str, field: str, default_host: str | None = None) -> Resolved:
    """`address` (host:port; no host: `default_host`, None meaning every interface) resolved for a
    listening TCP socket; ValueError or OSError naming `field`."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{field}: must be host:port, got {address!r}")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host.strip("[]") or default_host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"{field}: cannot resolve {address} ({e.strerror})") from e
    return family, kind, proto, where


def check_free(address: str, field: str, default_host: str | None = None) -> int:
    """Binds `address` alone for a moment, as a server that shares no port does, and returns the port bound
    (port 0: a free one, released again); OSError naming `field` when another program holds it.

    A bind without SO_REUSEPORT fails while any socket holds the address, also one that lets others share
    it (another gRPC server: they all do by default), which a bind with SO_REUSEPORT would join silently."""
    family, kind, proto, where = resolve(address, field, default_host)
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no holder
        try:
            probe.bind(where)
        except OSError as e:
            raise cannot_bind(field, address, e.strerror) from e
        return int(probe.getsockname()[1])


# Hosts that take every interface: a port bound on one of them is taken on every host address too.
_EVERY_INTERFACE = {"", "0.0.0.0", "::", "[::]"}


def check_apart(address: str, metrics_address: str, processes: int) -> None:
    """ValueError naming server.metrics_address when one of its ports (port + i for worker i of
    `processes`) is server.address's own on an overlapping host: the server would take its own port."""
    if not metrics_address:
        return
    host, _, port = address.rpartition(":")
    metrics_host, _, metrics_port = metrics_address.rpartition(":")
    metrics_host = metrics_host or METRICS_DEFAULT_HOST
    if int(port) == 0 or int(metrics_port) == 0:
        return
    overlapping = host == metrics_host or {host, metrics_host} & _EVERY_INTERFACE
    if overlapping and int(metrics_port) <= int(port) < int(metrics_port) + processes:
        ports = metrics_port if processes == 1 else f"{metrics_port} to {int(metrics_port) + processes - 1}"
        raise ValueError(
            f"server.metrics_address: its port{'s' if processes > 1 else ''} ({ports}, one per process) "
            f"include server.address's port {port}"
        )
