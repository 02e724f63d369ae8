"""Exceptions the hps client raises: one class per gRPC status the server uses, carrying its message.

Callers catch HpsError (or a subclass); grpc types never leak out of the client.
"""

from __future__ import annotations

import grpc


class HpsError(Exception):
    """The server refused or failed a call; `code` is the gRPC status, `message` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class NotFoundError(HpsError, LookupError):
    """Unknown model or table."""


class InvalidArgumentError(HpsError, ValueError):
    """Malformed keys, shapes, dtypes or options."""


class AlreadyExistsError(HpsError):
    """LoadModel of a model the server serves already (ReloadModel changes it)."""


class FailedPreconditionError(HpsError):
    """The server is not in a state for the call: writes on a read-only server, a model change in a worker
    group, a table version not imported, table files that do not read."""


class ResourceExhaustedError(HpsError):
    """The request exceeds a server limit (keys per request, message size)."""


class UnavailableError(HpsError, ConnectionError):
    """The server, or a level it cannot do without, cannot be reached."""


class DeadlineExceededError(HpsError, TimeoutError):
    """The call did not finish within its timeout."""


class UnauthenticatedError(HpsError, PermissionError):
    """The server needs credentials (a token, a client certificate) and got none it accepts."""


class PermissionDeniedError(HpsError, PermissionError):
    """The caller's token or certificate does not grant this call on this model."""


_BY_CODE: dict[grpc.StatusCode, type[HpsError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.RpcError) -> HpsError:
    """The HpsError subclass matching a failed call's status."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return _BY_CODE.get(code, HpsError)(code, details or "")
