"""Tokens and grants on a real mTLS server: missing or unknown tokens UNAUTHENTICATED, writes without the grant
PERMISSION_DENIED with the rows unchanged, certificate identities, refusals counted, reflection off, read-only."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import queue
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from hps_client import (
    TLS,
    AsyncClient,
    Client,
    FailedPreconditionError,
    HpsError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from hps_server import auth, metrics
from hps_server import config as config_module
from hps_server.server import HpsServer
from hps_wire import security as client_security
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import (
    CERT_READER,
    HASHED,
    READER,
    WRITER,
    SecuredModel,
    sample_config,
    secured_entries,
    write_sample_tables,
    write_tokens_file,
)


def _client(secured: SecuredModel, token: str | None, **options: object) -> Client:
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    return Client(secured.target, tls=tls, token=token, timeout=10, **options)  # type: ignore[arg-type]


def _rewrite_tokens(path: Path, entries: list[dict[str, Any]], seconds_ahead: int = 1) -> None:
    """Writes the tokens file anew, its mtime `seconds_ahead` in the future (so it changes even on a coarse
    clock, and differs from an earlier rewrite's), and waits until a server would have re-read it."""
    write_tokens_file(path, entries)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + seconds_ahead * 10**9))
    time.sleep(auth.RELOAD_CHECK_SECONDS + 0.05)


def _refusals(secured: SecuredModel) -> dict[str, float]:
    text = generate_latest(secured.server.metrics.registry).decode()
    return {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hps_auth_refusals_total{")
    }


def test_missing_and_unknown_tokens_are_unauthenticated_and_counted(secured: SecuredModel) -> None:
    before = _refusals(secured)
    assert set(before) == {"missing_credentials", "invalid_token", "permission_denied"}
    keys = secured.truth["user"][0][:5]
    with _client(secured, None) as anonymous, pytest.raises(UnauthenticatedError, match="Bearer"):
        anonymous.lookup("ctr", "user", keys)
    with _client(secured, "not-a-token") as stranger, pytest.raises(UnauthenticatedError) as refused:
        stranger.lookup("ctr", "user", keys)
    assert "not-a-token" not in refused.value.message
    after = _refusals(secured)
    assert after["missing_credentials"] == before["missing_credentials"] + 1
    assert after["invalid_token"] == before["invalid_token"] + 1


def test_a_token_without_write_is_denied_and_the_rows_stay(secured: SecuredModel) -> None:
    keys = secured.truth["item"][0][:4]
    before = _refusals(secured)["permission_denied"]
    with _client(secured, READER) as reader:
        with pytest.raises(PermissionDeniedError, match=r"tokens\[0\] has no write permission on model 'ctr'"):
            reader.upsert("ctr", "item", keys, np.full((4, 8), 9.0, np.float32))
        with pytest.raises(PermissionDeniedError):
            reader.delete("ctr", "item", keys)
        np.testing.assert_array_equal(reader.lookup("ctr", "item", keys), secured.expected("item", keys))
    assert _refusals(secured)["permission_denied"] == before + 2


def test_a_write_grant_writes_its_model(secured: SecuredModel) -> None:
    keys = np.array([10**9 + 1, 10**9 + 2], np.int64)  # not in the sample tables
    vectors = np.arange(16, dtype=np.float32).reshape(2, 8)
    with _client(secured, WRITER) as writer:
        assert writer.upsert("ctr", "item", keys, vectors) == 2
        np.testing.assert_array_equal(writer.lookup("ctr", "item", keys), vectors)
        assert writer.delete("ctr", "item", keys) == 2


def test_grants_are_per_model_and_checked_before_admission(secured: SecuredModel) -> None:
    with _client(secured, HASHED) as hashed:  # listed by its sha256: reads ctr only
        assert hashed.list_models() == ["ctr"]
        assert hashed.describe("ctr").name == "ctr"
        with pytest.raises(PermissionDeniedError, match="no read permission on model 'other'"):
            hashed.lookup("other", "user", [1])
    with _client(secured, READER) as reader, pytest.raises(NotFoundError):  # "*": the model's absence shows
        reader.lookup("other", "user", [1])
    # A request over every limit is refused for its missing token, before its size is looked at.
    huge = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=bytes(8))] * 5000)
    with _client(secured, None) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous._call(anonymous._lookup, huge, None)
    with _client(secured, READER) as reader, pytest.raises(ResourceExhaustedError):
        reader._call(reader._lookup, huge, None)


