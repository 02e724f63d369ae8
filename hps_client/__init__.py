"""hps client: look up embedding vectors from an hps server with NumPy arrays in and out.

`Client` blocks, `AsyncClient` awaits; both raise HpsError subclasses carrying the server's message.
"""

from hps_client.client import AsyncClient, Client, ModelInfo, TableInfo
from hps_client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    HpsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from hps_wire.response_codec import LookupResult
from hps_wire.security import TLS

__all__ = [
    "TLS",
    "AlreadyExistsError",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "HpsError",
    "InvalidArgumentError",
    "LookupResult",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TableInfo",
    "UnauthenticatedError",
    "UnavailableError",
]
