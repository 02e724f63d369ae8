"""volatile_db's secrets and TLS files: the password from the environment or a file, TLS keys (also HPS's names).

Config parsing only; tests/storage/test_redis_cluster.py connects with these options to real TLS clusters.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from hps_server import config
from hps_server.config import ConfigError
from tests.test_config import HPS_PS_JSON

MINIMAL = {"models": [{"name": "m", "tables": [{"name": "t", "dim": 4}]}]}


def _volatile(section: dict, base: Path = Path(".")) -> config.VolatileDbConfig:
    return config.parse({**MINIMAL, "volatile_db": section}, base).volatile_db


def test_environment_replaces_the_file_password(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {**MINIMAL, "volatile_db": {"type": "redis_cluster", "password": "from-file"}}
    monkeypatch.delenv(config.PASSWORD_ENV, raising=False)
    assert config.parse(raw, Path(".")).volatile_db.password == "from-file"
    monkeypatch.setenv(config.PASSWORD_ENV, "from-secret")
    assert config.parse(raw, Path(".")).volatile_db.password == "from-secret"
    assert config.parse(MINIMAL, Path(".")).volatile_db.password == "from-secret"


def test_empty_environment_variable_keeps_the_file_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.PASSWORD_ENV, "")
    raw = {**MINIMAL, "volatile_db": {"password": "from-file"}}
    assert config.parse(raw, Path(".")).volatile_db.password == "from-file"


def test_password_file_relative_to_the_config_and_without_its_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.PASSWORD_ENV, raising=False)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text("pa ss\n")  # as `kubectl create secret --from-file` leaves it
    assert _volatile({"password_file": "secrets/redis"}, tmp_path).password == "pa ss"
    monkeypatch.setenv(config.PASSWORD_ENV, "from-env")
    assert _volatile({"password_file": "secrets/redis"}, tmp_path).password == "from-env"


@pytest.mark.parametrize(
    ("section", "content", "message"),
    [
        ({"password_file": "missing"}, None, "volatile_db.password_file: cannot read it: No such file or directory"),
        ({"password_file": "pw"}, "\n", "volatile_db.password_file: the file is empty"),
        (
            {"password_file": "pw", "password": "s3cret-a"},
            "s3cret-b",
            "volatile_db.password_file: give password or password_file",
        ),
        ({"tls_key_file": "client.key"}, None, "volatile_db.tls_key_file: needs volatile_db.tls_cert_file"),
        ({"tls_check_hostname": "no"}, None, "volatile_db.tls_check_hostname: must be true or false"),
    ],
)
def test_bad_secret_options_name_the_field_and_never_the_path_or_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict, content: str | None, message: str
) -> None:
    monkeypatch.delenv(config.PASSWORD_ENV, raising=False)
    if content is not None:
        (tmp_path / "pw").write_text(content)
    with pytest.raises(ConfigError) as error:
        _volatile(section, tmp_path)
    assert str(error.value).startswith(message)
    assert str(tmp_path) not in str(error.value) and "s3cret" not in str(error.value)


def test_tls_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    volatile = _volatile(
        {"tls": True, "tls_ca_file": "ca.crt", "tls_cert_file": "/abs/client.crt", "tls_check_hostname": False},
        tmp_path,
    )
    assert volatile.tls and volatile.tls_ca_file == tmp_path / "ca.crt"
    assert volatile.tls_cert_file == Path("/abs/client.crt") and volatile.tls_key_file is None
    assert volatile.tls_check_hostname is False
    defaults = _volatile({})
    assert (defaults.tls, defaults.tls_ca_file, defaults.tls_check_hostname) == (False, None, True)


def test_ps_json_tls_keys_are_read_not_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = copy.deepcopy(HPS_PS_JSON)
    raw["volatile_db"] |= {
        "enable_tls": True,
        "tls_ca_certificate": "cacertbundle.crt",
        "tls_client_certificate": "client_cert.pem",
        "tls_client_key": "client_key.pem",
        "tls_server_name_identification": "redis.localhost",
    }
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        volatile = config.load(path).volatile_db
    assert volatile.tls is True
    assert volatile.tls_ca_file == tmp_path / "cacertbundle.crt"
    assert (volatile.tls_cert_file, volatile.tls_key_file) == (
        tmp_path / "client_cert.pem",
        tmp_path / "client_key.pem",
    )
    assert "ignored" not in caplog.text  # every TLS key of HPS is known: read, or (the SNI name) accepted
    raw["volatile_db"]["tls"] = False
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"volatile_db\.enable_tls: give it or volatile_db\.tls, not both"):
        config.load(path)