def test_stream_lookup_checks_each_request_model(secured: SecuredModel) -> None:
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    channel = client_security.channel(secured.target, tls)
    stream = channel.stream_stream("/hps.v1.LookupService/StreamLookup", hps_pb2.LookupRequest.SerializeToString)
    keys = secured.truth["user"][0][:3]
    requests = [
        hps_pb2.LookupRequest(model=model, queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])
        for model in ("ctr", "other")
    ]
    replies = stream(iter(requests), metadata=client_security.call_metadata(HASHED), timeout=10)
    next(replies)  # ctr: read
    with pytest.raises(grpc.RpcError) as refused:
        next(replies)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as anonymous:
        next(stream(iter(requests), timeout=10))
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_a_token_revoked_while_its_stream_is_open_ends_the_stream(secured: SecuredModel) -> None:
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    channel = client_security.channel(secured.target, tls)
    stream = channel.stream_stream("/hps.v1.LookupService/StreamLookup", hps_pb2.LookupRequest.SerializeToString)
    keys = secured.truth["user"][0][:3]
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])
    sent: queue.Queue[hps_pb2.LookupRequest | None] = queue.Queue()
    replies = stream(iter(sent.get, None), metadata=client_security.call_metadata(READER), timeout=30)
    try:
        sent.put(request)
        next(replies)
        _rewrite_tokens(secured.tokens_file, [e for e in secured_entries() if e.get("token") != READER])
        sent.put(request)
        with pytest.raises(grpc.RpcError) as revoked:
            next(replies)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        sent.put(None)
        _rewrite_tokens(secured.tokens_file, secured_entries(), seconds_ahead=2)
        channel.close()
    with _client(secured, READER) as reader:  # the entry is back
        np.testing.assert_array_equal(reader.lookup("ctr", "user", keys), secured.truth["user"][1][:3])


def _requests_counted(secured: SecuredModel) -> dict[tuple[str, str, str], float]:
    """hps_requests_total by (model, method, code)."""
    (family,) = [f for f in secured.server.metrics.registry.collect() if f.name == "hps_requests"]
    return {
        (s.labels["model"], s.labels["method"], s.labels["code"]): s.value
        for s in family.samples
        if s.name == "hps_requests_total"
    }


def test_refused_calls_count_under_the_model_once_the_caller_is_known(secured: SecuredModel) -> None:
    """An UNAUTHENTICATED call is counted before anything of it is read (a stream's first request is never
    received): under the unknown model, whatever it names; a known caller without the grant, under the model."""
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    keys = secured.truth["user"][0][:3]
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])
    before = _requests_counted(secured)
    with client_security.channel(secured.target, tls) as channel:
        stub = hps_pb2_grpc.LookupServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Lookup(request, timeout=10)
        with pytest.raises(grpc.RpcError) as stream:
            next(stub.StreamLookup(iter([request]), timeout=10))
    assert unary.value.code() == stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _client(secured, READER) as reader, pytest.raises(PermissionDeniedError):
        reader.upsert("ctr", "user", keys, np.zeros((3, 16), np.float32))
    after = _requests_counted(secured)
    moved = {labels: count - before.get(labels, 0) for labels, count in after.items() if count != before.get(labels)}
    assert moved == {
        (metrics.UNKNOWN_MODEL, "Lookup", "UNAUTHENTICATED"): 1,
        (metrics.UNKNOWN_MODEL, "StreamLookup", "UNAUTHENTICATED"): 1,
        ("ctr", "Upsert", "PERMISSION_DENIED"): 1,
    }


