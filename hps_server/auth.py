"""Who may call what: bearer tokens (or verified client certificates) from server.auth.tokens_file, with
read, write and admin grants per model.

Tokens are kept as SHA-256 digests, compared in constant time and never logged or echoed; the file is re-read
when it changes. It decides, once per request and per model, and knows nothing of levels or of request content.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import grpc
import yaml

from hps_server.config import ConfigError, shown, shown_value

log = logging.getLogger(__name__)

Permission = Literal["read", "write", "admin"]
PERMISSIONS: Final[tuple[Permission, ...]] = ("read", "write", "admin")
ANY_MODEL: Final = "*"
# The tokens file is looked at (one stat) at most this often, so a rotated token works within a second.
RELOAD_CHECK_SECONDS = 1.0
_BEARER = "bearer "
_ENTRY_KEYS = {"token", "token_sha256", "client_cert_name", *PERMISSIONS}


class AuthRefusedError(Exception):
    """A call without acceptable credentials (UNAUTHENTICATED) or without the grant it needs (PERMISSION_DENIED)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Grant:
    """One tokens-file entry: how the caller is recognised and the models of each permission ("*": all)."""

    name: str  # for messages: "tokens[3]", never the token
    digest: bytes | None  # SHA-256 of the token; None for a certificate identity
    client_cert_name: str | None
    models: Mapping[Permission, frozenset[str]]

    def allows(self, permission: Permission, model: str) -> bool:
        models = self.models[permission]
        return ANY_MODEL in models or model in models


@dataclass(frozen=True)
class Caller:
    """An authenticated caller (or, with auth off, anyone): `require` refuses what its grant does not allow."""

    grant: Grant | None  # None: auth is off
    refused: Callable[[str], None]

    def allows(self, permission: Permission, model: str) -> bool:
        return self.grant is None or self.grant.allows(permission, model)

    def require(self, permission: Permission, model: str) -> None:
        """Raises AuthRefusedError (PERMISSION_DENIED) unless the caller may `permission` on `model`."""
        if not self.allows(permission, model):
            self._refuse(f"no {permission} permission on model {shown(model)}")

    def require_some(self, permission: Permission) -> None:
        """As require(), on some model: before a request's content names the model (LoadModel's config), so
        that a caller who may do it on none gets no further."""
        if self.grant is not None and not self.grant.models[permission]:
            self._refuse(f"no {permission} permission on any model")

    def _refuse(self, what: str) -> None:
        assert self.grant is not None
        self.refused("permission_denied")
        raise AuthRefusedError(grpc.StatusCode.PERMISSION_DENIED, f"{self.grant.name} has {what}")


def _models(value: Any, field: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if value == ANY_MODEL:
        return frozenset({ANY_MODEL})
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{field}: must be a list of model names or "*", got {shown_value(value)}')
    return frozenset(value)


def parse_grants(raw: Any, source: str = "server.auth.tokens_file") -> tuple[Grant, ...]:
    """The entries of a tokens document; ConfigError naming the entry and field (never a token's value)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tokens"), list):
        raise ConfigError(f"{source}: must be a mapping with a list `tokens`")
    grants = []
    for i, entry in enumerate(raw["tokens"]):
        name = f"tokens[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{source}: {name}: must be a mapping")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{source}: {name}.{unknown[0]}: unknown key (known: {', '.join(sorted(_ENTRY_KEYS))})")
        ways = [key for key in ("token", "token_sha256", "client_cert_name") if entry.get(key) is not None]
        if len(ways) != 1:
            raise ConfigError(f"{source}: {name}: give exactly one of token, token_sha256, client_cert_name")
        value = entry[ways[0]]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {name}.{ways[0]}: must be a non-empty string")
        digest = None
        if ways[0] == "token":
            digest = hashlib.sha256(value.encode()).digest()
        elif ways[0] == "token_sha256":
            try:
                digest = bytes.fromhex(value)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"{source}: {name}.token_sha256: must be 64 hex digits (sha256 of the token)")
        models = {p: _models(entry.get(p), f"{source}: {name}.{p}") for p in PERMISSIONS}
        grants.append(Grant(name, digest, value if ways[0] == "client_cert_name" else None, models))
    return tuple(grants)


def _stamp(path: Path) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


def _load(path: Path) -> tuple[Grant, ...]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"server.auth.tokens_file: cannot read it ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError("server.auth.tokens_file: not valid YAML") from None
    return parse_grants(raw)


def _certificate_names(context: grpc.ServicerContext) -> Sequence[bytes]:
    """The common name and subject alternative names of the caller's verified client certificate (mTLS)."""
    auth = context.auth_context()
    return [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]


class Authorizer:
    """Authenticates calls against the tokens file (re-read when it changes) and counts refusals.

    `identify(context)` gives the Caller, or raises AuthRefusedError; with auth off every call is an open Caller.
    """

    def __init__(self, tokens_file: Path | None, refused: Callable[[str], None] | None = None) -> None:
        self._path = tokens_file
        self._refused = refused or (lambda reason: None)
        self._open = Caller(None, self._refused)
        self._lock = threading.Lock()
        self._grants: tuple[Grant, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        if tokens_file is not None:
            try:
                self._stamp = _stamp(tokens_file)
            except OSError as e:
                raise ConfigError(f"server.auth.tokens_file: cannot read it ({e.strerror})") from None
            self._grants = _load(tokens_file)
            self._checked = time.monotonic()
            log.info("auth on: %d tokens-file entries", len(self._grants))

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def identify(self, context: grpc.ServicerContext) -> Caller:
        """The caller of this call: by its bearer token, else by its verified client certificate."""
        if self._path is None:
            return self._open
        grants = self._current()
        token = _bearer_token(context.invocation_metadata())
        if token == "":
            self._refused("invalid_token")
            raise AuthRefusedError(
                grpc.StatusCode.UNAUTHENTICATED, "authorization: expected `authorization: Bearer <token>` metadata"
            )
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            found = None
            for grant in grants:  # every entry is compared, so the time says nothing of which one matched
                if grant.digest is not None and hmac.compare_digest(grant.digest, digest) and found is None:
                    found = grant
            if found is None:
                self._refused("invalid_token")
                raise AuthRefusedError(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown token")
            return Caller(found, self._refused)
        names = _certificate_names(context)
        if names:
            for grant in grants:
                if grant.client_cert_name is not None and grant.client_cert_name.encode() in names:
                    return Caller(grant, self._refused)
        self._refused("missing_credentials")
        raise AuthRefusedError(
            grpc.StatusCode.UNAUTHENTICATED,
            "authorization: this server needs `authorization: Bearer <token>` metadata"
            + (" (the client certificate matches no entry)" if names else ""),
        )

    def _current(self) -> tuple[Grant, ...]:
        """The grants, re-read first when the file changed (checked at most every RELOAD_CHECK_SECONDS). A file
        that cannot be read or parsed keeps the previous grants, with a warning."""
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return self._grants
        with self._lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return self._grants
            self._checked = now
            assert self._path is not None
            try:
                stamp = _stamp(self._path)
                if stamp != self._stamp:
                    self._grants = _load(self._path)
                    self._stamp = stamp
                    log.info("tokens file changed: %d entries now", len(self._grants))
            except OSError as e:
                log.warning("tokens file not reloaded, keeping the previous entries: %s", e.strerror)
            except ConfigError as e:
                log.warning("tokens file not reloaded, keeping the previous entries: %s", e)
        return self._grants


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>`; None without authorization metadata, "" when
    it is there but not a bearer token (another scheme, no token): a credential the caller got wrong is
    refused rather than ignored in favour of its client certificate."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
            return ""
    return None
