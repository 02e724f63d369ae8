"""How the framework layers find their server and table: config addresses, table ids through model reloads,
lazy framework imports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hps_client import Client, endpoint
from hps_client.endpoint import DEFAULT_ADDRESS, config_address, resolve_address
from tests.conftest import CONSTANT_KEYS, ServedModel, write_constant_table


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


def _reader(target: str, model: str, table_id: int, emb_vec_size: int) -> Callable[[], np.ndarray]:
    """What a layer's call does: CONSTANT_KEYS' vectors from the table at `table_id`."""

    def fetch(client: Client, table: str) -> np.ndarray:
        return client.lookup(model, table, CONSTANT_KEYS)

    return lambda: endpoint.lookup(target, model, table_id, emb_vec_size, fetch)


def test_table_ids_are_resolved_again_when_the_server_says_the_model_changed(
    admin_served: ServedModel, tmp_path: Path
) -> None:
    a, b, c = (write_constant_table(tmp_path, name, 8, value) for name, value in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    narrow_c = {**write_constant_table(tmp_path, "c", 4, 4.0), "version": "v4"}
    wide, narrow = _reader(admin_served.target, "changing", 0, 8), _reader(admin_served.target, "changing", 0, 4)
    with Client(admin_served.target) as client:
        client.load_model({"name": "changing", "tables": [a, b]})
        np.testing.assert_array_equal(wide(), np.full((4, 8), 1.0))
        # No layer built since: the lookup's NOT_FOUND for the dropped table says table 0 is another one now.
        client.reload_model("changing", model_config={"name": "changing", "tables": [c, b]})
        np.testing.assert_array_equal(wide(), np.full((4, 8), 3.0))
        # Table 0 resized: the reply's dim says so, and the error names the served dim, not a remembered one.
        client.reload_model("changing", model_config={"name": "changing", "tables": [narrow_c, b]})
        with pytest.raises(ValueError, match=r"emb_vec_size: table 0 \('c'\) of model 'changing' has dim 4, got 8"):
            wide()
        np.testing.assert_array_equal(narrow(), np.full((4, 4), 4.0))
        # Table 0 is another table of another dim again: described again, rather than refused by the dim of
        # the table that was table 0.
        client.reload_model("changing", model_config={"name": "changing", "tables": [a, narrow_c]})
        np.testing.assert_array_equal(wide(), np.full((4, 8), 1.0))
        # A reorder that keeps every name and dim shows in no reply: building a layer (forget) resolves the
        # ids again, for every layer of the model.
        client.reload_model("changing", model_config={"name": "changing", "tables": [b, a, narrow_c]})
        endpoint.forget(admin_served.target, "changing")
        np.testing.assert_array_equal(wide(), np.full((4, 8), 2.0))


def test_importing_the_client_imports_no_framework() -> None:
    code = "import sys, hps_client.endpoint; print(sorted({'tensorflow', 'torch', 'keras'} & sys.modules.keys()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