def test_a_verified_client_certificate_is_an_identity(secured: SecuredModel) -> None:
    pair = secured.ca.issue(CERT_READER, server=False)
    with Client(secured.target, tls=TLS(secured.ca.cert_file, pair.cert_file, pair.key_file)) as client:
        keys = secured.truth["user"][0][:3]
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys), secured.expected("user", keys))
        with pytest.raises(PermissionDeniedError):
            client.upsert("ctr", "user", keys, np.zeros((3, 16), np.float32))


@pytest.mark.parametrize("authorization", ["Basic YWxhZGRpbjpvcGVu", "Bearer", "Bearer  "])
def test_authorization_metadata_that_is_no_bearer_token_is_refused_not_ignored(
    secured: SecuredModel, authorization: str
) -> None:
    """A client certificate that is an identity does not cover a credential the caller got wrong."""
    pair = secured.ca.issue(CERT_READER, server=False)
    credentials = grpc.ssl_channel_credentials(
        secured.ca.cert_file.read_bytes(), pair.key_file.read_bytes(), pair.cert_file.read_bytes()
    )
    keys = secured.truth["user"][0][:3]
    request = hps_pb2.LookupRequest(model="ctr", queries=[hps_pb2.TableQuery(table="user", keys=keys.tobytes())])
    with grpc.secure_channel(secured.target, credentials) as channel:
        stub = hps_pb2_grpc.LookupServiceStub(channel)
        stub.Lookup(request, timeout=10)  # the certificate alone is an identity
        with pytest.raises(grpc.RpcError) as refused:
            stub.Lookup(request, metadata=[("authorization", authorization)], timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expected `authorization: Bearer <token>`" in refused.value.details()


def test_reflection_is_off_with_auth_on(secured: SecuredModel) -> None:
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    with client_security.channel(secured.target, tls) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_async_client_sends_tls_and_token(secured: SecuredModel) -> None:
    async def lookups() -> tuple[list[str], BaseException | None]:
        tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
        async with AsyncClient(secured.target, tls=tls, token=READER) as client:
            models = await client.list_models()
        async with AsyncClient(secured.target, tls=tls) as anonymous:
            try:
                await anonymous.list_models()
            except HpsError as e:
                return models, e
        return models, None

    models, refused = asyncio.run(lookups())
    assert models == ["ctr"] and isinstance(refused, UnauthenticatedError)


def test_a_changed_tokens_file_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    tokens = write_tokens_file(tmp_path / "tokens.yaml", [{"token": "first-token-0123", "read": "*"}])
    authorizer = auth.Authorizer(tokens)
    assert authorizer.enabled
    _rewrite_tokens(tokens, [{"token": "second-token-0123", "read": ["ctr"]}])
    digests = [grant.digest for grant in authorizer._current()]
    assert digests == [hashlib.sha256(b"second-token-0123").digest()]


def test_bad_tokens_files_name_the_entry_never_the_token(tmp_path: Path) -> None:
    with pytest.raises(config_module.ConfigError, match=r"tokens\[0\]: give exactly one of"):
        auth.parse_grants({"tokens": [{"read": "*"}]})
    with pytest.raises(config_module.ConfigError, match=r"tokens\[1\]\.token_sha256: must be 64 hex") as bad:
        auth.parse_grants({"tokens": [{"token": "a", "read": "*"}, {"token_sha256": "secret-ish"}]})
    assert "secret-ish" not in str(bad.value)
    with pytest.raises(config_module.ConfigError, match=r"tokens\[0\]\.write: must be a list"):
        auth.parse_grants({"tokens": [{"token": "a", "write": "ctr"}]})


def test_the_tokens_file_env_var_replaces_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"server": {"auth": {"tokens_file": "from-config.yaml"}}, "models": []}
    assert config_module.parse(raw, tmp_path).server.auth.tokens_file == tmp_path / "from-config.yaml"
    monkeypatch.setenv(config_module.TOKENS_FILE_ENV, "/etc/hps/tokens.yaml")
    server = config_module.parse(raw, tmp_path).server
    assert server.auth.tokens_file == Path("/etc/hps/tokens.yaml")
    assert not server.reflection_served  # auth on: reflection off unless server.reflection says otherwise
    raw["server"]["reflection"] = True
    assert config_module.parse(raw, tmp_path).server.reflection_served


