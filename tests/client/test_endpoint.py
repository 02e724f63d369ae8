"""How the framework layers find their server: config addresses, lazy framework imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hps_client.endpoint import DEFAULT_ADDRESS, config_address, resolve_address


@pytest.mark.parametrize(
    ("name", "text", "address"),
    [
        ("ps.json", json.dumps({"supportlonglong": True, "models": []}), DEFAULT_ADDRESS),
        ("ps.json", json.dumps({"server": {"address": "[::]:9001"}, "models": []}), "127.0.0.1:9001"),
        ("hps.yaml", "server:\n  address: 0.0.0.0:9002\nmodels: []\n", "127.0.0.1:9002"),
        ("hps.yaml", "server:\n  address: hps.internal:9003\n", "hps.internal:9003"),
    ],
)
def test_config_address(tmp_path: Path, name: str, text: str, address: str) -> None:
    (tmp_path / name).write_text(text)
    assert config_address(tmp_path / name) == address


def test_address_argument_wins_and_bad_configs_name_the_problem(tmp_path: Path) -> None:
    assert resolve_address(tmp_path / "missing.json", "10.0.0.1:8500") == "10.0.0.1:8500"
    assert resolve_address(None, None) is None
    with pytest.raises(FileNotFoundError, match="ps_config_file: cannot read"):
        config_address(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_address(tmp_path / "bad.json")
    (tmp_path / "port.yaml").write_text("server:\n  address: 8500\n")
    with pytest.raises(ValueError, match=r"server\.address must be 'host:port'"):
        config_address(tmp_path / "port.yaml")


def test_importing_the_client_imports_no_framework() -> None:
    code = "import sys, hps_client.endpoint; print(sorted({'tensorflow', 'torch', 'keras'} & sys.modules.keys()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
