"""The standard gRPC health service (grpc.health.v1) as hps serves it: grpcio-health-checking's servicer, with
List, Watch streams that end once the server drains, and malformed requests refused as hps.v1 refuses them.
It reports the statuses the server sets, deciding none, and needs no credentials.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2

from hps_server import malformed

SERVICE_NAME: Final = health.SERVICE_NAME

Send = Callable[[health_pb2.HealthCheckResponse | None], None]


class _Watch:
    """One open Watch stream: its messages pass through; None (or end()) ends it with status OK, once."""

    def __init__(self, send: Send, ended: Callable[[_Watch], None]) -> None:
        self._send = send
        self._ended = ended
        self._lock = threading.Lock()
        self._open = True

    @property
    def open(self) -> bool:
        return self._open

    def send(self, response: health_pb2.HealthCheckResponse | None) -> None:
        if response is None:
            self.end()
        else:
            self._send(response)

    def end(self) -> None:
        with self._lock:
            if not self._open:
                return  # gRPC's servicer sends None once more when the call is over
            self._open = False
        self._ended(self)
        self._send(None)


class HealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer, with List (which it leaves UNIMPLEMENTED), and whose Watch streams
    end (after their NOT_SERVING) once enter_graceful_shutdown() is called: an open stream would otherwise
    hold the server's stop for all its grace."""

    def __init__(self) -> None:
        super().__init__()
        # Held while watchers are sent a status, as the stock servicer's lock is; reentrant: the stock
        # enter_graceful_shutdown() calls set() for every name.
        self._state = threading.RLock()
        # What set() set, for List; "" starts SERVING, as in the stock servicer (which keeps its own).
        self._statuses = {health.OVERALL_HEALTH: health_pb2.HealthCheckResponse.SERVING}
        # Guards the open streams alone and is never held while sending: a stream ending (gRPC's thread
        # calls its callback) must not wait for a status being sent, which waits for that thread.
        self._watches_lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._draining = False  # set under both locks

    def set(self, service: str, status: int) -> None:
        """Sets the status of `service` (ignored once draining), telling its watchers."""
        with self._state:
            if self._draining:
                return
            self._statuses[service] = status
            super().set(service, status)

    def Check(self, request: Any, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        _parsed(request, context)
        return super().Check(request, context)

    def List(self, request: Any, context: grpc.ServicerContext) -> health_pb2.HealthListResponse:
        """Every name's status (the protocol's List: a snapshot of all that were set)."""
        _parsed(request, context)
        with self._state:
            statuses = dict(self._statuses)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )

    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Send) -> None:
        # gRPC passes send_response_callback: the stock __init__ marks Watch non-blocking.
        _parsed(request, context)
        watch = _Watch(send_response_callback, self._forget)
        super().Watch(request, context, watch.send)
        with self._watches_lock:
            if not self._draining:
                if watch.open:  # not ended by its client meanwhile (its end forgot it before it was added)
                    self._watches.add(watch)
                return
        watch.end()  # opened while the drain began: it was sent NOT_SERVING (or SERVICE_UNKNOWN)

    def _forget(self, watch: _Watch) -> None:
        with self._watches_lock:
            self._watches.discard(watch)

    def enter_graceful_shutdown(self) -> None:
        """Sets every status NOT_SERVING for good (each watcher is told), then ends the Watch streams."""
        with self._state:
            super().enter_graceful_shutdown()
            with self._watches_lock:
                self._draining = True
                watches = list(self._watches)
        for watch in watches:
            watch.end()


def _parsed(request: object, context: grpc.ServicerContext) -> None:
    """Ends the call with INVALID_ARGUMENT when the request's bytes did not parse (see malformed.py)."""
    refused = malformed.refusal(request)
    if refused is not None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)


def add_to_server(servicer: HealthServicer, server: grpc.Server) -> None:
    """Serves `servicer` as grpc.health.v1.Health, as the generated add_HealthServicer_to_server does, but with
    requests parsed by malformed.tolerant: gRPC would answer bytes that do not parse with INTERNAL and log
    a traceback."""
    check, listing = malformed.tolerant(health_pb2.HealthCheckRequest), malformed.tolerant(health_pb2.HealthListRequest)
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=check,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "List": grpc.unary_unary_rpc_method_handler(
            servicer.List,
            request_deserializer=listing,
            response_serializer=health_pb2.HealthListResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=check,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