def test_a_read_only_server_refuses_writes(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    hps = HpsServer(replace(config, server=replace(config.server, read_only=True)))
    hps.start()
    keys = truth["user"][0][:2]
    try:
        with Client(f"127.0.0.1:{hps.port}") as client:
            with pytest.raises(FailedPreconditionError, match=r"server\.read_only"):
                client.upsert("ctr", "user", keys, np.zeros((2, 16), np.float32))
            with pytest.raises(HpsError, match=r"server\.read_only"):
                client.delete("ctr", "user", keys)
            np.testing.assert_array_equal(client.lookup("ctr", "user", keys), truth["user"][1][:2])
    finally:
        hps.stop(grace=0)


def test_load_model_checks_the_admin_grant_before_reading_the_config_and_bounds_what_it_echoes(
    tmp_path: Path,
) -> None:
    write_sample_tables(tmp_path)
    admin, reader = "admin-token-for-tests", "ctr-reader-token"
    tokens = write_tokens_file(
        tmp_path / "tokens.yaml",
        [{"token": admin, "read": "*", "admin": "*"}, {"token": reader, "read": ["ctr", "ghost"]}],
    )
    config = sample_config(tmp_path)
    hps = HpsServer(replace(config, server=replace(config.server, admin=True, auth=config_module.AuthConfig(tokens))))
    hps.start()
    target = f"127.0.0.1:{hps.port}"
    # A YAML alias bomb: a few hundred bytes that build a value whose repr() is gigabytes.
    levels = ["&a [" + ", ".join("x" * 10) + "]"]
    levels += [f"&{b} [" + ", ".join([f"*{a}"] * 10) + "]" for a, b in itertools.pairwise("abcdefghi")]
    bomb = f"name: m\ntables: [{{name: t, dim: [{', '.join(levels)}]}}]"
    try:
        with Client(target, token=reader, timeout=10) as client:
            for config_text in ("name: m\ntables: [{name: t, dim: 0}]", "a: " + "[" * 5000, bomb):
                with pytest.raises(PermissionDeniedError, match="no admin permission on any model"):
                    client.load_model(config_text)
            # A model it may read but that is not hosted: the hosted ones it may not read stay unnamed.
            with pytest.raises(NotFoundError) as missing:
                client.lookup("ghost", "user", [1])
            assert "(hosted: ctr)" in str(missing.value)
        with Client(target, token=admin, timeout=10) as client:
            with pytest.raises(HpsError, match="model_config: nested too deeply") as deep:
                client.load_model("a: " + "[" * 5000)
            assert deep.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(HpsError, match=r"model_config\.tables\[0\]\.dim: must be an integer") as bombed:
                client.load_model(bomb)
            assert bombed.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(str(bombed.value)) < 400
            with pytest.raises(HpsError, match="dim: must be an integer") as long_value:
                client.load_model({"name": "m", "tables": [{"name": "t", "dim": "9" * 100_000}]})
            assert long_value.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(str(long_value.value)) < 400
    finally:
        hps.stop(grace=0)


def test_entries_of_the_shared_fixture_parse(tmp_path: Path) -> None:
    grants = auth.parse_grants({"tokens": secured_entries()})
    assert [g.allows("write", "ctr") for g in grants] == [False, True, False, False]
    assert grants[3].client_cert_name == CERT_READER and grants[3].digest is None
