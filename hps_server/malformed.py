"""Request deserializers that never raise, for every service the server hosts: bytes that do not parse reach the
handler as a Malformed, which it refuses with INVALID_ARGUMENT. It decides nothing about requests that parse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from hps_server.log_limits import RateLimitedWarning

log = logging.getLogger(__name__)

WARN_INTERVAL_SECONDS = 30
_warning = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)


class Malformed:
    """Stands for a request whose bytes do not parse as its message; the handler refuses it."""

    model = ""  # what the metrics interceptor reads of a request

    def __init__(self, message: str) -> None:
        self.message = message


def tolerant(message: Any) -> Callable[[bytes], object]:
    """A request deserializer that never raises: gRPC would answer a parse failure with INTERNAL and a
    traceback in the log per request; this hands the handler a Malformed to refuse with INVALID_ARGUMENT."""
    name = message.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message.FromString(data)
        except DecodeError:
            return Malformed(name)

    return parse


def refusal(request: object) -> str | None:
    """Why `request` is refused when its bytes did not parse (logged at most once per interval, with a
    count), else None."""
    if not isinstance(request, Malformed):
        return None
    _warning.warn("refused malformed requests (not valid %s messages)", request.message)
    return f"request: not a valid {request.message} message"
