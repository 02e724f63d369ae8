"""volatile_db.password from the environment: how the Helm chart hands a Secret to the server."""

from __future__ import annotations

from pathlib import Path

import pytest

from hps_server import config

MINIMAL = {"models": [{"name": "m", "tables": [{"name": "t", "dim": 4}]}]}


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
