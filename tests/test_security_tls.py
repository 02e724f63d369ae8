"""TLS on the gRPC server with real certificates: TLS clients served, plaintext and foreign certificates refused,
certificates rotated on disk picked up by new connections while an open one keeps calling, safe defaults."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509

from hps_bench.certificates import Authority, Pair
from hps_client import TLS, Client, HpsError, UnavailableError
from hps_server import config as config_module
from hps_server.cert_validity import validity
from hps_server.healthcheck import check
from hps_server.metrics import ServerMetrics, serve_metrics
from hps_server.server import HpsServer
from tests.conftest import READER, SecuredModel, sample_config, write_sample_tables

KEYS = np.array([1, 2, 3], np.int64)


def _serve(directory: Path, pair: Pair, client_ca: Path | None = None, **server: object) -> HpsServer:
    write_sample_tables(directory)
    config = sample_config(directory)
    tls = config_module.TlsConfig(pair.cert_file, pair.key_file, client_ca)
    config = replace(config, server=replace(config.server, tls=tls, **server))  # type: ignore[arg-type]
    hps = HpsServer(config)
    hps.start()
    return hps


@pytest.fixture(scope="module")
def tls_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Authority]]:
    """A server with TLS and no client certificates required; its CA."""
    directory = tmp_path_factory.mktemp("tls-only")
    ca = Authority(directory / "pki", "tls-only")
    hps = _serve(directory, ca.issue("server", server=True))
    yield f"127.0.0.1:{hps.port}", ca
    hps.stop(grace=0)


def test_a_tls_client_is_served_and_a_plaintext_one_refused(tls_only: tuple[str, Authority], tmp_path: Path) -> None:
    target, ca = tls_only
    with Client(target, tls=TLS(root_ca_file=ca.cert_file)) as client:
        assert client.lookup("ctr", "user", KEYS).shape == (3, 16)
    with Client(target, timeout=3) as plaintext, pytest.raises(UnavailableError):
        plaintext.lookup("ctr", "user", KEYS)
    stranger = Authority(tmp_path, "stranger")  # the server's certificate is not signed by it
    with Client(target, tls=TLS(root_ca_file=stranger.cert_file), timeout=3) as client, pytest.raises(UnavailableError):
        client.lookup("ctr", "user", KEYS)


def test_a_server_name_override_checks_the_certificate_for_that_name(tls_only: tuple[str, Authority]) -> None:
    target, ca = tls_only
    with Client(target, tls=TLS(root_ca_file=ca.cert_file, server_name="localhost")) as client:
        assert client.list_models() == ["ctr"]
    with (
        Client(target, tls=TLS(root_ca_file=ca.cert_file, server_name="elsewhere.example"), timeout=3) as client,
        pytest.raises(UnavailableError),
    ):
        client.list_models()


def test_mtls_refuses_clients_without_a_certificate_of_its_ca(secured: SecuredModel, tmp_path: Path) -> None:
    ca = secured.ca
    with Client(
        secured.target, tls=TLS(ca.cert_file, secured.client.cert_file, secured.client.key_file), token=READER
    ) as client:
        assert client.lookup("ctr", "item", KEYS).shape == (3, 8)
    foreign = Authority(tmp_path, "foreign").issue("hps-client", server=False)
    for tls in (TLS(ca.cert_file), TLS(ca.cert_file, foreign.cert_file, foreign.key_file)):
        with Client(secured.target, tls=tls, token=READER, timeout=3) as client, pytest.raises(UnavailableError):
            client.lookup("ctr", "item", KEYS)


def _replace_files(new: Pair, served: Pair) -> None:
    """Rotates as tools do: each file replaced whole (rename), the key first, so the pair mismatches meanwhile."""
    for source, target in ((new.key_file, served.key_file), (new.cert_file, served.cert_file)):
        staged = target.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        os.replace(staged, target)


def test_a_rotated_certificate_is_used_by_new_connections_without_a_failed_call(tmp_path: Path) -> None:
    old_ca, new_ca = Authority(tmp_path / "old", "old"), Authority(tmp_path / "new", "new")
    served = old_ca.issue("server", server=True)
    hps = _serve(tmp_path, served)
    target = f"127.0.0.1:{hps.port}"
    both = tmp_path / "both-ca.pem"
    both.write_bytes(old_ca.cert_file.read_bytes() + new_ca.cert_file.read_bytes())
    calls, failures, stop = [0], [], threading.Event()

    def keep_calling(client: Client) -> None:
        while not stop.is_set():
            try:
                client.lookup("ctr", "user", KEYS)
                calls[0] += 1
            except HpsError as e:
                failures.append(e)

    try:
        with Client(target, tls=TLS(root_ca_file=both)) as steady:
            steady.lookup("ctr", "user", KEYS)  # connected with the old certificate
            caller = threading.Thread(target=keep_calling, args=(steady,))
            caller.start()
            try:
                _replace_files(new_ca.issue("server", server=True), served)
                before = calls[0]
                with Client(target, tls=TLS(root_ca_file=new_ca.cert_file), timeout=5) as fresh:
                    assert fresh.lookup("ctr", "user", KEYS).shape == (3, 16)
                with (
                    Client(target, tls=TLS(root_ca_file=old_ca.cert_file), timeout=3) as stale,
                    pytest.raises(UnavailableError),
                ):
                    stale.lookup("ctr", "user", KEYS)
                deadline = time.monotonic() + 5
                while calls[0] <= before and time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                stop.set()
                caller.join()
        assert calls[0] > before and failures == []
    finally:
        hps.stop(grace=0)


def test_health_is_open_over_tls_without_a_token(secured: SecuredModel) -> None:
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    assert check(secured.target, tls=tls) == "SERVING"


def test_a_mismatched_key_fails_the_start_naming_the_fields(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "ca")
    one, other = ca.issue("one", server=True), ca.issue("other", server=True)
    with pytest.raises(config_module.ConfigError, match=r"server\.tls\.cert_file, key_file") as refused:
        _serve(tmp_path, Pair(one.cert_file, other.key_file))
    assert str(tmp_path) not in str(refused.value)


@pytest.mark.parametrize(
    ("expires_in", "warning"),
    [
        (datetime.timedelta(days=-1), "the certificate expired at"),
        (datetime.timedelta(days=3), "the certificate expires at"),
        (datetime.timedelta(days=30), None),
    ],
)
def test_a_certificate_clients_will_refuse_soon_or_now_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, expires_in: datetime.timedelta, warning: str | None
) -> None:
    pair = Authority(tmp_path / "pki", "ca").issue("server", server=True, expires_in=expires_in)
    certificate = x509.load_pem_x509_certificate(pair.cert_file.read_bytes())
    assert validity(pair.cert_file.read_bytes()) == (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
    with caplog.at_level(logging.WARNING, logger="hps_server.tls"):
        _serve(tmp_path, pair).stop(grace=0)  # an expired certificate still serves: a rotation can replace it
    warned = [record.getMessage() for record in caplog.records if record.name == "hps_server.tls"]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith(f"server.tls.cert_file: {warning}")
        assert str(tmp_path) not in warned[0]


def test_tls_keys_are_parsed_relative_to_the_config_and_checked_together(tmp_path: Path) -> None:
    raw = {"server": {"tls": {"cert_file": "c.pem", "key_file": "k.pem", "client_ca_file": "ca.pem"}}, "models": []}
    tls = config_module.parse(raw, tmp_path).server.tls
    assert [tls.cert_file, tls.key_file, tls.client_ca_file] == [tmp_path / n for n in ("c.pem", "k.pem", "ca.pem")]
    with pytest.raises(config_module.ConfigError, match=r"server\.tls: set cert_file and key_file together"):
        config_module.parse({"server": {"tls": {"cert_file": "c.pem"}}, "models": []}, tmp_path)


def test_defaults_bind_loopback(tmp_path: Path) -> None:
    assert config_module.parse({"models": []}, tmp_path).server.address == "127.0.0.1:8500"
    endpoint = serve_metrics(":0", ServerMetrics())
    assert endpoint is not None
    try:
        assert endpoint._server.server_address[0] == "127.0.0.1"
    finally:
        endpoint.close()
